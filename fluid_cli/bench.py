"""`fluid bench train`: training throughput of a registry model on random data at the paper's shapes.

Measures steps/s, images/s, tokens/s, achieved TFLOP/s (analytic FLOPs from models/flops.py, x3 for
forward + backward) and MFU against the device's bf16 peak, plus peak memory. Random weights and
random inputs: speed does not depend on what is learned. The first `warmup` steps (allocation,
compilation) are not timed.
"""

from __future__ import annotations

import time

import torch

from fluid_cli import backend
from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.flops import train_flops_per_image
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.registry import PAPER_DATA
from fluid_cli.train.optim import make_optimizer

# bf16 dense peaks, TFLOP/s, matched against the device name (issue 9's table)
PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "v5p": 459.0,
    "v5e": 197.0,
    "v5 lite": 197.0,
}


def peak_tflops(name: str) -> float | None:
    for key, peak in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return peak
    return None


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


def bench_train(
    variant: str,
    size: str,
    batch: int,
    steps: int = 5,
    warmup: int = 2,
    device_name: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    paper_shapes: bool = True,
) -> dict:
    device = backend.resolve_device(device_name)
    amp = backend.autocast_dtype(device, precision)
    data = (
        PAPER_DATA
        if paper_shapes
        else {"num_tokens": 16, "token_channels": 16, "vocab_size": 64, "text_dim": 32, "text_len": 8}
    )
    side = int(data["num_tokens"] ** 0.5)
    cfg = ModelConfig.build(
        variant,
        size,
        token_grid=(side, side),
        vocab_size=data["vocab_size"],
        text_dim=data["text_dim"],
        text_len=data["text_len"],
    )
    torch.manual_seed(0)
    model = FluidModel(cfg).to(device)
    opt = make_optimizer(model, 1e-4, (0.9, 0.95), 0.02)
    fwd = torch.compile(model) if compile else model
    times = []
    for step in range(warmup + steps):
        inputs = random_batch(cfg, batch, device, step)
        backend.synchronize(device)
        t0 = time.perf_counter()
        with backend.autocast(device, amp):
            s, w = fwd(*inputs)
        (s / w).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        backend.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    flops = 3 * train_flops_per_image(cfg) * batch / dt
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
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": dt,
        "steps_per_s": 1 / dt,
        "images_per_s": batch / dt,
        "tokens_per_s": batch * cfg.num_tokens / dt,
        "tflops": flops / 1e12,
        "mfu": None if peak is None else flops / 1e12 / peak,
        "peak_memory_gb": backend.peak_memory_bytes(device) / 1e9,
        "timed_steps": steps,
    }
