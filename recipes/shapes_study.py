"""The paper's study at CPU scale: four variants x three sizes on the shapes grid world.

    python recipes/shapes_study.py --out runs/shapes-study            # ~73 min on 2 CPU cores
    python recipes/shapes_study.py --out runs/shapes-study --sizes tiny --variants rand-cont

Prints a time estimate first, then runs every stage through the `fluid` CLI; a rerun skips what is
done (every stage and every run leaves a marker), so an interrupted study resumes. Stages:
  shapes-data (grid world: 64 px, one object per 16 px cell)
  -> train-tokenizer vae (patch-local, 16 tokens) and vq (--downsample 16: 16 codes), side by
     side on one thread each, + t5 -> tokenize (both) -> encode-text --max-length 16 (the demo's)
  -> the tokenizer ceilings (shapes-GenEval of each tokenizer's reconstructions)
  -> per (variant, size, seed): train (recipes/shapes-study.toml; equal images per run) -> sample
     the held-out prompts (--eval-images each) -> shapes-GenEval per tag (RUN/eval/ for
     fit-scaling) -> shape fidelity; two runs at a time, one thread each, largest first
  -> fit-scaling over all runs -> study.md / study.json / rows.json (+ grids) in --out.
The image-quality measure is the shapes world's own, "fidelity": the share of the objects in an image
that the exact detector calls unmistakable shapes of a class the prompt names (1.0 for the
generator's own images, 0 for blank ones; junk objects count against it), averaged over the
samples; FID's Inception weights cannot be had offline and would say little about 64 px shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "shapes-study.toml"
VARIANTS = ("rand-cont", "rast-cont", "rand-disc", "rast-disc")
SIZES = ("tiny", "mini", "small")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CRISP = 0.9  # detector confidence of an unmistakable shape (GenEval's counting threshold)
TEXT_TOKENS = 16  # the demo's: the shapes captions take at most 11 T5 tokens
# Training images/s of one run on one thread while a second run trains beside it, and the seconds of
# its evaluation (66 prompts x --eval-images 4), per (token kind, size): the means this study
# measured on the 2-core AVX-512 AMD EPYC of docs/shapes-study.md (study.json, `measured`;
# 2026-12-03), so the estimate printed up front is what this machine did. FIXED_S: data + both
# tokenizers side by side (the VQ, 120 s, is the longer) + tokenize x 2 + encode-text + the two
# ceilings, measured 2.7 min.
RATE = {("cont", "tiny"): 1145.0, ("disc", "tiny"): 1801.0, ("cont", "mini"): 494.0,
        ("disc", "mini"): 785.0, ("cont", "small"): 244.0, ("disc", "small"): 419.0}  # fmt: skip
EVAL_S = {("cont", "tiny"): 11.5, ("disc", "tiny"): 7.9, ("cont", "mini"): 18.8,
          ("disc", "mini"): 8.4, ("cont", "small"): 37.2, ("disc", "small"): 10.0}  # fmt: skip
FIXED_S = 165.0


@dataclass(frozen=True)
class Job:
    variant: str
    size: str
    seed: int

    @property
    def kind(self) -> str:
        return "cont" if self.variant.endswith("cont") else "disc"

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.size}" + (f"-s{self.seed}" if self.seed else "")


def plan(
    variants: list[str], sizes: list[str], seeds: int, seeded: list[str] | None = None, images: int = 20000
) -> list[Job]:
    """Every (variant, size) with seed 0, plus seeds 1.. for the smallest size (only the variants in
    `seeded`, default all), the longest first (so two workers finish together)."""
    jobs = [Job(v, s, 0) for s in sizes for v in variants]
    smallest = min(sizes, key=SIZES.index) if all(s in SIZES for s in sizes) else sizes[0]
    jobs += [Job(v, smallest, k) for k in range(1, seeds) for v in variants if seeded is None or v in seeded]
    return sorted(jobs, key=lambda j: -job_seconds(j, images))


def job_seconds(job: Job, images: int, rates: dict | None = None, evals: dict | None = None) -> float:
    """Estimated seconds of one run (training `images` + its evaluation) on one thread."""
    key = (job.kind, job.size)
    rate, ev = (rates or RATE).get(key, 20.0), (evals or EVAL_S).get(key, 150.0)
    return images / rate + ev


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of jobs taken in the given order by the first free of `workers` workers."""
    free = [0.0] * max(1, workers)
    for s in seconds:
        i = free.index(min(free))
        free[i] += s
    return max(free)


