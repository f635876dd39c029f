"""Random-order sampling (the paper's Fluid, and MaskGIT-style rand-disc): K steps over a cosine
schedule of masked tokens, as MAR's `sample_tokens`. Exercised by `fluid sample` on a rand-* run.

Each image gets its own random order (keyed). Step k runs the backbone on all L positions (masked
ones hold the mask token, bidirectional attention; guided: [conditional; null text] in one 2B batch),
then draws the tokens whose rank in the order falls in [n_{k+1}, n_k):
  head_tokens="chosen": gathers those n_k - n_{k+1} tokens (a count known on the host, the same for
    every image) and runs the head on them only: head cost S x L per image, as MAR.
  head_tokens="all": runs the head on all L tokens and writes back the chosen ones by torch.where:
    one shape for every step (a single XLA graph), at K times the head cost.
Both give the same tokens: every draw is keyed by (image, position). No .item(), nonzero or other
host sync happens inside the loop.
Discrete tokens can instead keep the most confident draws (`discrete_order="confidence"`, MaskGIT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fluid_cli.models import keyed_random as kr
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.sampling.common import (
    SampleSettings,
    discrete_probs,
    draw_continuous,
    draw_discrete,
    token_keys,
)
from fluid_cli.sampling.schedule import mask_schedule, random_order_cfg

CHOICE_TEMPERATURE = 4.5  # MaskGIT's annealed Gumbel noise on the confidence (confidence order only)


def random_orders(keys: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank), both (B, L): order[:, r] = the position of rank r, rank = the inverse.

    As MAR's mask_by_order, the positions of rank < n stay masked while n tokens are left masked, so
    the last ranks are generated first."""
    u = kr.uniform(keys, (num_tokens,), kr.STREAM_ORDER)  # (B, L)
    order = u.argsort(dim=1, stable=True)  # stable: ties of the 24-bit uniforms break the same way
    return order, order.argsort(dim=1)


def _backbone(model: FluidModel, tokens, masked, ctx, ctx_mask, guided: bool) -> torch.Tensor:
    if guided:  # both halves see the same tokens (MAR)
        tokens, masked = torch.cat([tokens, tokens]), torch.cat([masked, masked])
    return model.backbone_pass(tokens, ctx, ctx_mask, masked)  # ((2)B, L, W)


@torch.no_grad()
def sample_random_order(
    model: FluidModel,
    ctx: torch.Tensor,  # ((2)B, S, W) aligned text, guided rows = [conditional; null]
    ctx_mask: torch.Tensor,  # ((2)B, S)
    keys: torch.Tensor,  # (B,) int64 image keys
    s: SampleSettings,
    guided: bool,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Tokens (B, L, C) float or (B, L) long."""
    cfg = model.cfg
    B, L, dev = keys.shape[0], cfg.num_tokens, keys.device
    counts = mask_schedule(L, s.steps)
    scales = random_order_cfg(s.cfg, s.cfg_schedule, L, s.steps)
    order, rank = random_orders(keys, L)
    if cfg.continuous:
        tokens = torch.zeros(B, L, cfg.token_channels, device=dev)
    else:
        tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
    masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    run = _Run(keys, order, rank, torch.arange(L, device=dev).expand(B, L), guided, s)
    for k in range(s.steps):
        step = _Step(k, counts[k], counts[k + 1], scales[k])
        if step.n_cur > step.n_next:  # steps that would predict no token (K > L) change nothing: skipped
            z = _backbone(model, tokens, masked, ctx, ctx_mask, guided)
            if not cfg.continuous and s.discrete_order == "confidence":
                tokens, masked = _confidence_step(model, z, tokens, masked, run, step)
            else:
                tokens = _order_step(model, z, tokens, run, step)
                masked = rank < step.n_next
        if on_step is not None:
            on_step()
    return tokens


@dataclass(frozen=True)
class _Run:
    """What every step of one batch shares."""

    keys: torch.Tensor  # (B,) image keys
    order: torch.Tensor  # (B, L): order[:, r] = the position of rank r
    rank: torch.Tensor  # (B, L): the inverse of order
    all_pos: torch.Tensor  # (B, L): 0..L-1 per image
    guided: bool
    s: SampleSettings


@dataclass(frozen=True)
class _Step:
    """Step k draws the tokens of ranks [n_next, n_cur), guided at `scale`."""

    k: int
    n_cur: int
    n_next: int
    scale: float


def _order_step(model, z, tokens, run: _Run, step: _Step):
    """Draw the tokens of ranks [n_next, n_cur) and write them into tokens."""
    keys, order, rank, all_pos, guided, s = run.keys, run.order, run.rank, run.all_pos, run.guided, run.s
    k, n_cur, n_next, scale = step.k, step.n_cur, step.n_next, step.scale
    W = z.shape[-1]
    if s.head_tokens == "all":
        pos, zp = all_pos, z  # (B, L)
    else:
        pos = order[:, n_next:n_cur]  # (B, m): m known on the host, the same for every image
        idx = (torch.cat([pos, pos]) if guided else pos)[..., None].expand(-1, -1, W)
        zp = z.gather(1, idx)  # ((2)B, m, W)
    tk = token_keys(keys, pos)
    if model.cfg.continuous:
        new = draw_continuous(model, zp, tk, scale, guided, s)  # (B, m, C)
    else:
        new, _ = draw_discrete(discrete_probs(model, zp, scale, guided, s), tk, k, s)  # (B, m)
    if s.head_tokens == "all":
        chosen = (rank < n_cur) & (rank >= n_next)
        return torch.where(
            chosen[..., None] if model.cfg.continuous else chosen, new.to(tokens.dtype), tokens
        )
    idx = pos[..., None].expand(-1, -1, new.shape[-1]) if model.cfg.continuous else pos
    return tokens.scatter(1, idx, new.to(tokens.dtype))


def _confidence_step(model, z, tokens, masked, run: _Run, step: _Step):
    """MaskGIT: draw every masked token, keep all but the n_next least confident (Gumbel-annealed)."""
    keys, guided, s, k, n_next, scale = run.keys, run.guided, run.s, step.k, step.n_next, step.scale
    B, L = masked.shape
    pos = torch.arange(L, device=z.device).expand(B, L)
    tk = token_keys(keys, pos)
    codes, p = draw_discrete(discrete_probs(model, z, scale, guided, s), tk, k, s)  # (B, L) each
    u = kr.uniform(tk.reshape(-1), (1,), kr.STREAM_SAMPLE_TOKENS, offset=2 * k + 1).view(B, L)
    gumbel = -torch.log(-torch.log(u))
    conf = torch.log(p.clamp_min(1e-30)) + CHOICE_TEMPERATURE * (1.0 - (k + 1) / s.steps) * gumbel
    conf = torch.where(masked, conf, torch.full_like(conf, float("inf")))  # known tokens stay known
    still_masked = conf.argsort(dim=1, stable=True).argsort(dim=1) < n_next
    chosen = masked & ~still_masked
    return torch.where(chosen, codes, tokens), still_masked
