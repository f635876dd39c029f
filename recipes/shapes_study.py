"""The paper's study at CPU scale: four variants x three sizes on the built-in shapes world.

    python recipes/shapes_study.py --out runs/shapes-study            # ~1 h on 2 CPU cores
    python recipes/shapes_study.py --out runs/shapes-study --sizes tiny --variants rand-cont

Every stage is a `fluid` command (run in-process, as `fluid demo` does), and a rerun skips what is
done, so an interrupted study resumes. Stages:
  shapes-data -> train-tokenizer vae, vq (16 tokens each, one per 16 px cell of the 64 px grid
  world: VAE 8x8x4 grouped 2x2, VQ 4x4 codes) + t5
  -> tokenize (both tokenizers) -> encode-text
  -> per (variant, size): train (recipes/shapes-study.toml) -> eval-geneval --detector shapes on
     the held-out prompts (written to RUN/eval/ for fit-scaling) -> shape fidelity of the samples
  -> fit-scaling over all runs -> study.md / study.json (the table behind docs/shapes-study.md).
The image-quality measure is the shapes world's own, "fidelity": the share of the objects in an image
that the exact detector calls unmistakable shapes of a class the prompt names (1.0 for the
generator's own images, 0 for blank ones; junk objects count against it), averaged over the
samples; FID's Inception weights cannot be had offline and would say little about 32 px shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from fluid_cli.cli import run_cli
from fluid_cli.errors import FluidError

HERE = Path(__file__).resolve().parent
VARIANTS = ("rand-cont", "rast-cont", "rand-disc", "rast-disc")
SIZES = ("tiny", "mini", "small")
CRISP = 0.9  # detector confidence of an unmistakable shape (GenEval's counting threshold)


def stage(done: Path, *args: str) -> None:
    if done.exists():
        print(f"done already: {done}", file=sys.stderr)
    else:
        run_cli(list(args))


def shape_fidelity(root: Path) -> dict:
    """Per image, the share of its objects (components the detector keeps) that are unmistakable
    (detector confidence > 0.9, GenEval's counting threshold) shapes of a class the prompt names;
    no object = 0; mean over a GenEval folder. Ground-truth renders score 1.0, blank images 0; a
    formless blob reads as a circle, so a prompt without circles counts it against the image."""
    from PIL import Image

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's train.steps")
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--tokenizer-steps", type=int, default=None, help="default: train-tokenizer's")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # run_cli logs each `$ fluid ...`
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data, tok = out / "shapes", out / "tokenizers"
    tars = str(data / "train" / "shapes-*.tar")
    t0 = time.perf_counter()
    stage(data / "info.json", "shapes-data", str(data), "--records", str(a.records), "--seed", str(a.seed))
    steps = ["--steps", str(a.tokenizer_steps)] if a.tokenizer_steps else []
    stage(tok / "vae" / "fluid-tokenizer.json", "train-tokenizer", "vae", "--out", str(tok / "vae"), *steps)
    # one code per 16 px cell: 16 tokens, as the VAE's 16
    stage(tok / "vq" / "fluid-tokenizer.json", "train-tokenizer", "vq", "--out", str(tok / "vq"), *steps,
          "--downsample", "16")  # fmt: skip
    stage(tok / "t5" / "config.json", "train-tokenizer", "t5", "--out", str(tok / "t5"))
    for kind in ("vae", "vq"):
        stage(out / f"latents-{kind}" / "manifest.json", "tokenize", tars, "--tokenizer", str(tok / kind),
              "--resolution", "64", "--no-flip", "--out", str(out / f"latents-{kind}"))  # fmt: skip
    stage(
        out / "text" / "manifest.json",
        "encode-text",
        tars,
        "--encoder",
        str(tok / "t5"),
        "--out",
        str(out / "text"),
    )
    rows = []
    for size in a.sizes:
        for variant in a.variants:
            rows.append(run_one(out, variant, size, a))
    if len(set(a.sizes)) >= 3:  # a power law needs three sizes
        run_cli(["fit-scaling", *[str(out / "runs" / f"{r['variant']}-{r['size']}") for r in rows],
              "--out", str(out / "scaling")])  # fmt: skip
    table = {"rows": rows, "minutes": round((time.perf_counter() - t0) / 60, 1)}
    (out / "study.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "study.md").write_text(markdown(rows))
    print(out / "study.md")


def run_one(out: Path, variant: str, size: str, a: argparse.Namespace) -> dict:
    run = out / "runs" / f"{variant}-{size}"
    kind = "vae" if variant.endswith("cont") else "vq"
    sets = [] if a.steps is None else ["--steps", str(a.steps)]
    t0, done = time.perf_counter(), run / "DONE"
    stage(done, "train", "--recipe", str(HERE / "shapes-study.toml"), "--variant", variant, "--size", size,
          "--image-tokens", str(out / f"latents-{kind}"), "--text", str(out / "text"), "--out", str(run),
          "--seed", str(a.seed), *sets)  # fmt: skip
    if not done.exists():  # the training time lives in the marker, so a rerun still reports it
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    train_s = float(done.read_text() or 0)
    gen = run / "geneval"
    stage(gen / "geneval.json", "eval-geneval", str(run), "--out", str(gen), "--run", str(run), "--detector", "shapes",
          "--prompts", str(out / "shapes" / "heldout.jsonl"), "--steps", "16", "--cfg", "3", "--device", "cpu",
          "--batch-size", "64", "--json")  # fmt: skip
    summary = json.loads((gen / "geneval.json").read_text()) if (gen / "geneval.json").is_file() else {}
    fid = shape_fidelity(gen)
    (run / "eval" / "fidelity.json").write_text(json.dumps(fid) + "\n")
    config = json.loads((run / "config.json").read_text())
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]
    return {
        "variant": variant,
        "size": size,
        "params": config.get("params"),
        "steps": vals[-1]["step"] if vals else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "geneval": summary.get("overall"),
        "tags": summary.get("tags", {}),
        "fidelity": fid["fidelity"],
        "train_s": round(train_s, 1),
    }


def markdown(rows: list[dict]) -> str:
    tags = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    head = (
        "| variant | size | params | steps | val loss | overall | "
        + " | ".join(tags)
        + " | fidelity | train s |\n"
    )
    head += "|" + "---|" * (8 + len(tags)) + "\n"
    lines = [
        f"| {r['variant']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['val_loss']:.4f} | "
        f"{r['geneval']:.3f} | "
        + " | ".join(f"{r['tags'].get(t, float('nan')):.2f}" for t in tags)
        + f" | {r['fidelity']:.3f} | {r['train_s']:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except FluidError as e:  # one line, as the fluid CLI prints its errors
        sys.exit(f"error: {e}")
