"""`fluid bench train`: training throughput of a registry model on random data at the paper's shapes.

Measures steps/s, images/s, tokens/s, achieved TFLOP/s and MFU against the device's bf16 peak, and
peak memory. FLOPs per image are counted two ways and both are reported with their ratio:
  - analytic: models/flops.py (the paper's "model GFLOPs"), x3 for forward + backward;
  - counted: torch.utils.flop_counter.FlopCounterMode over one real forward + backward (matmuls,
    convolutions and attention; it skips elementwise ops, as the analytic formula does).
TFLOP/s and MFU use the analytic count (model FLOPs: recomputation by activation checkpointing is
not credited). Random weights and inputs: speed does not depend on what is learned. The first
`warmup` steps (allocation, compilation) are not timed.
"""

from __future__ import annotations

import time

import torch

from fluid_cli import backend
from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.diffusion_head import FREQ_DIM
from fluid_cli.models.flops import train_flops_per_image
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.registry import PAPER_DATA
from fluid_cli.train.optim import make_optimizer

WARMUP_STEPS = 2  # untimed: the first steps allocate, autotune and (with --compile) compile

# dense bf16 peaks in TFLOP/s, matched in order against the device name (torch.cuda.get_device_name,
# or 'TPU <accelerator type>' on TPU VMs); the first key found in the name wins
PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,  # how the SXM part names itself
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "v5p": 459.0,
    "v5litepod": 197.0,
    "v5e": 197.0,
    "v5 lite": 197.0,
    "v6e": 918.0,
    "v4": 275.0,
}
TINY_DATA = {"num_tokens": 16, "token_channels": 16, "vocab_size": 64, "text_dim": 32, "text_len": 8}


def peak_tflops(name: str) -> float | None:
    for key, peak in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return peak
    return None


def bench_config(variant: str, size: str, paper_shapes: bool = True) -> ModelConfig:
    data = PAPER_DATA if paper_shapes else TINY_DATA
    side = int(data["num_tokens"] ** 0.5)
    return ModelConfig.build(
        variant,
        size,
        token_grid=(side, side),
        vocab_size=data["vocab_size"],
        text_dim=data["text_dim"],
        text_len=data["text_len"],
    )


def random_batch(cfg: ModelConfig, batch: int, device: torch.device, step: int):
    keys = kr.make_keys(step, torch.arange(batch)).to(device)
    L = cfg.num_tokens
    if cfg.continuous:
        tokens = kr.normal(keys, (L, cfg.token_channels), 1)
    else:
        tokens = kr.randint(keys, (L,), cfg.vocab_size, 1)
    text = kr.normal(keys, (cfg.text_len, cfg.text_dim), 2)
    mask = torch.ones(batch, cfg.text_len, dtype=torch.bool, device=device)
    return tokens, text, mask, keys


def counted_flops(cfg: ModelConfig, batch: int = 2) -> float:
    """FLOPs per image of one forward + backward by torch's FLOP counter, on the meta device: shapes
    only, nothing allocated or computed, so any size counts in seconds. (On CPU tensors the fused
    attention kernel is not in the counter's table and attention would be missed.)"""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = FluidModel(cfg)
    counter = FlopCounterMode(display=False)
    with counter:
        s, w = model(*random_batch(cfg, batch, torch.device("meta"), 0))
        (s / w).backward()
    return counter.get_total_flops() / batch


def no_input_grad_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the layers whose input needs no gradient (T5 states into the text
    projection, latents into token_in, noised tokens and timestep features into the head): their
    backward costs 1x forward, not the 2x the paper's "x3" assumes. This is the whole gap between
    the analytic and the counted numbers (the counter ignores elementwise ops, as flops.py does)."""
    W, f = cfg.width, 2 * cfg.text_len * cfg.text_dim * cfg.width
    if cfg.continuous:
        f += 2 * cfg.num_tokens * cfg.token_channels * W
        f += cfg.diffusion_batch_mul * cfg.num_tokens * 2 * (cfg.token_channels + FREQ_DIM) * cfg.head_width
    return f


def _timed_steps(model, fwd, opt, make_batch, device, amp, steps, warmup) -> list[float]:
    """Seconds of each of `steps` training steps after `warmup` untimed ones; make_batch(step) gives
    the model inputs."""
    times = []
    for step in range(warmup + steps):
        inputs = make_batch(step)
        backend.synchronize(device)
        t0 = time.perf_counter()
        with backend.autocast(device, amp):
            s, w = fwd(*inputs)
        (s / w).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        backend.mark_step(device)
        backend.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        if step == warmup - 1:
            backend.reset_peak_memory(device)  # steady-state peak, not the first step's allocations
    return times


def bench_train(
    variant: str,
    size: str,
    batch: int,
    steps: int = 5,
    device_name: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> dict:
    """Training throughput of one process at the paper's data shapes: `steps` timed steps after
    WARMUP_STEPS untimed ones."""
    device = backend.resolve_device(device_name)
    amp = backend.autocast_dtype(device, precision)
    cfg = bench_config(variant, size, paper_shapes=True)
    torch.manual_seed(0)
    counted = counted_flops(cfg)  # model FLOPs: activation checkpointing's recompute is excluded
    model = FluidModel(cfg).to(device)
    if activation_checkpointing:
        from fluid_cli.train.distributed import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    opt = make_optimizer(model, 1e-4, (0.9, 0.95), 0.02)
    fwd = backend.compile_fn(model, device) if compile else model
    times = _timed_steps(
        model, fwd, opt, lambda step: random_batch(cfg, batch, device, step), device, amp, steps, WARMUP_STEPS
    )
    dt = sum(times) / len(times)
    analytic = 3 * train_flops_per_image(cfg)
    flops = analytic * batch / dt
    name = backend.device_name(device)
    peak = peak_tflops(name) if device.type != "cpu" else None
    return {
        "bench": "train",
        "variant": variant,
        "size": size,
        "batch": batch,
        "device": name,
        "precision": str(amp or "fp32"),
        "compile": compile,
        "activation_checkpointing": activation_checkpointing,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": dt,
        "steps_per_s": 1 / dt,
        "images_per_s": batch / dt,
        "tokens_per_s": batch * cfg.num_tokens / dt,
        "flops_per_image_analytic": analytic,
        "flops_per_image_counted": counted,
        "flops_counted_over_analytic": counted / analytic,
        "flops_no_input_grad": no_input_grad_flops(cfg),  # analytic - this = counted (see above)
        "tflops": flops / 1e12,
        "peak_tflops": peak,
        "mfu": None if peak is None else flops / 1e12 / peak,
        "peak_memory_gb": backend.peak_memory_bytes(device) / 1e9,
        "timed_steps": steps,
    }
