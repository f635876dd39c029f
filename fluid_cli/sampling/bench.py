"""Sampling throughput of a registry model with random weights (speed does not depend on what is
learned): `bench_sampling` is what docs/benchmarks.md reports and what `fluid bench sample` runs.

Shapes: `tiny` at the synthetic dataset's (16 tokens, text 32 x 8), every other size at the paper's
(256 tokens, T5-XXL 4096 x 128), as `fluid bench train`. The diffusion head's zero-initialised
layers are randomised so that the head does real work (zeros would be as fast, but honest inputs
keep the timing honest). One warm-up batch (2 steps, 2 diffusion steps) is not timed.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from fluid_cli import backend
from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.flops import backbone_flops, head_flops_per_token
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.registry import get_size
from fluid_cli.sampling import SampleSettings, generate
from fluid_cli.sampling.schedule import mask_schedule


def sampling_flops_per_image(cfg: ModelConfig, s: SampleSettings) -> int:
    """Analytic FLOPs of one image (matmuls only, guidance included): the text aligner once, then
    random order: K x transformer(L) + S x head(L) (K x S x head(L) with head_tokens="all");
    raster: about one transformer(L) pass in total (KV cache) + L x S x head(1)."""
    guided = 2 if s.cfg != 1.0 else 1
    transformer = backbone_flops(dataclasses.replace(cfg, aligner_depth=0, text_dim=0))  # no aligner
    aligner = backbone_flops(cfg) - transformer
    head = cfg.num_tokens * head_flops_per_token(cfg) * s.diffusion_steps if cfg.continuous else 0
    if cfg.random_order:  # steps that predict no token (K > L) are skipped
        n = mask_schedule(cfg.num_tokens, s.steps)
        k = sum(a > b for a, b in zip(n, n[1:], strict=False))
        body = k * transformer + head * (k if s.head_tokens == "all" else 1)
    else:
        body = transformer + head
    return guided * (aligner + body)


def _model(cfg: ModelConfig, device: torch.device) -> FluidModel:
    torch.manual_seed(0)
    model = FluidModel(cfg)
    if cfg.continuous:
        h = model.head
        with torch.no_grad():
            for lin in [b.ada[-1] for b in h.blocks] + [h.final.ada[-1], h.final.linear]:
                torch.nn.init.normal_(lin.weight, std=0.02)
    return model.to(device).eval().requires_grad_(False)


def bench_sampling(
    variant: str = "rand-cont",
    size: str = "tiny",
    batch: int = 4,
    s: SampleSettings = SampleSettings(),
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> dict:
    """Time one batch of `batch` images sampled with `s`; returns seconds per image, images/s and
    GFLOP/s."""
    from fluid_cli.bench import bench_config

    dev = backend.resolve_device(device)
    amp = backend.autocast_dtype(dev, precision)
    mcfg = bench_config(variant, size, paper_shapes=size != "tiny")
    model = _model(mcfg, dev)
    if compile:
        model.backbone = torch.compile(model.backbone)
    keys = kr.make_keys(0, torch.arange(batch), 0).to(dev)
    text = kr.normal(keys, (mcfg.text_len, mcfg.text_dim), kr.STREAM_SAMPLE_TOKENS)  # (B, S, Dt)
    mask = torch.ones(batch, mcfg.text_len, dtype=torch.bool, device=dev)
    with backend.autocast(dev, amp):
        generate(model, text, mask, keys, dataclasses.replace(s, steps=2, diffusion_steps=2))  # warm-up
        backend.synchronize(dev)
        t0 = time.perf_counter()
        generate(model, text, mask, keys, s)
        backend.synchronize(dev)
    secs = time.perf_counter() - t0
    flops = sampling_flops_per_image(mcfg, s) * batch
    return {
        "variant": variant, "size": size, "params": sum(p.numel() for p in model.parameters()),
        "device": backend.device_name(dev), "precision": "fp32" if amp is None else str(amp).split(".")[-1],
        "batch": batch, "steps": s.steps if mcfg.random_order else mcfg.num_tokens, "diffusion_steps": s.diffusion_steps,
        "cfg": s.cfg, "head_tokens": s.head_tokens, "seconds": round(secs, 3), "sec_per_image": round(secs / batch, 4),
        "images_per_s": round(batch / secs, 4), "gflop_per_image": round(flops / batch / 1e9, 1),
        "gflops_per_s": round(flops / secs / 1e9, 1), "paper_sec_per_image": get_size(size).paper_sec_per_image,
    }  # fmt: skip
