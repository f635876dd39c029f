"""Sampling: text embeddings -> image tokens for the four variants, and the `fluid sample` stage.

    common.py        settings, guided text context, keyed per-token draws (diffusion head / categorical)
    schedule.py      cosine mask schedule and guidance schedules (host-side numbers)
    random_order.py  K-step random-order sampler (rand-cont = the paper's Fluid, rand-disc)
    raster.py        causal sampler with a KV cache (rast-cont, rast-disc)
    prompts.py       prompts file / stdin / --prompt, with line-numbered warnings
    decode.py        prompts -> T5 states, tokens -> pixels (AutoencoderKL, VQModel, synthetic)
    run.py           the stage: checkpoint, batching, PNGs, manifest, resume, grid
    bench.py         sampling throughput (docs/benchmarks.md)
Run `fluid sample --help`. `generate` is the in-process entry point (tests, eval).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.sampling.common import SampleSettings, condition

__all__ = ["SampleSettings", "generate", "num_steps"]


def num_steps(model: FluidModel, s: SampleSettings) -> int:
    """AR steps per batch: K for random order, L for raster (its K is ignored)."""
    return s.steps if model.cfg.random_order else model.cfg.num_tokens


@torch.no_grad()
def generate(
    model: FluidModel,
    text: torch.Tensor,  # (B, S, Dt) T5 states padded to the model's text length
    text_mask: torch.Tensor,  # (B, S) bool
    keys: torch.Tensor,  # (B,) int64 from keyed_random.make_keys(seed, prompt_index, image_index)
    s: SampleSettings,
    guided: bool | None = None,
    on_step: Callable[[], None] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Image tokens (B, L, C) or (B, L). `guided` None: guide when cfg != 1 (True forces the 2B path)."""
    from fluid_cli.sampling.random_order import sample_random_order
    from fluid_cli.sampling.raster import sample_raster

    guided = s.cfg != 1.0 if guided is None else guided
    ctx, ctx_mask = condition(model, text, text_mask, guided)
    if model.cfg.random_order:
        tokens = sample_random_order(model, ctx, ctx_mask, keys, s, guided, on_step)
    else:
        tokens = sample_raster(model, ctx, ctx_mask, keys, s, guided, on_step, use_cache)
    return tokens