def estimate(jobs: list[Job], images: int, workers: int, fixed: float = FIXED_S) -> float:
    return fixed + makespan([job_seconds(j, images) for j in jobs], workers)


def shape_fidelity(root: Path) -> dict:
    """Per image, the share of its objects (components the detector keeps) that are unmistakable
    (detector confidence > 0.9, GenEval's counting threshold) shapes of a class the prompt names;
    no object = 0; mean over a GenEval folder. Ground-truth renders score 1.0, blank images 0; a
    formless blob reads as a circle, so a prompt without circles counts it against the image."""
    from PIL import Image

    from fluid_cli.errors import FluidError
    from fluid_cli.shapes.detector import detect

    per_image = []
    for folder in sorted(p for p in root.glob("[0-9]*") if (p / "metadata.jsonl").is_file()):
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        named = {c["class"] for c in meta.get("include", [])}
        for png in sorted((folder / "samples").glob("*.png")):
            found = detect(np.asarray(Image.open(png).convert("RGB")))
            good = [f.score > CRISP and f.shape in named for f in found]
            per_image.append(float(np.mean(good)) if found else 0.0)
    if not per_image:
        raise FluidError(f"no samples under {root}; rerun the study to generate them")
    return {"metric": "shape-fidelity", "fidelity": float(np.mean(per_image)), "images": len(per_image)}


# ---------------------------------------------------------------------------------------------
# verdicts: pure functions of the rows (tests/test_shapes_study.py)


