"""`fluid demo`: the whole pipeline on the built-in shapes world, offline, within a time budget.

    shapes-data -> train-tokenizer vae + t5 -> tokenize -> encode-text -> train (rand-cont)
    -> sample the held-out GenEval-style prompts (4 images each) -> shapes-GenEval -> report.md
Every stage runs through the same CLI commands a user types (in-process), so the demo exercises
the real code paths; a rerun skips finished stages. Training gets what the budget leaves after the
other stages (measured as they run). Prints the report's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)
SAMPLE_RESERVE_S = 120  # sampling + scoring + report, measured ~1 min for the held-out set at tiny size


def run_cli(args: list[str]) -> None:
    """One stage through the real CLI, in-process, its stdout (the output path) sent to stderr.
    Also used by recipes/shapes_study.py."""
    from fluid_cli.cli import app

    log.info("$ fluid %s", " ".join(args))
    with contextlib.redirect_stdout(sys.stderr):
        app(args, standalone_mode=False)


def _stage(name: str, done: Path, args: list[str], timings: dict) -> None:
    t0 = time.perf_counter()
    if done.exists():
        log.info("%s: already done (%s)", name, done)
    else:
        run_cli(args)
    timings[name] = round(time.perf_counter() - t0, 1)


def run_demo(
    out: Path,
    minutes: float = 15.0,
    records: int = 10000,
    size: str = "tiny",
    seed: int = 0,
    tokenizer_steps: int = 3000,
    sample_steps: int = 16,
    cfg: float = 3.0,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, timings = time.perf_counter(), {}
    data, vae, t5 = out / "shapes", out / "tokenizers" / "vae", out / "tokenizers" / "t5"
    latents, text, run = out / "latents", out / "text", out / "run"
    _stage(
        "shapes-data",
        data / "info.json",
        ["shapes-data", str(data), "--records", str(records), "--seed", str(seed)],
        timings,
    )
    _stage(
        "train-tokenizer vae",
        vae / "fluid-tokenizer.json",
        ["train-tokenizer", "vae", "--out", str(vae), "--steps", str(tokenizer_steps), "--seed", str(seed)],
        timings,
    )
    _stage(
        "train-tokenizer t5",
        t5 / "config.json",
        ["train-tokenizer", "t5", "--out", str(t5), "--seed", str(seed)],
        timings,
    )
    tars = str(data / "train" / "shapes-*.tar")
    _stage(
        "tokenize",
        latents / "manifest.json",
        ["tokenize", tars, "--tokenizer", str(vae), "--resolution", "32", "--no-flip", "--out", str(latents)],
        timings,
    )
    _stage(
        "encode-text",
        text / "manifest.json",
        ["encode-text", tars, "--encoder", str(t5), "--out", str(text)],
        timings,
    )
    elapsed = time.perf_counter() - start
    train_min = max(0.05, (minutes * 60 - elapsed - SAMPLE_RESERVE_S) / 60)  # at least a few steps
    t0 = time.perf_counter()
    if not (run / "checkpoints").is_dir() or not any((run / "checkpoints").glob("step-*/COMMIT")):
        run_cli(
            [
                "train",
                "--recipe",
                str(_recipe()),
                "--size",
                size,
                "--image-tokens",
                str(latents),
                "--text",
                str(text),
                "--out",
                str(run),
                "--seed",
                str(seed),
                "--set",
                f"train.time_limit_min={train_min:.2f}",
            ]
        )
    timings["train"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result = _geneval(run, data, out / "geneval", sample_steps, cfg)
    timings["sample + shapes-GenEval"] = round(time.perf_counter() - t0, 1)
    from fluid_cli.demo_report import write_report

    report = write_report(out, run, data, result, timings, time.perf_counter() - start)
    return report


def _recipe() -> Path:
    from importlib import resources

    return Path(str(resources.files("fluid_cli") / "data" / "recipes" / "demo.toml"))


def _geneval(run: Path, data: Path, root: Path, steps: int, cfg: float) -> dict:
    from fluid_cli.eval.geneval_run import generate
    from fluid_cli.shapes.geneval import score_shapes_folder

    bench = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines() if x.strip()]
    if not bench:
        raise FluidError(f"{data / 'heldout.jsonl'} holds no prompts; delete {data} and rerun the demo")
    sample = {"settings": {"steps": steps, "cfg": cfg}, "batch_size": 64, "device": "cpu", "seed": 0}
    with contextlib.redirect_stdout(sys.stderr):
        generate(run, root, bench, sample)
    result = score_shapes_folder(root)
    (root / "shapes-geneval.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1) + "\n"
    )
    return result
