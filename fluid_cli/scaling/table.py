"""Rows for `fluid fit-scaling`: one per (run, checkpoint step), read from run dirs or a table file.

Owns the input contract: `RUN_DIR/config.json`, `RUN_DIR/metrics.jsonl` (val lines) and optional
`RUN_DIR/eval/*.json` (FID and GenEval results joined to the val loss at the same step), or a
CSV/JSON table with the columns in `COLUMNS`. Training compute follows the paper (Figure 8):
model GFLOPs x batch size x training steps x 3.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)

REQUIRED = ("variant", "size", "params")
METRICS = ("val_loss", "fid", "geneval")
OPTIONAL = ("run", "steps", "batch", "gflops_per_image", "train_flops") + METRICS
COLUMNS = ("variant", "size", "params", "steps", "batch", "train_flops", "val_loss", "fid", "geneval")


@dataclass
class Row:
    """One checkpoint of one run; metrics that were not measured are None."""

    run: str
    variant: str
    size: str
    params: float
    steps: int | None = None
    batch: int | None = None
    gflops_per_image: float | None = None
    train_flops: float | None = None
    val_loss: float | None = None
    fid: float | None = None
    geneval: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict (for JSON and CSV)."""
        return asdict(self)


def train_flops(gflops_per_image: float | None, batch: int | None, steps: int | None) -> float | None:
    """Training compute as the paper defines it: GFLOPs x batch x steps x 3 (forward + 2x backward)."""
    if gflops_per_image is None or batch is None or steps is None:
        return None
    return float(gflops_per_image) * 1e9 * batch * steps * 3


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FluidError(f"cannot read {path}: {e}; fix or remove the file") from None


def _val_points(metrics: Path) -> dict[int, float]:
    """(step -> val_loss) from metrics.jsonl; the last line for a step wins; bad lines are skipped."""
    points: dict[int, float] = {}
    for i, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s:%d is not JSON; skipped (a partly written last line?)", metrics, i)
            continue
        if isinstance(rec, dict) and rec.get("val_loss") is not None and rec.get("step") is not None:
            value = float(rec["val_loss"])
            if not math.isfinite(value):
                log.warning("%s:%d: val_loss is %s; that point is left out", metrics, i, value)
                continue
            points[int(rec["step"])] = value
    return points


def _eval_results(run_dir: Path) -> list[dict[str, Any]]:
    """FID and GenEval records from RUN_DIR/eval/*.json, sorted by file name."""
    out = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        rec = _read_json(path)
        if not isinstance(rec, dict) or rec.get("metric") not in ("fid", "geneval"):
            log.info("%s is not a FID or GenEval result; skipped", path)
            continue
        value = rec.get("fid") if rec["metric"] == "fid" else rec.get("overall")
        if value is None:
            raise FluidError(f"{path} has no value for {rec['metric']}; re-run the eval command")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise FluidError(
                f"{path}: {rec['metric']} is {value!r}, not a number; re-run the eval command"
            ) from None
        if not math.isfinite(value):
            raise FluidError(
                f"{path}: {rec['metric']} is {value}, not a finite number; re-run the eval command"
            )
        out.append({"metric": rec["metric"], "value": value, "step": rec.get("step"), "path": path})
    return out


def _run_config(run_dir: Path) -> dict[str, Any]:
    cfg_path, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics.is_file():
        raise FluidError(
            f"{run_dir} is not a run dir with metrics (needs config.json and metrics.jsonl); "
            "pass directories written by `fluid train --out`, or a table with --table"
        )
    cfg = _read_json(cfg_path)
    missing = [k for k in ("variant", "params") if not isinstance(cfg, dict) or cfg.get(k) is None]
    if missing:
        raise FluidError(f"{cfg_path} lacks {', '.join(missing)}; it was not written by `fluid train`")
    return cfg


