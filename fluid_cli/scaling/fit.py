"""The statistics of `fluid fit-scaling`: power laws, bootstrap intervals, an irreducible term,
extrapolation to a named size, and Pearson correlations with Fisher-z intervals.

Power law: y = a * x^b, fit by ordinary least squares on (log x, log y). Exponent intervals come from
a residual bootstrap (the sizes are fixed by design; log-space residuals are resampled with a
seeded numpy Generator, inflated by sqrt(n / (n - 2))) with studentized (bootstrap-t) percentiles,
which keep their coverage with the 3-6 sizes a scaling study has. The irreducible term
y = a * x^b + c is fit by profiling c and kept only when there are enough points, c >= 0 and its
AICc (log space, k = 2 vs 3 mean parameters) is lower; otherwise the reason is reported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from fluid_cli.errors import FluidError

# The paper's nominal parameter counts (Table 2), used when fluid_cli.registry has no SIZES.
PAPER_SIZES = {"166m": 166e6, "369m": 369e6, "665m": 665e6, "1.1b": 1.1e9, "3.1b": 3.1e9, "10.5b": 10.5e9}
MIN_SIZES = 3
MIN_FLOOR_POINTS = 5


@dataclass
class PowerLaw:
    """A fitted y = a * x^b with its bootstrap interval and, beside it, the irreducible-term verdict."""

    what: str  # e.g. "val_loss vs params"
    variant: str
    x: list[float]
    y: list[float]
    a: float
    b: float
    b_ci: tuple[float, float]
    r2: float
    level: float
    n_boot: int
    floor: dict[str, Any] = field(default_factory=dict)
    boot: np.ndarray | None = field(default=None, repr=False)  # (n_boot, 3): log a, b, residual variance
    stats: dict[str, float] = field(default_factory=dict, repr=False)  # s2, mean and sxx of log x, n

    def predict(self, x: float | np.ndarray) -> Any:
        """The fitted power law at x."""
        return self.a * np.power(x, self.b)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary of the fit (points included, bootstrap draws left out)."""
        return {
            "what": self.what, "variant": self.variant, "n": len(self.x), "a": self.a, "b": self.b,
            "b_ci": list(self.b_ci), "ci_level": self.level, "r2_log": self.r2, "n_boot": self.n_boot,
            "x": self.x, "y": self.y, "irreducible": self.floor,
            "ci_method": "residual bootstrap-t" if len(self.x) > 3 else "Gaussian t, 1 dof (3 points: no bootstrap)",
        }  # fmt: skip


