"""`fluid fit-scaling`: power laws, correlations and the paper's scaling figures from run metrics.

This package owns the analysis end to end and needs no torch: `table` collects rows (one per run and
checkpoint) from run dirs or a table file, `fit` holds the statistics, `plots` draws Figures 5, 6, 8
and 9, `report` writes summary.md and summary.json. `fit_scaling` below wires them together.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from fluid_cli.errors import FluidError
from fluid_cli.scaling.fit import (
    PowerLaw,
    check_positive,
    check_sizes,
    extrapolate,
    fit_power_law,
    parse_size,
    pearson,
)
from fluid_cli.scaling.table import (
    Row,
    expand_run_dirs,
    final_rows,
    rows_from_run_dir,
    rows_from_table,
    write_csv,
)

__all__ = ["fit_scaling", "collect_rows", "analyse", "parse_size", "Row"]

log = logging.getLogger(__name__)
COMPUTE = "training compute = model GFLOPs x 1e9 x batch size x training steps x 3 (FLOPs)"


def collect_rows(run_dirs: list[Path], table: Path | None) -> tuple[list[Row], dict[str, Any]]:
    """All rows from the run dirs and the table, and a description of where they came from."""
    if not run_dirs and table is None:
        raise FluidError("no input; pass run dirs (fluid fit-scaling RUN_DIR... --out DIR) or --table FILE")
    rows: list[Row] = []
    dirs = expand_run_dirs(run_dirs)
    for d in dirs:
        rows.extend(rows_from_run_dir(d))
    if table is not None:
        rows.extend(rows_from_table(table))
    runs = {r.run for r in rows}
    log.info(
        "read %d rows from %d runs (%d run dirs%s)",
        len(rows),
        len(runs),
        len(dirs),
        ", 1 table" if table else "",
    )
    variants = sorted({r.variant for r in rows})
    src = {"run_dirs": [str(d) for d in dirs], "table": str(table) if table else None,
           "n_rows": len(rows), "n_runs": len(runs), "variants": variants}  # fmt: skip
    return rows, src


def _group(rows: list[Row], metric: str, x: str = "params") -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in sorted(rows, key=lambda r: (r.variant, getattr(r, x))):
        out[r.variant][0].append(float(getattr(r, x)))
        out[r.variant][1].append(float(getattr(r, metric)))
    return dict(out)


def frontier(rows: list[Row]) -> list[Row]:
    """Checkpoints no other checkpoint beats with less compute: the lowest loss reached per compute."""
    pts = sorted((r for r in rows if r.val_loss is not None and (r.train_flops or 0) > 0),
                 key=lambda r: (r.train_flops, r.val_loss))  # fmt: skip
    out, best = [], float("inf")
    for r in pts:
        if r.val_loss < best:  # type: ignore[operator]
            out.append(r)
            best = r.val_loss  # type: ignore[assignment]
    return out


def _fit_groups(groups: dict[str, tuple[list[float], list[float]]], what: str, opts: dict[str, Any],
                skipped: list[str]) -> dict[str, PowerLaw]:  # fmt: skip
    """Fit each variant's points; too few sizes is a skip (with the reason), bad values an error."""
    fits = {}
    for variant, (x, y) in groups.items():
        if what.startswith("geneval") and 0.0 in y and all(v >= 0 for v in y):
            # a GenEval of 0 is a measurement (nothing correct), not a bad row; it has no logarithm
            skipped.append(f"cannot fit {what} ({variant}): a GenEval score of 0 has no logarithm")
            continue
        check_positive(x, y, what, variant)
        try:
            check_sizes(x, what, variant)
        except FluidError as e:
            skipped.append(str(e))
            continue
        fits[variant] = fit_power_law(x, y, what, variant, **opts)
        log.info("%s (%s): b = %.4f, R2 = %.3f", what, variant, fits[variant].b, fits[variant].r2)
    return fits


def _compute_fits(rows: list[Row], opts: dict[str, Any], skipped: list[str]) -> dict[str, PowerLaw]:
    what = "val_loss vs train_flops (compute frontier)"
    fits = {}
    for variant in sorted({r.variant for r in rows if r.val_loss is not None}):
        vrows = [r for r in rows if r.variant == variant]
        front = frontier(vrows)
        if not front:
            skipped.append(
                f"{what} ({variant}): no training compute (needs steps, batch and gflops_per_image)"
            )
            continue
        try:
            check_sizes(
                [r.params for r in vrows if r.val_loss is not None and (r.train_flops or 0) > 0],
                what,
                variant,
            )
            check_sizes([r.train_flops for r in front], what, variant, unit="frontier compute value")  # type: ignore[misc]
        except FluidError as e:
            skipped.append(str(e))
            continue
        fits.update(_fit_groups(_group(front, "val_loss", "train_flops"), what, opts, skipped))
    return fits


