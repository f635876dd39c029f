"""Raster-order sampling (rast-cont, rast-disc): causal generation, one token a step, L steps.
Exercised by `fluid sample` on a rast-* run (its --steps is ignored).

With the KV cache (default) step t feeds one position through the backbone: the start token at
t = 0, else the embedding of token t-1, plus pos[t]; each self-attention layer writes its keys and
values at t and attends to [0, t]. Guided: the cache holds 2B rows, [conditional; null text], both
fed the same tokens. `use_cache=False` recomputes the whole prefix every step: the reference the
tests compare the cache against (quadratically slower). Token draws are keyed by (image, position),
see sampling/common.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.models.transformer import KVCache
from fluid_cli.sampling.common import (
    SampleSettings,
    discrete_probs,
    draw_continuous,
    draw_discrete,
    token_keys,
)
from fluid_cli.sampling.schedule import raster_cfg


def _cache_dtype(model: FluidModel, device: torch.device) -> torch.dtype:
    # under autocast the keys come out in the autocast dtype: store them so (half the memory)
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.pos.dtype


def make_caches(model: FluidModel, rows: int, device: torch.device) -> list[KVCache]:
    cfg = model.cfg
    dtype = _cache_dtype(model, device)
    hd = cfg.width // cfg.heads
    return [KVCache(rows, cfg.heads, cfg.num_tokens, hd, device, dtype) for _ in range(cfg.depth)]


@torch.no_grad()
def sample_raster(
    model: FluidModel,
    ctx: torch.Tensor,  # ((2)B, S, W) aligned text, guided rows = [conditional; null]
    ctx_mask: torch.Tensor,  # ((2)B, S)
    keys: torch.Tensor,  # (B,) int64 image keys
    s: SampleSettings,
    guided: bool,
    on_step: Callable[[], None] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Tokens (B, L, C) float or (B, L) long."""
    cfg = model.cfg
    B, L, dev = keys.shape[0], cfg.num_tokens, keys.device
    rows = 2 * B if guided else B
    scales = raster_cfg(s.cfg, s.cfg_schedule, L)
    caches = make_caches(model, rows, dev) if use_cache else None
    start = model.special_token.expand(rows, 1, -1)  # (rows, 1, W)
    if cfg.continuous:
        tokens = torch.zeros(B, L, cfg.token_channels, device=dev)
    else:
        tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
    x = start  # the input of position 0
    for t in range(L):
        if use_cache:
            z = model.backbone(
                x + model.pos[:, t : t + 1], ctx, ctx_mask, causal=True, caches=caches, start=t
            )
        else:
            prefix = model.embed_tokens(tokens[:, :t])  # (B, t, W)
            prefix = torch.cat([prefix, prefix]) if guided else prefix
            seq = torch.cat([start.to(prefix.dtype), prefix], dim=1) + model.pos[:, : t + 1]
            z = model.backbone(seq, ctx, ctx_mask, causal=True)[:, -1:]  # ((2)B, 1, W)
        tk = token_keys(keys, torch.full((B, 1), t, dtype=torch.long, device=dev))
        if cfg.continuous:
            new = draw_continuous(model, z, tk, scales[t], guided, s)  # (B, 1, C)
        else:
            new, _ = draw_discrete(discrete_probs(model, z, scales[t], guided, s), tk, t, s)  # (B, 1)
        tokens[:, t : t + 1] = new.to(tokens.dtype)
        x = model.embed_tokens(new.to(tokens.dtype))  # (B, 1, W): the next position's input
        x = torch.cat([x, x]) if guided else x
        if on_step is not None:
            on_step()
    return tokens
