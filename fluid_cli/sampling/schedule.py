"""Host-side schedules of the samplers: how many tokens stay masked after each random-order step, and
the classifier-free guidance scale of each step. Used by `fluid sample` (sampling/random_order.py,
sampling/raster.py).

Both are plain Python numbers computed before the loop: every image follows the same schedule, so the
loop needs no device value to decide a shape (no .item(), no host syncs), and a step's shape depends
only on its index.
"""

from __future__ import annotations

import math

from fluid_cli.config import CfgSchedule, choices

CFG_SCHEDULES = choices(CfgSchedule)


def mask_schedule(num_tokens: int, steps: int) -> list[int]:
    """Masked-token counts n_0..n_K: n_0 = L before the first step, n_K = 0 after the last.

    MaskGIT / MAR cosine schedule: after step k (0-based) floor(L * cos(pi/2 * (k+1)/K)) tokens stay
    masked, at least 1 until the last step and at most one fewer than before the step (MAR's clamp).
    Step k predicts n_k - n_{k+1} tokens; with K > L some steps predict none and can be skipped.
    """
    if steps < 1:
        raise ValueError("the number of steps must be at least 1")
    counts = [num_tokens]
    for k in range(steps):
        counts.append(0 if k == steps - 1 else _clamped_next(num_tokens, steps, k, counts[-1]))
    return counts


def _clamped_next(num_tokens: int, steps: int, k: int, current: int) -> int:
    # math.cos / floor in float64, as MAR's np.cos / np.floor
    n = math.floor(num_tokens * math.cos(math.pi / 2.0 * (k + 1) / steps))
    return max(1, min(current - 1, n))


def random_order_cfg(cfg: float, schedule: str, num_tokens: int, steps: int) -> list[float]:
    """Guidance scale of each random-order step.

    "linear" is MAR's (after Muse): 1 + (cfg - 1) * (L - mask_len) / L with mask_len the clamped count
    left masked after the step. As in MAR, the last step also uses the clamped count (at least 1),
    not 0, so its scale is 1 + (cfg - 1) * (L - 1) / L.
    """
    _check_cfg_schedule(schedule)
    if schedule == "constant":
        return [float(cfg)] * steps
    counts = mask_schedule(num_tokens, steps)
    out = []
    for k in range(steps):
        mask_len = _clamped_next(num_tokens, steps, k, counts[k])
        out.append(1.0 + (cfg - 1.0) * (num_tokens - mask_len) / num_tokens)
    return out


def raster_cfg(cfg: float, schedule: str, num_tokens: int) -> list[float]:
    """Guidance scale for raster token t: linear in the fraction generated after it, (t + 1) / L."""
    _check_cfg_schedule(schedule)
    if schedule == "constant":
        return [float(cfg)] * num_tokens
    return [1.0 + (cfg - 1.0) * (t + 1) / num_tokens for t in range(num_tokens)]


def _check_cfg_schedule(schedule: str) -> None:
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; valid: {', '.join(CFG_SCHEDULES)}")
