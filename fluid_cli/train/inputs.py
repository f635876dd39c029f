"""A collated batch -> model inputs on the device: posterior sample, flip, grouping, text dropout.

All draws are keyed by each sample's key (see models/keyed_random.py), so a sample gets the same
flip, posterior noise and dropout whichever batch or process it lands in.
"""

from __future__ import annotations

import torch

from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.models.tokens import codes_to_tokens, patchify


def model_inputs(
    batch: dict[str, torch.Tensor],
    keys: torch.Tensor,  # (B,) int64
    model: FluidModel,
    cfg: ModelConfig,
    device: torch.device,
    cfg_dropout: float,
    flip: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns tokens (B, L, C) or (B, L), text (B, S, Dt) and text_mask (B, S) on `device`."""
    keys = keys.to(device)
    B = keys.shape[0]
    use_flip = (
        (kr.uniform(keys, (1,), kr.STREAM_FLIP) < 0.5).view(B)
        if flip
        else torch.zeros(B, dtype=torch.bool, device=device)
    )
    if cfg.continuous:
        mean = batch["mean"].to(device, torch.float32)
        std = batch["std"].to(device, torch.float32)
        if flip:
            f = use_flip.view(B, 1, 1, 1)
            mean = torch.where(f, batch["mean_flip"].to(device, torch.float32), mean)
            std = torch.where(f, batch["std_flip"].to(device, torch.float32), std)
        eps = kr.normal(keys, tuple(mean.shape[1:]), kr.STREAM_POSTERIOR)
        tokens = patchify(mean + std * eps, cfg.patch)  # a posterior sample, as MAR trains
    else:
        codes = batch["codes"].to(device)
        if flip:
            codes = torch.where(use_flip.view(B, 1, 1), batch["codes_flip"].to(device), codes)
        tokens = codes_to_tokens(codes)
    text = batch["text"].to(device)
    text_mask = batch["text_mask"].to(device)
    if cfg_dropout > 0:
        drop = kr.uniform(keys, (1,), kr.STREAM_CFG_DROP).view(B) < cfg_dropout
        null_text, null_mask = model.null_text_batch(B, text.shape[1])
        text = torch.where(drop.view(B, 1, 1), null_text.to(text.dtype), text)
        text_mask = torch.where(drop.view(B, 1), null_mask, text_mask)
    return tokens, text, text_mask
