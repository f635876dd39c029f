"""`fluid demo`: the whole pipeline on the built-in shapes world, offline, within a time budget.

    shapes-data -> train-tokenizer vae + t5 -> tokenize -> encode-text -> train (rand-cont)
    -> sample the evaluation prompts (5 images each) -> shapes-GenEval + the tokenizer ceiling -> report.md
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
from collections.abc import Callable
from pathlib import Path

from fluid_cli.errors import FluidError
from fluid_cli.settings import DemoSettings, SampleRunSettings, SampleSettings

log = logging.getLogger(__name__)
# The time kept after training for sampling + scoring + ceiling + report, scaled by this machine's
# speed as the VAE's training measured it (seconds per step, both small-batch CPU work): they took
# 0.38-0.41x the VAE's 800 steps on the two machines measured (24 s vs 63 s on an AVX-512 EPYC,
# 101-111 s vs 272 s on an AVX2 one), so 0.6x keeps a 50% margin; 120 s when the VAE's report
# holds no timing.
SAMPLE_RESERVE_PER_VAE_S, MIN_SAMPLE_RESERVE_S, SAMPLE_RESERVE_S = 0.6, 30, 120
IMAGE_SIZE, LAYOUT = 64, "grid"  # the shapes world the demo draws (docs/shapes.md)
# images per evaluation prompt: the smallest tags (single_object, counting) have 5 prompts, so
# 5 images each gives every tag at least 25 images (GenEval's own 4 gave single_object 4 here)
IMAGES_PER_PROMPT = 5
CEILING_IMAGES = 300  # training images whose reconstructions give the tokenizer ceiling
# text tokens per caption: the shapes captions take at most 11 T5 tokens (tests/test_demo.py checks
# it). Padding to encode-text's default 128 made the text aligner and cross-attention ~1/3 of a
# training step: 16 trained 1.5x the images per second (docs/demo.md)
TEXT_TOKENS = 16


# One stage through the real CLI, in-process (fluid_cli.cli.run_cli): passed in by the demo command,
# so this module never imports the CLI that imports it.
RunCli = Callable[[list[str]], None]


class _Clock:
    """Stage timings against the demo's budget, logged as each stage ends, so the progress a user
    watches says how much of the budget is used and what is left."""

    def __init__(self, minutes: float):
        self.start, self.budget_s, self.timings = time.perf_counter(), minutes * 60, {}
        self._lap = self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._lap, 1)
        self._lap = now
        log.info(
            "demo: %s took %.0f s; %.1f of %.1f min used, %.1f left",
            name, self.timings[name], self.elapsed() / 60, self.budget_s / 60,
            max(0.0, self.budget_s - self.elapsed()) / 60,
        )  # fmt: skip


def run_demo(settings: DemoSettings, run_cli: RunCli) -> Path:
    out, seed, size = Path(settings.out), settings.seed, settings.size
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock(settings.minutes)

    def _stage(name: str, done: Path, args: list[str], clock: _Clock) -> None:
        if done.exists():
            log.info("%s: already done (%s)", name, done)
        else:
            run_cli(args)
        clock.lap(name)

    world = ["--seed", str(seed), "--size", str(IMAGE_SIZE), "--layout", LAYOUT]  # data and tokenizer
    data, vae, t5 = out / "shapes", out / "tokenizers" / "vae", out / "tokenizers" / "t5"
    latents, text, run = out / "latents", out / "text", out / "run"
    _stage(
        "shapes-data",
        data / "info.json",
        ["shapes-data", str(data), "--records", str(settings.records), *world],
        clock,
    )
    steps = ["--steps", str(settings.tokenizer_steps)] if settings.tokenizer_steps else []
    _stage(
        "train-tokenizer vae",
        vae / "fluid-tokenizer.json",
        ["train-tokenizer", "vae", "--out", str(vae), *world, *steps],
        clock,
    )
    _stage(
        "train-tokenizer t5",
        t5 / "config.json",
        ["train-tokenizer", "t5", "--out", str(t5), "--seed", str(seed)],
        clock,
    )
    tars = str(data / "train" / "shapes-*.tar")
    _stage(
        "tokenize",
        latents / "manifest.json",
        [
            "tokenize",
            tars,
            "--tokenizer",
            str(vae),
            "--resolution",
            str(IMAGE_SIZE),
            "--no-flip",
            "--out",
            str(latents),
        ],  # fmt: skip
        clock,
    )
    _stage(
        "encode-text",
        text / "manifest.json",
        ["encode-text", tars, "--encoder", str(t5), "--max-length", str(TEXT_TOKENS), "--out", str(text)],
        clock,
    )
    reserve_s = _sample_reserve_s(vae)
    train_min = max(0.05, (clock.budget_s - clock.elapsed() - reserve_s) / 60)  # a few steps at least
    from fluid_cli.train.checkpoint import latest

    saved = latest(run)
    if saved:  # a rerun keeps what is done; an interrupted run is scored as it stands, not silently
        log.info(
            "train: %s already holds a checkpoint (%s); scoring it without training further "
            "(delete %s to train again)", run, saved.name, run,
        )  # fmt: skip
    else:
        log.info(
            "demo: training gets %.1f min; %.0f s are kept for sampling and scoring", train_min, reserve_s
        )
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
    clock.lap("train")
    result = _geneval(run, data, out / "geneval", settings.sample_steps, settings.cfg)
    clock.lap("sample + shapes-GenEval")
    ceiling = _ceiling(vae, out / "geneval" / "tokenizer-ceiling.json", seed)
    clock.lap("tokenizer ceiling")
    from fluid_cli.demo_report import write_report

    return write_report(out, run, data, result, ceiling, clock.timings, clock.elapsed())


def _sample_reserve_s(vae: Path) -> float:
    """Seconds to keep for sampling and scoring, from the VAE's measured seconds per training step."""
    try:
        report = json.loads((vae / "fluid-tokenizer.json").read_text())
        per_step = report["train_seconds"] / report["settings"]["steps"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return SAMPLE_RESERVE_S
    return max(MIN_SAMPLE_RESERVE_S, SAMPLE_RESERVE_PER_VAE_S * per_step * 800)


def _recipe() -> Path:
    from importlib import resources

    return Path(str(resources.files("fluid_cli") / "data" / "recipes" / "demo.toml"))


def _geneval(run: Path, data: Path, root: Path, steps: int, cfg: float) -> dict:
    from fluid_cli.eval.geneval_run import generate
    from fluid_cli.shapes.geneval import score_shapes_folder

    bench = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines() if x.strip()]
    if not bench:
        raise FluidError(f"{data / 'heldout.jsonl'} holds no prompts; delete {data} and rerun the demo")
    sample = SampleRunSettings(checkpoint=run, out=root, sampling=SampleSettings(steps=steps, cfg=cfg), seed=0,
                               batch_size=64, images_per_prompt=IMAGES_PER_PROMPT, device="cpu")  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):
        generate(root, bench, sample)
    result = score_shapes_folder(root)
    (root / "shapes-geneval.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1) + "\n"
    )
    return result


def _ceiling(vae: Path, path: Path, seed: int) -> dict:
    """The tokenizer ceiling (shapes/quality.py), computed once and kept beside the scores."""
    if path.is_file():
        return json.loads(path.read_text())
    from fluid_cli.shapes.quality import tokenizer_ceiling

    result = tokenizer_ceiling(str(vae), seed, IMAGE_SIZE, LAYOUT, n=CEILING_IMAGES)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