def parse_size(text: str) -> float:
    """'10.5b', '369M', '10.5e9' or '176000000' -> parameter count; registry names are accepted too."""
    key = text.strip().lower()
    try:
        from fluid_cli.registry import SIZES  # no torch there

        entry = {str(k).lower(): v for k, v in SIZES.items()}.get(key)
        params = getattr(entry, "nominal_params", None) or getattr(entry, "params", None)
        if isinstance(params, (int, float)) and params > 0:
            return float(params)
    except ImportError:
        pass
    if key in PAPER_SIZES:
        return PAPER_SIZES[key]
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbt]?)", key)
    if not m or float(m.group(1)) <= 0:
        names = ", ".join(PAPER_SIZES)
        raise FluidError(f"cannot read size {text!r}; give a parameter count (10.5e9) or one of: {names}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]


def check_positive(x: list[float], y: list[float], what: str, variant: str) -> None:
    """FluidError unless every x and y is positive (log-log fits need logs)."""
    bad = [(xi, yi) for xi, yi in zip(x, y, strict=True)
           if not (math.isfinite(xi) and math.isfinite(yi) and xi > 0 and yi > 0)]  # fmt: skip
    if bad:
        raise FluidError(
            f"cannot fit a power law of {what} ({variant}): {len(bad)} point(s) are <= 0 or not finite, e.g. "
            f"x={bad[0][0]:g}, y={bad[0][1]:g}; log-log fits need positive values, so fix or drop those rows"
        )


def check_sizes(x: list[float], what: str, variant: str, unit: str = "model size") -> None:
    """FluidError unless there are at least MIN_SIZES distinct x values."""
    distinct = len(set(x))
    if distinct < MIN_SIZES:
        raise FluidError(
            f"cannot fit {what} ({variant}): {distinct} distinct {unit}(s), a fit needs at least "
            f"{MIN_SIZES}; add runs of more model sizes"
        )


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ly = i + s * lx for each row of ly (shape (..., n)); returns (i, s)."""
    xc = lx - lx.mean()
    s = (ly * xc).sum(axis=-1) / (xc * xc).sum()
    return ly.mean(axis=-1) - s * lx.mean(), s


def _r2(ly: np.ndarray, pred: np.ndarray) -> float:
    sst = float(((ly - ly.mean()) ** 2).sum())
    return 1.0 - float(((ly - pred) ** 2).sum()) / sst if sst > 0 else 1.0


def fit_power_law(
    x: list[float],
    y: list[float],
    what: str,
    variant: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PowerLaw:
    """Fit y = a * x^b in log-log space with a residual bootstrap-t interval for b."""
    check_positive(x, y, what, variant)
    check_sizes(x, what, variant)
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    n = len(lx)
    i, s = _ols(lx, ly)
    pred = i + s * lx
    resid = (ly - pred) * math.sqrt(n / max(n - 2, 1))
    rng = np.random.default_rng(seed)
    draws = pred + resid[rng.integers(0, n, size=(n_boot, n))]
    bi, bs = _ols(lx, draws)
    s2b = ((draws - bi[:, None] - bs[:, None] * lx) ** 2).sum(axis=1) / max(n - 2, 1)
    stats = {"s2": float(((ly - pred) ** 2).sum()) / max(n - 2, 1), "mean": float(lx.mean()),
             "sxx": float(((lx - lx.mean()) ** 2).sum()), "n": n}  # fmt: skip
    se, se_b = math.sqrt(stats["s2"] / stats["sxx"]), np.sqrt(s2b / stats["sxx"])
    lo, hi = _boot_t(float(s), se, bs, se_b, level, n)
    fit = PowerLaw(what, variant, list(map(float, x)), list(map(float, y)), float(math.exp(i)), float(s),
                   (lo, hi), _r2(ly, pred), level, n_boot, boot=np.stack([bi, bs, s2b], axis=1), stats=stats)  # fmt: skip
    fit.floor = (
        fit_floor(lx, ly) if s < 0 else {"supported": False, "reason": "only for a falling metric (b < 0)"}
    )
    return fit


def _boot_t(
    est: float, se: float, est_b: np.ndarray, se_b: np.ndarray, level: float, n: int
) -> tuple[float, float]:
    """Bootstrap-t interval [est - t*_hi se, est - t*_lo se]; a point when the fit is exact.

    With 3 points the residuals span one direction and a bootstrap cannot see the spread, so the exact
    Gaussian t interval with 1 degree of freedom (quantile tan(pi * level / 2)) is used instead.
    """
    ok = se_b > 1e-12 * max(se, 1e-300)
    if se <= 1e-12 * max(abs(est), 1.0) or ok.sum() < 10:
        return est, est
    if n <= 3:
        q = math.tan(math.pi * level / 2)
        return est - q * se, est + q * se
    t = (est_b[ok] - est) / se_b[ok]
    t_lo, t_hi = np.percentile(t, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(est - t_hi * se), float(est - t_lo * se)


def _aicc(sse: float, n: int, k: int) -> float:
    return n * math.log(max(sse, 1e-300) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _profile_floor(lx: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, bool]:
    """Best (a, b, c, sse_log) of y = a x^b + c over c in [-max y, min y); flag: c hit the top."""
    ly = np.log(y)
    lo, hi = -float(y.max()), float(y.min()) * (1 - 1e-9)
    best, at_top = None, False
    for _ in range(4):  # grid, then three zooms around the best c
        cs = np.linspace(lo, hi, 201)
        ints, slopes = _ols(lx, np.log(y[None, :] - cs[:, None]))
        model = np.exp(ints[:, None] + slopes[:, None] * lx[None, :]) + cs[:, None]
        sse = ((ly[None, :] - np.log(model)) ** 2).sum(axis=1)
        k = int(np.nanargmin(sse))
        best = (float(np.exp(ints[k])), float(slopes[k]), float(cs[k]), float(sse[k]))
        at_top = at_top or (k == len(cs) - 1 and hi >= float(y.min()) * (1 - 1e-8))
        lo, hi = cs[max(k - 1, 0)], cs[min(k + 1, len(cs) - 1)]
    assert best is not None
    return (*best, at_top)


def fit_floor(lx: np.ndarray, ly: np.ndarray) -> dict[str, Any]:
    """Fit y = a x^b + c beside the pure power law; 'supported' says whether to believe it, and why."""
    n = len(lx)
    if n < MIN_FLOOR_POINTS or len(set(lx.tolist())) < MIN_FLOOR_POINTS - 1:
        return {"supported": False, "reason": f"needs >= {MIN_FLOOR_POINTS} points over >= "
                f"{MIN_FLOOR_POINTS - 1} sizes for 3 parameters (has {n})"}  # fmt: skip
    i, s = _ols(lx, ly)
    sse0 = float(((ly - i - s * lx) ** 2).sum())
    a, b, c, sse1, at_top = _profile_floor(lx, np.exp(ly))
    pred = np.log(a * np.exp(b * lx) + c)
    out = {"supported": False, "a": a, "b": b, "c": c, "r2_log": _r2(ly, pred),
           "aicc": _aicc(sse1, n, 3), "aicc_pure": _aicc(sse0, n, 2)}  # fmt: skip
    if at_top:
        out["reason"] = "c runs up to the smallest value: the data show no identifiable floor"
    elif c < 0:
        out["reason"] = f"best c = {c:.4g} < 0, not a physical floor"
    elif out["aicc"] >= out["aicc_pure"]:
        out["reason"] = f"AICc {out['aicc']:.2f} is not below the pure power law's {out['aicc_pure']:.2f}"
    else:
        out.update(supported=True, reason="c >= 0 and lower AICc than the pure power law")
    return out


def extrapolate(fit: PowerLaw, x0: float) -> dict[str, Any]:
    """The fit at x0 with the bootstrap interval (and the floor fit's value when it is supported)."""
    out: dict[str, Any] = {"what": fit.what, "variant": fit.variant, "x": x0, "value": float(fit.predict(x0))}
    if fit.boot is not None:
        st, lx0 = fit.stats, math.log(x0)
        lever = 1 / st["n"] + (lx0 - st["mean"]) ** 2 / st["sxx"]
        est_b = fit.boot[:, 0] + fit.boot[:, 1] * lx0
        lo, hi = _boot_t(math.log(fit.a) + fit.b * lx0, math.sqrt(st["s2"] * lever), est_b,
                         np.sqrt(fit.boot[:, 2] * lever), fit.level, st["n"])  # fmt: skip
        out.update(ci=[math.exp(min(lo, 700.0)), math.exp(min(hi, 700.0))], ci_level=fit.level)
    if fit.floor.get("supported"):
        f = fit.floor
        out["value_with_floor"] = f["a"] * x0 ** f["b"] + f["c"]
    out["beyond_data"] = not (min(fit.x) <= x0 <= max(fit.x))
    return out


def pearson(x: list[float], y: list[float], level: float = 0.95) -> dict[str, Any]:
    """Pearson r with a Fisher-z interval, an approximate p-value and the least-squares line y = m x + k."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    n = len(xa)
    if n < 3 or xa.std() == 0 or ya.std() == 0:
        return {"n": n, "r": None, "reason": "needs >= 3 points with spread in both variables"}
    r = float(np.corrcoef(xa, ya)[0, 1])
    m, k = np.polyfit(xa, ya, 1)
    out: dict[str, Any] = {"n": n, "r": r, "slope": float(m), "intercept": float(k), "ci_level": level}
    if n < 4:
        out["ci_reason"] = "a Fisher-z interval needs >= 4 points"
        return out
    z, se = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12)), 1 / math.sqrt(n - 3)
    zq = NormalDist().inv_cdf((1 + level) / 2)
    out["ci"] = [math.tanh(z - zq * se), math.tanh(z + zq * se)]
    out["p_approx"] = 2 * (1 - NormalDist().cdf(abs(z) / se))
    return out
