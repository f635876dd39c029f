"""The summaries of `fluid fit-scaling`: summary.json (everything, machine-readable) and summary.md
(the same results as tables, with the figures embedded), both written into the --out directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fluid_cli.scaling.table import Row, size_label

COMPUTE_DEF = "train_flops = gflops_per_image * 1e9 * batch_size * steps * 3 (paper, Figure 8)"
FIT_DEF = "y = a * x^b, least squares on (log x, log y); b interval: residual bootstrap-t (exact t, 1 dof, for 3-point fits)"


def build_summary(rows: list[Row], src: dict[str, Any], res: dict[str, Any], plots: dict[str, str],
                  plots_skipped: list[str], settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Everything the command found, as one JSON-ready dict."""
    fits = [f.as_dict() for group in res["fits"].values() for f in group.values()]
    corrs = [c for per in res["correlations"].values() for c in per.values()]
    return {
        "command": "fluid fit-scaling",
        "inputs": src,
        "settings": dict(settings, compute=COMPUTE_DEF, fit=FIT_DEF),
        "fits": fits,
        "extrapolations": res["extrapolations"],
        "correlations": corrs,
        "plots": plots,
        "skipped": res["skipped"] + plots_skipped,
        "rows": [r.as_dict() for r in rows],
    }


def _clean(obj: Any) -> Any:
    """NaN and infinities become null, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _g(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else format(v, fmt)


def _fit_lines(fits: list[dict[str, Any]]) -> list[str]:
    lines = ["| fit | variant | n | a | b (exponent) | CI | R² (log) | irreducible term y = a·x^b + c |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for f in fits:
        fl = f["irreducible"]
        if fl.get("supported"):
            floor = f"kept: c = {_g(fl['c'])}, b = {_g(fl['b'])}, R² = {_g(fl['r2_log'], '.3f')}"
        else:
            floor = f"not kept: {fl.get('reason', '')}"
        ci = f"[{_g(f['b_ci'][0])}, {_g(f['b_ci'][1])}] ({f['ci_level']:.0%})"
        lines.append(f"| {f['what']} | {f['variant']} | {f['n']} | {_g(f['a'])} | **{_g(f['b'])}** | {ci} "
                     f"| {_g(f['r2_log'], '.3f')} | {floor} |")  # fmt: skip
    return lines


def _extrap_lines(ex: list[dict[str, Any]]) -> list[str]:
    lines = ["| prediction | variant | at | value | CI | with floor |", "|---|---|---|---|---|---|"]
    for e in ex:
        ci = f"[{_g(e['ci'][0])}, {_g(e['ci'][1])}]" if "ci" in e else "–"
        at = (
            e["target"]
            if e["target"].lower() == size_label(e["x"]).lower()
            else f"{e['target']} ({size_label(e['x'])})"
        )
        at += " (beyond the data)" if e["beyond_data"] else ""
        lines.append(f"| {e['what'].split(' vs ')[0]} | {e['variant']} | {at} | {_g(e['value'])} | {ci} "
                     f"| {_g(e.get('value_with_floor'))} |")  # fmt: skip
    return lines


def _corr_lines(corrs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| variant | pair | n | Pearson r | CI (Fisher z) | line | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in corrs:
        ci = f"[{_g(c['ci'][0], '.3f')}, {_g(c['ci'][1], '.3f')}]" if "ci" in c else "–"
        line = "–"
        if c.get("r") is not None:
            k = c["intercept"]
            line = f"{c['y']} = {_g(c['slope'])}·loss {'-' if k < 0 else '+'} {_g(abs(k))}"
        note = c.get("reason") or c.get("ci_reason") or ""
        lines.append(
            f"| {c['variant']} | {c['x']} vs {c['y']} | {c['n']} | {_g(c.get('r'), '.3f')} | {ci} | {line} | {note} |"
        )
    return lines


def render_markdown(s: dict[str, Any]) -> str:
    """summary.md: inputs, fits, extrapolations, correlations, figures and what was skipped."""
    src, st = s["inputs"], s["settings"]
    out = ["# Scaling fits (fluid fit-scaling)", "",
           f"Inputs: {src['n_rows']} rows from {src['n_runs']} runs; variants: {', '.join(src['variants'])}; "
           f"run dirs: {len(src['run_dirs'])}; table: {src['table'] or '–'}.", "",
           f"Fit: {st['fit']} ({st['n_boot']} draws, seed {st['seed']}). Compute: {st['compute']}.", "",
           "## Power laws", ""]  # fmt: skip
    out += _fit_lines(s["fits"]) if s["fits"] else ["No fit was possible."]
    if s["extrapolations"]:
        out += ["", "## Extrapolations", ""] + _extrap_lines(s["extrapolations"])
    out += [
        "",
        "## Correlations with validation loss (paper, Figure 9: FID r = 0.917, GenEval r = -0.931)",
        "",
    ]
    out += (
        _corr_lines(s["correlations"])
        if s["correlations"]
        else ["No rows hold both val_loss and FID/GenEval."]
    )
    out += ["", "## Figures", ""]
    out += [f"![{name}]({path})" for name, path in s["plots"].items()] or ["No figure could be drawn."]
    if s["skipped"]:
        out += ["", "## Skipped", ""] + [f"- {reason}" for reason in s["skipped"]]
    return "\n".join(out) + "\n"


def write_reports(summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write summary.md and summary.json into `out`; returns their paths."""
    md, js = out / "summary.md", out / "summary.json"
    js.write_text(json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n")
    md.write_text(render_markdown(summary))
    return md, js
