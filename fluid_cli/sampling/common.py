"""What the random-order and raster samplers share: the guided text context, and the
keyed per-token draws (diffusion-head sampling for continuous tokens, a categorical draw with
temperature / top-k for discrete ones). Exercised by `fluid sample`.

Every random number of a token is keyed by (image key, token position): the diffusion noise of
diffusion step j is `normal(token_key, (C,), offset=(j+1)*C)` and the categorical uniform of AR step
k is `uniform(token_key, (1,), offset=2k)`. So a token's draws do not depend on the batch it is in,
on the process, or on whether the head runs on the chosen tokens only or on all of them.
"""

from __future__ import annotations

import torch

from fluid_cli.models import keyed_random as kr
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.settings import SampleSettings  # defined without torch, for the CLI's defaults


def condition(
    model: FluidModel, text: torch.Tensor, text_mask: torch.Tensor, guided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned text once per batch: (B or 2B, S, W) and mask; guided rows = [conditional; null]."""
    if guided:
        null, null_mask = model.null_text_batch(text.shape[0], text.shape[1])
        text = torch.cat([text, null.to(text.dtype)])
        text_mask = torch.cat([text_mask, null_mask])
    return model.encode_text(text, text_mask), text_mask


def token_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) image keys and (B, M) positions -> (B, M) per-token keys."""
    return kr.combine(keys.to(torch.int64)[:, None], positions)


def draw_continuous(
    model: FluidModel, z: torch.Tensor, tkeys: torch.Tensor, scale: float, guided: bool, s: SampleSettings
) -> torch.Tensor:
    """Tokens (B, M, C) from backbone outputs z ((2)B, M, W) by the diffusion head, S steps each."""
    B, M = tkeys.shape
    C, N = model.cfg.token_channels, B * M
    flat = tkeys.reshape(-1)  # (N,)
    # guided: z's rows are [conditional B; null B]: the head's [cond N; uncond N] after flattening
    cond = z.reshape(-1, z.shape[-1])

    def noise_fn(j: int) -> torch.Tensor:  # j = -1: x_T; j >= 0: the noise of denoising step j
        return kr.normal(flat, (C,), kr.STREAM_SAMPLE_TOKENS, offset=(j + 1) * C)

    # a per-row scale tensor keeps a step whose scale is exactly 1 on the guided path (same shapes)
    cfg_scale = torch.full((N,), scale, device=z.device) if guided else None
    out = model.head.sample(
        cond, noise_fn, s.diffusion_steps, s.temperature, cfg_scale, s.sampler, s.clip_x0 or None
    )
    return out.view(B, M, C)


def discrete_probs(
    model: FluidModel, z: torch.Tensor, scale: float, guided: bool, s: SampleSettings
) -> torch.Tensor:
    """Guided, top-k filtered, tempered probabilities (B, M, V); at temperature 0 the filtered
    logits instead (draw_discrete then takes the argmax)."""
    rows, M, W = z.shape
    logits = model.logits(z.reshape(-1, W)).view(rows, M, -1).float()
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.temperature == 0:
        return logits  # the caller takes the argmax
    return torch.softmax(logits / s.temperature, dim=-1)


def draw_discrete(
    probs: torch.Tensor, tkeys: torch.Tensor, step: int, s: SampleSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (B, M) and their probabilities (B, M) by inverse-CDF with one keyed uniform per token."""
    if s.temperature == 0:
        codes = probs.argmax(dim=-1)
        return codes, torch.ones(codes.shape, device=codes.device)
    B, M, V = probs.shape
    u = kr.uniform(tkeys.reshape(-1), (1,), kr.STREAM_SAMPLE_TOKENS, offset=2 * step).view(B, M, 1)
    cdf = probs.cumsum(dim=-1)
    # first code whose cumulative probability reaches u; static shape, no searchsorted / multinomial
    codes = (cdf < u * cdf[..., -1:]).sum(dim=-1).clamp_max(V - 1)
    return codes, probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
