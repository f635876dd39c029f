"""`fluid fit-scaling`: power laws and loss-metric correlations over finished runs."""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, existing, finite, need, writable_dir


@app.command("fit-scaling")
def fit_scaling(
    run_dirs: list[Path] | None = typer.Argument(
        None, help="Run dirs written by `fluid train --out` (or dirs holding them)."
    ),
    out: Path = typer.Option(..., "--out", help="Directory for summary.md/.json, rows.csv and the figures."),
    table: Path | None = typer.Option(
        None,
        "--table",
        help="CSV/JSON table, one row per run or checkpoint: variant, size, params, steps, batch, "
        "train_flops, val_loss, fid, geneval.",
    ),
    extrapolate: list[str] | None = typer.Option(
        None, "--extrapolate", help="Predict at a size: a paper name (10.5b) or a count (10.5e9); repeatable."
    ),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap draws for the exponent interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap's numpy Generator."),
    ci: float = typer.Option(0.95, "--ci", help="Confidence level of the intervals."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the JSON summary instead of the summary path."
    ),
) -> None:
    """Fit scaling power laws and loss-FID/GenEval correlations; draw the paper's Figures 5, 6, 8, 9."""
    at_least(0, n_boot=n_boot)
    finite(ci=ci)
    need(0 < ci < 1, f"--ci must be between 0 and 1 (e.g. 0.95), got {ci}")
    existing(table, "--table", folder=False)
    writable_dir(out)
    import json

    from fluid_cli.scaling import fit_scaling as run_fit_scaling

    md_path, summary = run_fit_scaling(
        list(run_dirs or []), out, table, list(extrapolate or []), n_boot, seed, ci
    )
    print(json.dumps(summary, indent=2) if json_out else md_path)
