"""The paper's scaling figures as PNGs, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Figure 5: validation loss vs parameters (log-log, one line per variant with its fit).
Figure 6: FID and GenEval vs parameters. Figure 8: loss and FID vs training compute, one curve per
size. Figure 9: FID and GenEval vs validation loss with the least-squares line and Pearson r.
Each function returns the path it wrote; callers decide what to skip when data is absent.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fluid_cli.scaling.fit import PowerLaw
from fluid_cli.scaling.table import Row, size_label

# The registry's variants (fluid_cli.registry.VARIANTS); orange is the paper's Fluid colour.
VARIANT_COLORS = {
    "rast-disc": "tab:blue",
    "rast-cont": "tab:green",
    "rand-disc": "tab:red",
    "rand-cont": "tab:orange",
}
OTHER_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
METRIC_LABELS = {
    "val_loss": "validation loss",
    "fid": "FID (lower is better)",
    "geneval": "GenEval overall (higher is better)",
}


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * ncols, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as a PNG, palette-quantized (a third of the size, same look) when PIL is there."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    try:
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    except ImportError:
        path.write_bytes(buf.getvalue())
    return path


def variant_color(variant: str, variants: list[str]) -> str:
    """The paper's colour for a known variant (orange: random order, continuous), else a stable one."""
    if variant in VARIANT_COLORS:
        return VARIANT_COLORS[variant]
    others = [v for v in variants if v not in VARIANT_COLORS]
    return OTHER_COLORS[others.index(variant) % len(OTHER_COLORS)] if variant in others else "black"


def _params_axis(ax: Any, sizes: list[float], log_y: bool = False) -> None:
    """Log x axis in parameters, ticked at the model sizes present (up to 8 of them)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    if 0 < len(set(sizes)) <= 8:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(sizes))))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: size_label(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters")
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def _fit_label(fit: PowerLaw, sym: str) -> str:
    lo, hi = fit.b_ci
    ci = f"{fit.level:.0%} CI of b [{lo:.3f}, {hi:.3f}]"
    return f"{fit.variant}: {sym} = {fit.a:.3g}·N^{fit.b:.3f} ({ci}), R²={fit.r2:.3f}"


def _draw_fit(ax: Any, fit: PowerLaw, color: str, extra_x: list[float], sym: str) -> None:
    xs = np.geomspace(min(fit.x + extra_x), max(fit.x + extra_x), 100)
    ax.plot(xs, fit.predict(xs), "--", color=color, lw=1.2, label=_fit_label(fit, sym))
    if fit.floor.get("supported"):
        f = fit.floor
        ax.plot(
            xs,
            f["a"] * xs ** f["b"] + f["c"],
            ":",
            color=color,
            lw=1.2,
            label=f"{fit.variant}: + c = {f['c']:.3g}",
        )


def _by_variant(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r.variant, r.params)):
        out[row.variant].append(row)
    return dict(out)


def _metric_panel(ax: Any, rows: list[Row], metric: str, fits: dict[str, PowerLaw], variants: list[str],
                  extra_x: list[float], log_y: bool) -> None:  # fmt: skip
    for variant, vrows in _by_variant(rows).items():
        color = variant_color(variant, variants)
        xs, ys = [r.params for r in vrows], [getattr(r, metric) for r in vrows]
        ax.plot(
            xs,
            ys,
            "o-" if variant not in fits else "o",
            color=color,
            ms=6,
            label=None if variant in fits else variant,
        )
        if variant in fits:
            _draw_fit(
                ax,
                fits[variant],
                color,
                extra_x,
                {"val_loss": "L", "fid": "FID", "geneval": "GenEval"}[metric],
            )
    _params_axis(ax, [r.params for r in rows] + extra_x, log_y=log_y)
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.legend(fontsize=7.5, loc="best")


def plot_loss_vs_params(rows: list[Row], fits: dict[str, PowerLaw], variants: list[str], path: Path,
                        extra_x: list[float] | None = None) -> Path:  # fmt: skip
    """Figure 5: final validation loss per run vs parameters, log-log, with each variant's fit."""
    fig, (ax,) = _figure()
    _metric_panel(ax, rows, "val_loss", fits, variants, extra_x or [], log_y=True)
    ax.set_title("Validation loss vs model size (Fig. 5)")
    return _save(fig, path)