def seed_spread(rows: list[dict], key=lambda r: r["geneval"]) -> float | None:
    """The largest difference between two seeds of the same (variant, size): the noise a
    difference between runs has to exceed. None without a repeated run."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        v = key(r)
        if v is not None:
            groups.setdefault((r["variant"], r["size"]), []).append(v)
    spreads = [max(v) - min(v) for v in groups.values() if len(v) > 1]
    return max(spreads) if spreads else None


def _mean(rows: list[dict], variant: str, size: str, key) -> float | None:
    vals = [key(r) for r in rows if r["variant"] == variant and r["size"] == size and key(r) is not None]
    return float(np.mean(vals)) if vals else None


def compare(rows: list[dict], pairs: list[tuple[str, str]], key, noise: float | None) -> dict:
    """a - b of the seed-mean of `key` per size for each (a, b) pair: how many differences exceed
    the noise in a's favour, in b's, and within it."""
    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    sizes += sorted({r["size"] for r in rows} - set(SIZES))
    diffs = []
    for a, b in pairs:
        for s in sizes:
            x, y = _mean(rows, a, s, key), _mean(rows, b, s, key)
            if x is not None and y is not None:
                diffs.append({"a": a, "b": b, "size": s, "diff": x - y})
    tol = noise if noise is not None else 0.0
    return {"diffs": diffs, "noise": noise, "for_a": sum(d["diff"] > tol for d in diffs),
            "for_b": sum(d["diff"] < -tol for d in diffs), "within": sum(abs(d["diff"]) <= tol for d in diffs)}  # fmt: skip


def verdict_from(c: dict) -> str:
    """held: more differences beyond the noise for a than for b (and none is enough: a majority);
    did not hold: the reverse; not measurable: most differences within the noise, or no noise known."""
    n = len(c["diffs"])
    if n == 0 or c["noise"] is None:
        return "not measurable"
    if c["for_a"] > n / 2:
        return "held"
    if c["for_b"] > n / 2:
        return "did not hold"
    if c["within"] >= n / 2:
        return "not measurable"
    return "mixed"


def power_law_verdict(fits: dict[str, dict], goal: float = 0.95) -> str:
    """Finding 3 from the val-loss fits {variant: {b, ci, r2}}: held when every variant's loss
    falls (b < 0, its interval below 0) with R^2 >= goal; did not hold when a loss rises (b > 0
    beyond its interval) or a fit is poor; mixed otherwise."""
    if not fits:
        return "not measurable"
    falls = [f["b"] < 0 and f["ci"][1] < 0 for f in fits.values()]
    good = [f["r2"] is not None and f["r2"] >= goal for f in fits.values()]
    if all(falls) and all(good):
        return "held"
    if any(f["b"] > 0 and f["ci"][0] > 0 for f in fits.values()):
        return "did not hold"
    if all(f["b"] < 0 for f in fits.values()):
        return "held in direction, not in fit quality" if not all(good) else "held, intervals wide"
    return "did not hold"


def correlation_verdict(r: float | None, span: float, noise: float | None, n: int = 0) -> str:
    """Finding 4 for one variant: lower loss with higher GenEval (r <= -0.8, and the Fisher-z 95%
    interval below 0 when n is given) over a GenEval range wider than the noise; not measurable when
    the range is within it; 'paper's sign, interval includes 0' when n runs are too few to tell."""
    if r is None or noise is None or span <= noise:
        return "not measurable"
    if r > -0.8:
        return "did not hold"
    if n > 3 and math.tanh(math.atanh(max(r, -0.999999)) + 1.96 / math.sqrt(n - 3)) >= 0:
        return "paper's sign, interval includes 0"
    return "held"


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument(
        "--images", type=int, default=None, help="training images per run (default: the recipe's)"
    )
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the smallest size")
    ap.add_argument(
        "--seeded", nargs="+", default=None, help="variants that get the extra seeds (default all)"
    )
    ap.add_argument("--eval-images", type=int, default=4, help="images per held-out prompt (>= 2)")
    ap.add_argument("--workers", type=int, default=2, help="runs trained side by side, one thread each")
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--tokenizer-steps", type=int, default=None, help="default: train-tokenizer's (800)")
    ap.add_argument("--seed", type=int, default=0, help="data and tokenizer seed")
    ap.add_argument("--max-prompts", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests
    ap.add_argument("--job", nargs=3, metavar=("VARIANT", "SIZE", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and stop")
    ap.add_argument("--setup-only", action="store_true", help="make the data and tokenizers, then stop")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # run_cli logs each `$ fluid ...`
    recipe = tomllib.loads(RECIPE.read_text())["train"]
    a.batch = int(recipe["batch_size"])
    a.steps = math.ceil(a.images / a.batch) if a.images else int(recipe["steps"])
    a.images = a.steps * a.batch
    if a.job:
        return run_job(a.out, Job(a.job[0], a.job[1], int(a.job[2])), a)
    jobs = plan(a.variants, a.sizes, a.seeds, a.seeded, a.images)
    est = estimate(jobs, a.images, a.workers)
    print(f"shapes study: {len(jobs)} runs ({len(a.variants)} variants x {len(a.sizes)} sizes + "
          f"{len(jobs) - len(a.variants) * len(a.sizes)} extra seeds), {a.images} images each "
          f"({a.steps} steps of {a.batch}), {a.workers} side by side; estimated {est / 60:.0f} min "
          f"(data + tokenizers {FIXED_S / 60:.0f} min) from the throughput measured on a 2-core AMD EPYC",
          file=sys.stderr, flush=True)  # fmt: skip
    if a.estimate:
        return
    study(a, jobs)


def _cli(args: list[str]) -> None:
    from fluid_cli.cli import run_cli

    run_cli(args)


def stage(done: Path, *args: str) -> None:
    if done.exists():
        print(f"done already: {done}", file=sys.stderr)
    else:
        _cli(list(args))


def _worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _side_by_side(cmds: list[tuple[Path, list[str], Path]]) -> None:
    """Commands (marker, argv, log) not yet done, run as parallel subprocesses; fail loudly."""
    procs = []
    for done, argv, logf in cmds:
        if done.exists():
            print(f"done already: {done}", file=sys.stderr)
            continue
        logf.parent.mkdir(parents=True, exist_ok=True)
        print(f"$ {' '.join(argv)}  (log: {logf})", file=sys.stderr, flush=True)
        procs.append(
            (subprocess.Popen(argv, stdout=logf.open("w"), stderr=subprocess.STDOUT, env=_worker_env()), logf)
        )
    for p, logf in procs:
        if p.wait() != 0:
            sys.exit(f"error: {' '.join(p.args)} failed (exit {p.returncode}); see {logf}")


def study(a: argparse.Namespace, jobs: list[Job]) -> None:
    from tqdm import tqdm

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data, tok = out / "shapes", out / "tokenizers"
    tars = str(data / "train" / "shapes-*.tar")
    t0 = time.perf_counter()
    stage(data / "info.json", "shapes-data", str(data), "--records", str(a.records), "--seed", str(a.seed))
    fluid = [sys.executable, "-m", "fluid_cli"]
    steps = ["--steps", str(a.tokenizer_steps)] if a.tokenizer_steps else []
    seed = ["--seed", str(a.seed)]
    _side_by_side([
        (tok / "vae" / "fluid-tokenizer.json", [*fluid, "train-tokenizer", "vae", "--out", str(tok / "vae"), *steps, *seed],
         tok / "vae.log"),
        # one code per 16 px cell: 16 tokens, as the VAE's 16
        (tok / "vq" / "fluid-tokenizer.json", [*fluid, "train-tokenizer", "vq", "--out", str(tok / "vq"), *steps, *seed,
         "--downsample", "16"], tok / "vq.log"),
    ])  # fmt: skip
    stage(tok / "t5" / "config.json", "train-tokenizer", "t5", "--out", str(tok / "t5"), *seed)
    for kind in ("vae", "vq"):
        stage(out / f"latents-{kind}" / "manifest.json", "tokenize", tars, "--tokenizer", str(tok / kind),
              "--resolution", "64", "--no-flip", "--out", str(out / f"latents-{kind}"))  # fmt: skip
    stage(out / "text" / "manifest.json", "encode-text", tars, "--encoder", str(tok / "t5"),
          "--max-length", str(TEXT_TOKENS), "--out", str(out / "text"))  # fmt: skip
    ceilings = {kind: ceiling(tok / kind, out / f"ceiling-{kind}.json", a.seed) for kind in ("vae", "vq")}
    setup_s = time.perf_counter() - t0
    print(f"data and tokenizers: {setup_s / 60:.1f} min", file=sys.stderr, flush=True)
    if a.setup_only:
        return
    run_jobs(a, jobs, tqdm)
    rows = [json.loads((out / "runs" / j.name / "result.json").read_text()) for j in jobs]
    rows.sort(
        key=lambda r: (
            SIZES.index(r["size"]) if r["size"] in SIZES else 9,
            VARIANTS.index(r["variant"]),
            r["seed"],
        )
    )
    fits = {}
    if len({r["size"] for r in rows}) >= 3:  # a power law needs three sizes
        _cli(["fit-scaling", *[str(out / "runs" / r["run"]) for r in rows], "--out", str(out / "scaling")])
        fits = json.loads((out / "scaling" / "summary.json").read_text())
    grids = write_grids(out, rows)
    measured = measured_rates(rows)
    # a resumed study adds up its invocations (setup: the first, the one that ran the stages)
    prev = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    invocations = [*prev.get("invocations", []), {"minutes": round((time.perf_counter() - t0) / 60, 1),
                                                  "setup_minutes": round(setup_s / 60, 1)}]  # fmt: skip
    table = {"rows": rows, "ceilings": ceilings, "images_per_run": a.images, "steps": a.steps,
             "batch": a.batch, "eval_images_per_prompt": a.eval_images, "workers": a.workers,
             "minutes": round(sum(i["minutes"] for i in invocations), 1), "invocations": invocations,
             "measured": measured, "grids": grids}  # fmt: skip
    table["findings"] = findings(rows, fits)
    (out / "study.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "rows.json").write_text(json.dumps([public_row(r) for r in rows], indent=1) + "\n")
    (out / "study.md").write_text(markdown(rows, ceilings) + "\n" + findings_md(table["findings"]))
    print(out / "study.md")


def run_jobs(a: argparse.Namespace, jobs: list[Job], tqdm) -> None:
    """The runs, `a.workers` at a time (one thread each), each a subprocess of this script with
    --job; a run whose result.json exists is skipped. The bar counts estimated run-seconds."""
    todo = [j for j in jobs if not (a.out / "runs" / j.name / "result.json").is_file()]
    cost = {j: job_seconds(j, a.images) for j in todo}
    bar = tqdm(total=round(sum(cost.values())), unit="run-s", desc=f"runs 0/{len(todo)}", smoothing=0)
    running: list[tuple[subprocess.Popen, Job, float]] = []
    done = 0
    while todo or running:
        while todo and len(running) < a.workers:
            j = todo.pop(0)
            run = a.out / "runs" / j.name
            run.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, __file__, "--out", str(a.out), "--images", str(a.images),
                    "--eval-images", str(a.eval_images), *(["--max-prompts", str(a.max_prompts)] if a.max_prompts else []), "--job", j.variant, j.size, str(j.seed)]  # fmt: skip
            p = subprocess.Popen(
                argv, stdout=(run / "log.txt").open("a"), stderr=subprocess.STDOUT, env=_worker_env()
            )
            running.append((p, j, time.perf_counter()))
            tqdm.write(f"start {j.name} (~{cost[j] / 60:.1f} min; log {run / 'log.txt'})")
        time.sleep(2)
        for item in list(running):
            p, j, start = item
            if p.poll() is None:
                continue
            running.remove(item)
            if p.returncode != 0:
                bar.close()
                sys.exit(
                    f"error: run {j.name} failed (exit {p.returncode}); see {a.out / 'runs' / j.name / 'log.txt'}"
                )
            done += 1
            bar.update(round(cost[j]))
            bar.set_description(f"runs {done}/{done + len(todo) + len(running)}")
            tqdm.write(f"done  {j.name} in {(time.perf_counter() - start) / 60:.1f} min")
    bar.close()


def ceiling(tokenizer: Path, path: Path, seed: int) -> dict:
    """shapes-GenEval of the tokenizer's reconstructions of 300 training images (the demo's)."""
    if not path.is_file():
        from fluid_cli.shapes.quality import tokenizer_ceiling

        path.write_text(
            json.dumps(tokenizer_ceiling(str(tokenizer), seed, 64, "grid", n=300), indent=1) + "\n"
        )
    return json.loads(path.read_text())


def run_job(out: Path, job: Job, a: argparse.Namespace) -> None:
    """One run: train, sample the held-out prompts, score; writes RUN/result.json last."""
    import contextlib

    import torch

    torch.set_num_threads(1)
    run = out / "runs" / job.name
    kind = "vae" if job.kind == "cont" else "vq"
    t0, done = time.perf_counter(), run / "DONE"
    stage(done, "train", "--recipe", str(RECIPE), "--variant", job.variant, "--size", job.size,
          "--image-tokens", str(out / f"latents-{kind}"), "--text", str(out / "text"), "--out", str(run),
          "--seed", str(job.seed), "--steps", str(a.steps))  # fmt: skip
    if not done.exists():  # the training time lives in the marker, so a rerun still reports it
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    train_s = float(done.read_text() or 0)
    t1 = time.perf_counter()
    gen = run / "geneval"
    result = shapes_geneval(run, out / "shapes" / "heldout.jsonl", gen, a.eval_images, a.max_prompts)
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "geneval.json").write_text(json.dumps(
        {"metric": "geneval", "benchmark": "shapes-geneval", "overall": result["overall"], "tags": result["tags"],
         "counts": result["counts"], "step": vals[-1]["step"] if vals else None}) + "\n")  # fmt: skip
    fid = shape_fidelity(gen)
    (run / "eval" / "fidelity.json").write_text(json.dumps(fid) + "\n")
    eval_s = time.perf_counter() - t1
    config = json.loads((run / "config.json").read_text())
    steps = vals[-1]["step"] if vals else None
    row = {
        "run": job.name, "variant": job.variant, "size": job.size, "seed": job.seed, "params": config.get("params"),
        "steps": steps, "images_seen": steps * a.batch if steps else None, "val_loss": vals[-1]["val_loss"] if vals else None,
        "geneval": result["overall"], "tags": result["tags"], "eval_images": result["images"],
        "fidelity": fid["fidelity"], "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
    }  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        (run / "result.json").unlink()
    (run / "result.json").write_text(json.dumps(row, indent=1) + "\n")


def shapes_geneval(
    run: Path, heldout: Path, root: Path, per_prompt: int, max_prompts: int | None = None
) -> dict:
    """Sample `per_prompt` images per held-out prompt (as `fluid demo`: K=16, cfg 5) and score them."""
    from fluid_cli.eval.geneval_run import generate
    from fluid_cli.settings import DemoSettings, SampleRunSettings, SampleSettings
    from fluid_cli.shapes.geneval import score_shapes_folder

    bench = [json.loads(x) for x in heldout.read_text().splitlines() if x.strip()][:max_prompts]
    demo = DemoSettings()  # the demo's sampling (K, cfg), for every variant: one source of truth
    sampling = SampleSettings(steps=demo.sample_steps, cfg=demo.cfg)
    sample = SampleRunSettings(checkpoint=run, out=root, sampling=sampling, seed=0,
                               batch_size=64, images_per_prompt=per_prompt, device="cpu")  # fmt: skip
    generate(root, bench, sample)
    result = score_shapes_folder(root)
    (root / "shapes-geneval.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "rows"}) + "\n"
    )
    return result


def measured_rates(rows: list[dict]) -> dict:
    """images/s of training and eval seconds per (kind, size), for RATE / EVAL_S next time."""
    out: dict[str, dict] = {}
    for r in rows:
        k = f"{'cont' if r['variant'].endswith('cont') else 'disc'}-{r['size']}"
        m = out.setdefault(k, {"images_per_s": [], "eval_s": []})
        if r["images_seen"] and r["train_s"]:
            m["images_per_s"].append(round(r["images_seen"] / r["train_s"], 1))
        m["eval_s"].append(r["eval_s"])
    return out


def public_row(r: dict) -> dict:
    """One row of docs/shapes-study.json: the run's numbers, readable by `fluid fit-scaling --table`."""
    return {"run": r["run"], "variant": r["variant"], "size": r["size"], "seed": r["seed"], "params": r["params"],
            "steps": r["steps"], "batch": r["images_seen"] // r["steps"] if r["steps"] else None,
            "images_seen": r["images_seen"], "train_wall_s": r["train_s"], "eval_wall_s": r["eval_s"],
            "val_loss": r["val_loss"], "geneval": r["geneval"],
            "geneval_tags": {t: r["tags"].get(t) for t in TAGS}, "fidelity": r["fidelity"]}  # fmt: skip


def write_grids(out: Path, rows: list[dict], per_row: int = 5) -> dict:
    """Per tag, one row per variant at the largest size (seed 0): the first image of each of the
    tag's first `per_row` prompts. OUT/grids/<tag>.png."""
    from fluid_cli.demo_report import _grid

    sizes = [r["size"] for r in rows]
    big = max(sizes, key=lambda s: SIZES.index(s) if s in SIZES else -1)
    chosen = [r for r in rows if r["size"] == big and r["seed"] == 0]
    (out / "grids").mkdir(exist_ok=True)
    made = {}
    for tag in TAGS:
        lines = []
        for r in chosen:
            gen = out / "runs" / r["run"] / "geneval"
            folders = [
                p
                for p in sorted(gen.glob("[0-9]*"))
                if f'"tag": "{tag}"' in (p / "metadata.jsonl").read_text()
            ]
            pngs = [sorted((p / "samples").glob("*.png"))[0] for p in folders[:per_row]]
            if pngs:
                lines.append(pngs)
        if lines:
            path = out / "grids" / f"{big}-{tag}.png"
            _grid(lines, scale=1).save(path)
            made[tag] = {"path": str(path), "rows": [r["variant"] for r in chosen], "size": big}
    return made


# the smallest difference called real even when two seeds happened to agree: a tag is scored on
# 10-40 images (one image of single_object = 0.1), overall on ~130
OVERALL_FLOOR, TAG_FLOOR = 0.02, 0.1


def _floor(spread: float | None, floor: float) -> float | None:
    return None if spread is None else max(spread, floor)


def findings(rows: list[dict], fits: dict) -> dict:
    """The paper's five findings, each with its numbers and a verdict (docs/shapes-study.md)."""
    gen = lambda r: r["geneval"]  # noqa: E731
    noise = _floor(seed_spread(rows, gen), OVERALL_FLOOR)
    tag_noise = {t: _floor(seed_spread(rows, lambda r, t=t: r["tags"].get(t)), TAG_FLOOR) for t in TAGS}
    fid_noise = _floor(seed_spread(rows, lambda r: r["fidelity"]), OVERALL_FLOOR)
    order = [("rand-cont", "rast-cont"), ("rand-disc", "rast-disc")]
    tokens = [("rand-cont", "rand-disc"), ("rast-cont", "rast-disc")]
    f1 = {"overall": compare(rows, order, gen, noise)}
    for t in ("position", "counting"):
        f1[t] = compare(rows, order, lambda r, t=t: r["tags"].get(t), tag_noise[t])
    f1["verdict"] = verdict_from(f1["overall"])
    f2 = {
        "geneval": compare(rows, tokens, gen, noise),
        "fidelity": compare(rows, tokens, lambda r: r["fidelity"], fid_noise),
    }
    f2["verdict_geneval"], f2["verdict_fidelity"] = verdict_from(f2["geneval"]), verdict_from(f2["fidelity"])
    loss_fits = {f["variant"]: {"b": f["b"], "ci": f["b_ci"], "r2": f["r2_log"], "n": f["n"]}
                 for f in fits.get("fits", []) if f["what"] == "val_loss vs params"}  # fmt: skip
    f3 = {"fits": loss_fits, "verdict": power_law_verdict(loss_fits)}
    f4 = {}
    for v in VARIANTS:
        pts = [(r["val_loss"], r["geneval"]) for r in rows if r["variant"] == v and r["val_loss"] is not None]
        if len(pts) >= 3:
            x, y = np.array(pts).T
            rr = float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else None
            span = float(y.max() - y.min())
            f4[v] = {
                "r": rr,
                "n": len(pts),
                "geneval_span": span,
                "verdict": correlation_verdict(rr, span, noise, len(pts)),
            }
    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    pairs = [(v, sizes[0], sizes[-1]) for v in VARIANTS]
    f5_diffs = []
    for v, lo, hi in pairs:
        x, y = _mean(rows, v, hi, gen), _mean(rows, v, lo, gen)
        if x is not None and y is not None:
            f5_diffs.append({"a": f"{v} {hi}", "b": f"{v} {lo}", "size": hi, "diff": x - y})
    tol = noise or 0.0
    f5 = {"diffs": f5_diffs, "noise": noise, "for_a": sum(d["diff"] > tol for d in f5_diffs),
          "for_b": sum(d["diff"] < -tol for d in f5_diffs), "within": sum(abs(d["diff"]) <= tol for d in f5_diffs)}  # fmt: skip
    f5["verdict"] = verdict_from(f5)
    return {"spread": seed_spread(rows, gen), "noise": noise, "tag_noise": tag_noise, "fidelity_noise": fid_noise,
            "1_random_vs_raster": f1, "2_continuous_vs_discrete": f2, "3_power_law": f3,
            "4_loss_predicts_geneval": f4, "5_larger_scores_higher": f5}  # fmt: skip


def _diffs_md(c: dict) -> str:
    return "; ".join(f"{d['a']} - {d['b']} at {d['size']}: {d['diff']:+.3f}" for d in c["diffs"])


def findings_md(f: dict) -> str:
    n = f["noise"]
    lines = [f"Seed-to-seed spread of GenEval overall (largest over the repeated runs): {f['spread']}; a "
             f"difference counts when it exceeds {n} (the spread, at least {OVERALL_FLOOR}; tags: at least "
             f"{TAG_FLOOR})\n"]  # fmt: skip
    f1 = f["1_random_vs_raster"]
    lines.append(f"1. random vs raster: **{f1['verdict']}** (overall: {_diffs_md(f1['overall'])}; position: "
                 f"{_diffs_md(f1['position'])}; counting: {_diffs_md(f1['counting'])})")  # fmt: skip
    f2 = f["2_continuous_vs_discrete"]
    lines.append(f"2. continuous vs discrete: GenEval **{f2['verdict_geneval']}** ({_diffs_md(f2['geneval'])}); "
                 f"fidelity **{f2['verdict_fidelity']}** ({_diffs_md(f2['fidelity'])}; fidelity seed spread "
                 f"{f['fidelity_noise']})")  # fmt: skip
    f3 = f["3_power_law"]
    fits = "; ".join(f"{v}: b = {x['b']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}], R^2 = {x['r2']:.3f}"
                     for v, x in f3["fits"].items())  # fmt: skip
    lines.append(f"3. val loss power law: **{f3['verdict']}** ({fits})")
    f4 = f["4_loss_predicts_geneval"]
    lines.append("4. val loss predicts GenEval: " + "; ".join(
        f"{v}: r = {x['r'] if x['r'] is None else round(x['r'], 2)} over {x['n']} runs, GenEval span "
        f"{x['geneval_span']:.3f}: **{x['verdict']}**" for v, x in f4.items()))  # fmt: skip
    f5 = f["5_larger_scores_higher"]
    lines.append(f"5. larger scores higher: **{f5['verdict']}** ({_diffs_md(f5)})")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], ceilings: dict) -> str:
    head = ("| variant | size | seed | params | images | val loss | overall | " + " | ".join(TAGS)
            + " | fidelity | train s | eval s |\n")  # fmt: skip
    head += "|" + "---|" * (10 + len(TAGS)) + "\n"  # one per header cell
    lines = [
        f"| {r['variant']} | {r['size']} | {r['seed']} | {r['params'] / 1e6:.2f}M | {r['images_seen']} | "
        f"{r['val_loss']:.4f} | {r['geneval']:.3f} | "
        + " | ".join(f"{r['tags'].get(t, float('nan')):.2f}" for t in TAGS)
        + f" | {r['fidelity']:.3f} | {r['train_s']:.0f} | {r['eval_s']:.0f} |"
        for r in rows
    ]
    for kind, c in ceilings.items():
        lines.append(f"| ceiling ({kind}) | | | | | | {c['overall']:.3f} | "
                     + " | ".join(f"{c['tags'].get(t, float('nan')):.2f}" for t in TAGS) + " | | | |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    from fluid_cli.errors import FluidError

    try:
        main()
    except FluidError as e:  # one line, as the fluid CLI prints its errors
        sys.exit(f"error: {e}")