def rows_from_run_dir(run_dir: Path) -> list[Row]:
    """All (step, val_loss) points of one run, with FID/GenEval joined at their checkpoint step."""
    cfg = _run_config(run_dir)
    points = _val_points(run_dir / "metrics.jsonl")
    if not points:
        raise FluidError(
            f"{run_dir}/metrics.jsonl has no validation lines (step, val_loss); "
            "train with validation enabled or pass a table with --table"
        )
    batch = (cfg.get("train") or {}).get("batch_size")
    gflops = cfg.get("gflops_per_image")
    params = float(cfg["params"])
    size = str(cfg.get("size") or size_label(params))
    rows = {
        s: Row(str(run_dir), str(cfg["variant"]), size, params, s, batch, gflops, val_loss=v)
        for s, v in points.items()
    }
    last = max(points)
    for res in _eval_results(run_dir):
        step = last if res["step"] is None else int(res["step"])
        if step not in rows:
            log.info("%s: step %d has no val loss; kept without one", res["path"], step)
            rows[step] = Row(str(run_dir), str(cfg["variant"]), size, params, step, batch, gflops)
        setattr(rows[step], res["metric"], res["value"])
    for row in rows.values():
        row.train_flops = train_flops(gflops, batch, row.steps)
    return [rows[s] for s in sorted(rows)]


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs as given; a dir with no config.json but run dirs inside stands for those."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise FluidError(f"{p} is not a directory; pass run dirs written by `fluid train --out`")
        if not (p / "config.json").exists():
            inner = sorted(c.parent for c in p.glob("*/config.json"))
            if inner:
                out.extend(inner)
                continue
        out.append(p)
    return out


def _num(value: Any, col: str, where: str, kind: type = float) -> Any:
    """A table cell as a number; empty cells are None; NaN is None with a warning (the row is left
    out of that column's fits, not silently); an infinity is refused."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FluidError(f"{where}: column {col} holds {value!r}, not a number; fix the table") from None
    if math.isnan(x):
        log.warning(
            "%s: column %s is NaN (a diverged run?); the row is left out of the %s fits", where, col, col
        )
        return None
    if math.isinf(x):
        raise FluidError(
            f"{where}: column {col} is {value!r}, not a finite number (a diverged run?); "
            "fix the value, or leave the cell empty to leave the row out"
        )
    return int(x) if kind is int else x


def _load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FluidError(f"table {path} does not exist; pass a CSV or JSON file to --table")
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        data = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FluidError(
                f"{path} must hold a list of row objects (or {{'rows': [...]}}); see docs/scaling.md"
            )
        return data
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise FluidError(f"table {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None


def rows_from_table(path: Path) -> list[Row]:
    """Rows from a CSV or JSON table; needs variant, size, params and at least one metric column."""
    records = _load_records(path)
    if not records:
        raise FluidError(f"table {path} has no rows; add one row per run or checkpoint")
    has = list(dict.fromkeys(k for r in records for k in r))
    missing = [c for c in REQUIRED if c not in has]
    if missing or not any(m in has for m in METRICS):
        need = f"{', '.join(REQUIRED)} and at least one of {', '.join(METRICS)} (optional: {', '.join(OPTIONAL)})"
        lack = ", ".join(missing) if missing else "a metric column"
        raise FluidError(f"table {path} lacks {lack}; it has: {', '.join(has)}; it needs: {need}")
    rows = []
    for i, rec in enumerate(records, 1):
        where = f"{path} row {i}"
        params = _num(rec.get("params"), "params", where)
        if params is None or params <= 0:
            raise FluidError(f"{where}: params must be a positive number, got {rec.get('params')!r}")
        vals = {
            c: _num(rec.get(c), c, where, int if c in ("steps", "batch") else float)
            for c in OPTIONAL
            if c != "run"
        }
        row = Row(
            str(rec.get("run") or f"{rec['variant']}/{rec['size']}"),
            str(rec["variant"]),
            str(rec["size"]),
            params,
            **vals,
        )
        if row.train_flops is None:
            row.train_flops = train_flops(row.gflops_per_image, row.batch, row.steps)
        rows.append(row)
    return rows


def final_rows(rows: list[Row], metric: str) -> list[Row]:
    """Per run, the row at the largest step that has `metric` (the run's final value)."""
    best: dict[str, Row] = {}
    for row in rows:
        if getattr(row, metric) is None:
            continue
        cur = best.get(row.run)
        if cur is None or (row.steps or 0) >= (cur.steps or 0):
            best[row.run] = row
    return list(best.values())


def write_csv(rows: list[Row], path: Path) -> None:
    """The collected rows as a table that `--table` reads back."""
    names = [f.name for f in fields(Row)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.as_dict().items()})


def size_label(params: float) -> str:
    """A short label for a parameter count: 176000000 -> '176M', 3.1e9 -> '3.1B'."""
    if params >= 1e9:
        return f"{params / 1e9:.3g}B"
    return f"{params / 1e6:.3g}M"
