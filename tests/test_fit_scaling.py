"""`fluid fit-scaling`: power-law recovery, error lines a user sees, the paper's Table 1, plots, run dirs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from fluid_cli.scaling import fit_scaling
from fluid_cli.scaling.fit import extrapolate, fit_power_law, parse_size, pearson
from fluid_cli.scaling.table import rows_from_run_dir, train_flops

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Fluid rows of the paper's Table 1 (random order, continuous tokens).
TABLE1 = [
    ("369m", 369e6, 7.23, 0.62),
    ("665m", 665e6, 6.84, 0.65),
    ("1.1b", 1.1e9, 6.59, 0.67),
    ("3.1b", 3.1e9, 6.41, 0.70),
    ("10.5b", 10.5e9, 6.16, 0.69),
]
SIZES = {"166m": (176e6, 120.0), "369m": (380e6, 260.0), "665m": (690e6, 470.0), "1.1b": (1.15e9, 780.0)}
TRUE_B = -0.06


def _write_table1(path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "size", "params", "fid", "geneval"])
        for size, params, fid, gen in TABLE1:
            w.writerow(["rand-cont", size, params, fid, gen])
    return path


def _write_run(root: Path, size: str, rng: np.random.Generator, variant: str = "rand-cont") -> Path:
    """A run dir as `fluid train` and the eval commands write it (config, metrics.jsonl, eval/*.json)."""
    params, gflops = SIZES[size]
    d = root / f"{variant}-{size}"
    (d / "eval").mkdir(parents=True)
    cfg = {
        "variant": variant,
        "size": size,
        "params": int(params),
        "gflops_per_image": gflops,
        "train": {"batch_size": 256},
    }
    (d / "config.json").write_text(json.dumps(cfg))
    lines = [json.dumps({"step": 0, "val_loss": 1.5})]
    for step in range(10_000, 50_001, 10_000):
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "loss": 0.4,
                    "lr": 1e-4,
                    "grad_norm": 1.0,
                    "images_per_s": 50.0,
                    "samples_seen": step * 256,
                }
            )
        )
        vl = (0.9 * params**TRUE_B + 0.3 * (step / 1e3) ** -0.5) * (1 + 0.002 * rng.standard_normal())
        lines.append(json.dumps({"step": step, "val_loss": vl}))
        if step % 20_000 == 0:
            fid = 6 + 60 * (vl - 0.27) + 0.05 * rng.standard_normal()
            (d / "eval" / f"fid-{step}.json").write_text(
                json.dumps({"metric": "fid", "fid": fid, "step": step})
            )
            gen = 0.75 - 1.5 * (vl - 0.27) + 0.003 * rng.standard_normal()
            rec = {"metric": "geneval", "overall": gen, "step": step, "tags": {"counting": 0.5}}
            (d / "eval" / f"geneval-{step}.json").write_text(json.dumps(rec))
    last_fid = round(6 + 60 * (vl - 0.27), 4)  # no step: joins the last val loss
    (d / "eval" / "fid-last.json").write_text(json.dumps({"metric": "fid", "fid": last_fid}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    root = tmp_path / "runs"
    for size in SIZES:
        _write_run(root, size, rng)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    """What a user sees: `python -m fluid_cli ...` goes through cli.main (FluidError -> one line, exit 1)."""
    return subprocess.run(
        [sys.executable, "-m", "fluid_cli", *args], capture_output=True, text=True, timeout=60
    )


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        assert im.width > 100 and im.height > 100
    assert 0 < path.stat().st_size < 200_000


def test_power_law_recovers_exponent_within_interval() -> None:
    rng = np.random.default_rng(0)
    x = np.repeat(np.geomspace(1e8, 1e10, 6), 2)
    y = 3.0 * x**-0.07 * np.exp(0.01 * rng.standard_normal(len(x)))
    fit = fit_power_law(list(x), list(y), "val_loss vs params", "synthetic", n_boot=2000, seed=1)
    lo, hi = fit.b_ci
    assert lo < -0.07 < hi and hi - lo < 0.02
    assert fit.r2 > 0.95
    again = fit_power_law(list(x), list(y), "val_loss vs params", "synthetic", n_boot=2000, seed=1)
    assert again.b_ci == fit.b_ci  # seeded Generator: deterministic
    ex = extrapolate(fit, 1e11)
    assert ex["ci"][0] < ex["value"] < ex["ci"][1] and ex["beyond_data"]


def test_irreducible_term_kept_only_when_supported() -> None:
    x = np.geomspace(1e7, 1e11, 9)
    y = 2.0 * (x / 1e6) ** -0.3 + 1.5
    fit = fit_power_law(list(x), list(y * (1 + 1e-4 * np.sin(np.arange(9)))), "loss", "floor")
    assert fit.floor["supported"], fit.floor
    assert abs(fit.floor["c"] - 1.5) < 0.05
    pure = fit_power_law(list(x[:4]), list(3 * x[:4] ** -0.05), "loss", "pure")
    assert not pure.floor["supported"] and "needs >=" in pure.floor["reason"]


def test_pearson_fisher_interval() -> None:
    x = np.linspace(0.25, 0.35, 12)
    y = 60 * x - 10 + 0.2 * np.sin(np.arange(12))
    c = pearson(list(x), list(y))
    assert c["ci"][0] < c["r"] < c["ci"][1] and c["r"] > 0.9
    z, se = math.atanh(c["r"]), 1 / math.sqrt(12 - 3)
    assert math.isclose(c["ci"][0], math.tanh(z - 1.959964 * se), rel_tol=1e-5)
    assert "ci" not in pearson([1, 2, 3], [2, 1, 3]) and pearson([1, 1, 1], [1, 2, 3])["r"] is None


def test_parse_size_and_compute_definition() -> None:
    assert parse_size("10.5b") == 10.5e9 and parse_size("369M") == 369e6 and parse_size("2e9") == 2e9
    with pytest.raises(FluidError, match="cannot read size"):
        parse_size("huge")
    assert train_flops(123.4, 2048, 1000) == pytest.approx(123.4e9 * 2048 * 1000 * 3)


def test_table1_fixture_fid_exponent_negative(tmp_path: Path) -> None:
    md, summary = fit_scaling([], tmp_path / "out", table=_write_table1(tmp_path / "t1.csv"), targets=["30b"])
    fits = {f["what"]: f for f in summary["fits"]}
    assert fits["fid vs params"]["b"] < 0 and fits["fid vs params"]["b_ci"][1] < 0
    assert fits["geneval vs params"]["b"] > 0
    assert "val_loss vs params" not in fits and any("Figure 5" in s for s in summary["skipped"])
    _assert_png(tmp_path / "out" / summary["plots"]["fig6_metrics_vs_params"])
    assert "fid vs params" in md.read_text()


def test_run_dirs_end_to_end_json(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["fit-scaling", str(runs), "--out", str(out), "--json", "--extrapolate", "3.1b"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    for key in ("inputs", "settings", "fits", "extrapolations", "correlations", "plots", "skipped", "rows"):
        assert key in s
    assert s["inputs"]["n_runs"] == 4 and len(s["rows"]) == 4 * 6
    fits = {(f["what"], f["variant"]): f for f in s["fits"]}
    loss = fits[("val_loss vs params", "rand-cont")]
    assert loss["b"] < 0 and loss["n"] == 4
    assert ("val_loss vs train_flops (compute frontier)", "rand-cont") in fits
    corr = {c["y"]: c for c in s["correlations"]}
    assert corr["fid"]["r"] > 0.8 and corr["geneval"]["r"] < -0.8 and "ci" in corr["fid"]
    assert {e["target"] for e in s["extrapolations"]} == {"3.1b"}
    assert set(s["plots"]) >= {
        "fig5_loss_vs_params",
        "fig6_metrics_vs_params",
        "fig8_compute_rand-cont",
        "fig9_correlation_rand-cont",
    }
    for name in s["plots"].values():
        _assert_png(out / name)
    assert (out / "summary.md").exists() and json.loads((out / "summary.json").read_text())["fits"]
    # the 'no step' FID joins the last val loss; compute = GFLOPs x 1e9 x batch x steps x 3
    last = max((r for r in s["rows"] if r["size"] == "166m"), key=lambda r: r["steps"])
    last_fid = json.loads((runs / "rand-cont-166m" / "eval" / "fid-last.json").read_text())["fid"]
    assert last["fid"] == last_fid and last["train_flops"] == pytest.approx(120.0e9 * 256 * 50_000 * 3)
    # rows.csv reads back through --table with the same loss fit
    _, again = fit_scaling([], tmp_path / "out2", table=out / "rows.csv")
    fit2 = next(f for f in again["fits"] if f["what"] == "val_loss vs params")
    assert fit2["b"] == pytest.approx(loss["b"])


def test_run_dir_rows_follow_contract(runs: Path) -> None:
    rows = rows_from_run_dir(runs / "rand-cont-369m")
    assert [r.steps for r in rows] == [0, 10_000, 20_000, 30_000, 40_000, 50_000]
    assert rows[2].fid is not None and rows[2].geneval is not None and rows[1].fid is None


def test_error_fewer_than_three_sizes(runs: Path, tmp_path: Path) -> None:
    p = _cli(
        "fit-scaling",
        str(runs / "rand-cont-166m"),
        str(runs / "rand-cont-369m"),
        "--out",
        str(tmp_path / "o"),
    )
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "at least 3" in lines[-1] and "Traceback" not in p.stderr


def test_error_non_positive_values(tmp_path: Path) -> None:
    t = tmp_path / "neg.csv"
    t.write_text("variant,size,params,val_loss\nv,a,1e8,0.3\nv,b,2e8,-0.1\nv,c,4e8,0.2\n")
    p = _cli("fit-scaling", "--table", str(t), "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "<= 0" in p.stderr


def test_error_missing_column_and_run_dir_without_metrics(tmp_path: Path) -> None:
    t = tmp_path / "miss.csv"
    t.write_text("variant,size,val_loss\nv,a,0.3\n")
    with pytest.raises(
        FluidError, match="lacks params; it has: variant, size, val_loss; it needs: variant, size, params"
    ):
        fit_scaling([], tmp_path / "o", table=t)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"variant": "v", "params": 1e8}))
    res = CliRunner().invoke(app, ["fit-scaling", str(tmp_path / "bare"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and isinstance(res.exception, FluidError)
    assert "not a run dir with metrics" in str(res.exception)


def test_help() -> None:
    res = CliRunner().invoke(app, ["fit-scaling", "--help"])
    assert res.exit_code == 0 and "--extrapolate" in res.output and "--table" in res.output


def test_geneval_zero_skips_its_fit_not_the_command(tmp_path: Path) -> None:
    """A GenEval of 0 (nothing correct: small CPU runs) skips that variant's GenEval fit with a
    reason; the loss fits are still made."""
    t = tmp_path / "zero.csv"
    t.write_text("variant,size,params,val_loss,geneval\nv,a,1e8,0.3,0.0\nv,b,2e8,0.25,0.1\nv,c,4e8,0.2,0.2\n")
    p = _cli("fit-scaling", "--table", str(t), "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [f["what"] for f in summary["fits"]] == ["val_loss vs params"]
    assert any("GenEval score of 0" in s for s in summary["skipped"])