def plot_metrics_vs_params(fid_rows: list[Row], gen_rows: list[Row], fits: dict[str, dict[str, PowerLaw]],
                           variants: list[str], path: Path) -> Path:  # fmt: skip
    """Figure 6: final FID and GenEval per run vs parameters (a panel is left out when it has no data)."""
    panels = [(m, r) for m, r in (("fid", fid_rows), ("geneval", gen_rows)) if r]
    fig, axes = _figure(len(panels))
    for ax, (metric, rows) in zip(axes, panels, strict=True):
        _metric_panel(ax, rows, metric, fits.get(metric, {}), variants, [], log_y=False)
        ax.set_title(f"{'FID' if metric == 'fid' else 'GenEval'} vs model size (Fig. 6)")
    return _save(fig, path)


def _size_colors(rows: list[Row]) -> dict[float, Any]:
    from matplotlib import colormaps

    sizes = sorted({r.params for r in rows})
    cmap = colormaps["viridis"]
    return {p: cmap(i / max(len(sizes) - 1, 1) * 0.9) for i, p in enumerate(sizes)}


def _runs(rows: list[Row], metric: str) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r.params, r.run, r.steps or 0)):
        if getattr(row, metric) is not None and (row.train_flops or 0) > 0:
            out[row.run].append(row)
    return dict(out)


def plot_compute(rows: list[Row], frontier: PowerLaw | None, variant: str, path: Path) -> Path:
    """Figure 8: validation loss and FID vs training compute, one curve per run (labelled by size)."""
    panels = [m for m in ("val_loss", "fid") if _runs(rows, m)]
    fig, axes = _figure(len(panels))
    colors = _size_colors(rows)
    for ax, metric in zip(axes, panels, strict=True):
        seen: set[str] = set()
        for run_rows in _runs(rows, metric).values():
            label = run_rows[0].size if run_rows[0].size not in seen else None
            seen.add(run_rows[0].size)
            xs, ys = [r.train_flops for r in run_rows], [getattr(r, metric) for r in run_rows]
            ax.plot(xs, ys, "o-", ms=3.5, color=colors[run_rows[0].params], label=label)
        if metric == "val_loss" and frontier is not None:
            xs = np.geomspace(min(frontier.x), max(frontier.x), 100)
            ax.plot(xs, frontier.predict(xs), "k--", lw=1.2, label=f"frontier: L ∝ C^{frontier.b:.3f}")
            if frontier.floor.get("supported"):
                f = frontier.floor
                ax.plot(
                    xs, f["a"] * xs ** f["b"] + f["c"], "k:", lw=1.2, label=f"frontier + c = {f['c']:.3g}"
                )
        ax.set_xscale("log")
        if metric == "val_loss":
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_xlabel("training compute (FLOPs = GFLOPs × 1e9 × batch × steps × 3)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"{'Validation loss' if metric == 'val_loss' else 'FID'} vs compute, {variant} (Fig. 8)")
        ax.legend(title="size", fontsize=8)
    return _save(fig, path)


def plot_correlation(rows: list[Row], corrs: dict[str, dict[str, Any]], variant: str, path: Path) -> Path:
    """Figure 9: FID and GenEval vs validation loss, coloured by size, with the fitted line and r."""
    panels = [m for m in ("fid", "geneval") if corrs.get(m, {}).get("r") is not None]
    fig, axes = _figure(len(panels))
    colors = _size_colors(rows)
    for ax, metric in zip(axes, panels, strict=True):
        pts = [r for r in rows if r.val_loss is not None and getattr(r, metric) is not None]
        for params in sorted({r.params for r in pts}):
            sub = [r for r in pts if r.params == params]
            ax.scatter([r.val_loss for r in sub], [getattr(r, metric) for r in sub], color=colors[params],
                       s=22, label=sub[0].size)  # fmt: skip
        c = corrs[metric]
        xs = np.linspace(min(r.val_loss for r in pts), max(r.val_loss for r in pts), 50)  # type: ignore[type-var]
        ci = f" [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if "ci" in c else ""
        ax.plot(
            xs, c["slope"] * xs + c["intercept"], "k--", lw=1.2, label=f"linear fit, r = {c['r']:.3f}{ci}"
        )
        ax.set_xlabel("validation loss")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"{'FID' if metric == 'fid' else 'GenEval'} vs validation loss, {variant} (Fig. 9)")
        ax.legend(fontsize=8)
    return _save(fig, path)