def analyse(
    rows: list[Row], targets: list[str], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Fits per variant, extrapolations to the target sizes and loss-metric correlations."""
    opts = {"n_boot": n_boot, "seed": seed, "level": level}
    skipped: list[str] = []
    fits: dict[str, dict[str, PowerLaw]] = {}
    for metric in ("val_loss", "fid", "geneval"):
        fits[metric] = _fit_groups(
            _group(final_rows(rows, metric), metric), f"{metric} vs params", opts, skipped
        )
    fits["compute"] = _compute_fits(rows, opts, skipped)
    if not any(fits.values()):
        if skipped:
            raise FluidError(skipped[0])
        raise FluidError("the inputs hold no val_loss, fid or geneval values; nothing to fit")
    extra = [(t, parse_size(t)) for t in targets]
    extrap = [
        dict(extrapolate(f, x0), target=t)
        for t, x0 in extra
        for m in ("val_loss", "fid", "geneval")
        for f in fits[m].values()
    ]
    corrs: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for variant in sorted({r.variant for r in rows}):
        for metric in ("fid", "geneval"):
            pts = [
                r
                for r in rows
                if r.variant == variant and r.val_loss is not None and getattr(r, metric) is not None
            ]
            if not pts:
                continue
            c = pearson([r.val_loss for r in pts], [getattr(r, metric) for r in pts], level)  # type: ignore[misc]
            corrs[variant][metric] = dict(c, variant=variant, x="val_loss", y=metric)
            if c["r"] is None:
                skipped.append(f"correlation val_loss~{metric} ({variant}): {c['reason']} (has {c['n']})")
    return {
        "fits": fits,
        "extrapolations": extrap,
        "correlations": dict(corrs),
        "skipped": skipped,
        "targets": extra,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def make_plots(rows: list[Row], res: dict[str, Any], out: Path) -> tuple[dict[str, str], list[str]]:
    """Every figure whose data is present; returns {name: file} and the reasons for the ones skipped."""
    from fluid_cli.scaling import plots

    variants = sorted({r.variant for r in rows})
    made: dict[str, str] = {}
    skipped: list[str] = []
    val, fid, gen = (final_rows(rows, m) for m in ("val_loss", "fid", "geneval"))
    if val:
        extra_x = [x for _, x in res["targets"]]
        made["fig5_loss_vs_params"] = plots.plot_loss_vs_params(
            val, res["fits"]["val_loss"], variants, out / "loss_vs_params.png", extra_x
        ).name
    else:
        skipped.append("Figure 5 (loss vs params): no val_loss in the inputs")
    if fid or gen:
        made["fig6_metrics_vs_params"] = plots.plot_metrics_vs_params(
            fid, gen, res["fits"], variants, out / "fid_geneval_vs_params.png"
        ).name
    else:
        skipped.append("Figure 6 (FID/GenEval vs params): no fid or geneval in the inputs")
    for v in variants:
        vrows = [r for r in rows if r.variant == v]
        if any((r.train_flops or 0) > 0 and (r.val_loss is not None or r.fid is not None) for r in vrows):
            path = out / f"compute_{_slug(v)}.png"
            made[f"fig8_compute_{v}"] = plots.plot_compute(vrows, res["fits"]["compute"].get(v), v, path).name
        else:
            skipped.append(f"Figure 8 (loss/FID vs compute, {v}): no training compute with val_loss or fid")
        if any(c.get("r") is not None for c in res["correlations"].get(v, {}).values()):
            path = out / f"loss_correlation_{_slug(v)}.png"
            made[f"fig9_correlation_{v}"] = plots.plot_correlation(
                vrows, res["correlations"][v], v, path
            ).name
        else:
            skipped.append(
                f"Figure 9 (FID/GenEval vs val loss, {v}): needs >= 3 checkpoints with val_loss and fid or geneval"
            )
    for reason in skipped:
        log.info("skipped %s", reason)
    return made, skipped


def fit_scaling(run_dirs: list[Path], out: Path, table: Path | None = None, targets: list[str] | None = None,
                n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Read, fit, plot and write summary.md / summary.json / rows.csv into `out`; returns the md path and summary."""
    from fluid_cli.scaling.report import _clean, build_summary, write_reports

    if n_boot < 10:
        raise FluidError(
            f"--n-boot {n_boot} is too small for an interval; use 1000 (the default) or more than 10"
        )
    if not 0 < level < 1:
        raise FluidError(f"--ci {level} must lie between 0 and 1, e.g. 0.95")
    for t in targets or []:
        parse_size(t)  # a bad --extrapolate fails before any work
    rows, src = collect_rows(run_dirs, table)
    res = analyse(rows, targets or [], n_boot, seed, level)
    out.mkdir(parents=True, exist_ok=True)
    plots_made, plots_skipped = make_plots(rows, res, out)
    write_csv(rows, out / "rows.csv")
    summary = build_summary(
        rows, src, res, plots_made, plots_skipped, {"n_boot": n_boot, "seed": seed, "ci_level": level}
    )
    md_path, _ = write_reports(summary, out)
    return md_path, _clean(summary)  # NaN/inf -> null, as in summary.json: --json prints strict JSON
