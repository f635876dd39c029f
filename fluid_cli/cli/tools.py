"""Tools around the pipeline: `fluid shapes-data`, `fluid train-tokenizer` (the embedded shapes
world) and `fluid demo` (every stage in order)."""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, finite, need, writable_dir
from fluid_cli.registry import SIZES
from fluid_cli.settings import DemoSettings

D = DemoSettings  # the defaults below


@app.command("shapes-data")
def shapes_data_cmd(
    out: Path = typer.Argument(
        ..., help="Output dir: train/shapes-NNNNN.tar (webdataset), heldout.jsonl, heldout.txt, info.json."
    ),
    records: int = typer.Option(10000, help="Training records (image + caption + GenEval metadata)."),
    seed: int = typer.Option(0, help="Seed: record i is drawn from numpy's Generator seeded (seed, i)."),
    size: int = typer.Option(64, help="Image side in pixels: 64 (the default) or 32 (free layout only)."),
    layout: str = typer.Option(
        "grid", help="grid: one object per cell of a 4x4 grid (one image token each); free: anywhere."
    ),
) -> None:
    """Write the embedded shapes dataset (no downloads). Prints the output dir.

    1-4 coloured shapes on grey, captioned in GenEval's six tags with GenEval metadata, as webdataset
    tars for `fluid tokenize` / `fluid encode-text`, plus held-out prompts (heldout.jsonl in GenEval's
    schema, heldout.txt for `fluid sample`) whose captions never occur in training. See docs/shapes.md.

    Example: fluid shapes-data data/shapes && fluid tokenize 'data/shapes/train/*.tar' --tokenizer tok/vae --resolution 32 --no-flip --out data/shapes-latents
    """
    at_least(1, records=records)
    writable_dir(out, "OUT")
    from fluid_cli.shapes.generator import write_shapes

    typer.echo(str(write_shapes(out, records=records, seed=seed, size=size, layout=layout)))


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    kind: str = typer.Argument(
        ..., help="vae (diffusers AutoencoderKL) | vq (diffusers VQModel) | t5 (T5 encoder + SentencePiece)."
    ),
    out: Path = typer.Option(..., "--out", help="Directory written with save_pretrained."),
    size: int = typer.Option(64, help="vae/vq: image side the tokenizer is trained at (64 | 32)."),
    layout: str = typer.Option("grid", help="vae/vq: the shapes layout it is trained on (grid | free)."),
    patch: int = typer.Option(
        0,
        help="vae/vq: cell side in pixels that is encoded alone; 0 = one grid cell (grid), whole image (free).",
    ),
    steps: int | None = typer.Option(
        None,
        help="vae/vq: training steps (default 800: 1-5 CPU-minutes for the grid world's vae; the free layout wants 3000).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="vae/vq: images per step (default 64; the free layout wants 4)."
    ),
    lr: float | None = typer.Option(
        None, help="vae/vq: peak AdamW learning rate (default vae 2e-3, vq 5e-4), annealed to zero."
    ),
    downsample: int = typer.Option(
        0, help="vae/vq: pixels per latent side; 0 = size/8 (64 px: VAE 16 tokens, VQ 64 codes; vq 16: 16)."
    ),
    vocab: int = typer.Option(512, help="vq: codebook size."),
    kl_weight: float | None = typer.Option(
        None,
        "--kl-weight",
        help="vae: KL weight against the summed reconstruction loss (default 1e-6, as SD).",
    ),
    width: int = typer.Option(64, help="t5: d_model (the text states' width)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the training images."),
    threads: int = typer.Option(
        1, help="torch CPU threads (0: torch's default); small convs gain little from more."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report (quality, timings) as JSON."),
) -> None:
    """Train a shapes image tokenizer, or build the shapes T5 text encoder, offline. Prints OUT.

    vae / vq train on fresh generator images and report PSNR and shapes-GenEval of reconstructions on
    held-out images (OUT/fluid-tokenizer.json); `fluid tokenize --tokenizer OUT` loads them. t5 trains a
    SentencePiece unigram tokenizer on the shapes captions and saves a frozen random T5 encoder;
    `fluid encode-text --encoder OUT` loads it.
    """
    need(kind in ("vae", "vq", "t5"), f"unknown tokenizer kind {kind!r}; valid: vae, vq, t5")
    at_least(1, size=size, steps=steps, batch_size=batch_size, vocab=vocab, width=width)
    at_least(0, downsample=downsample, threads=threads, patch=patch)
    need(layout in ("grid", "free"), f"--layout must be grid or free, got {layout!r}")
    finite(lr=lr, kl_weight=kl_weight)
    need(lr is None or lr > 0, f"--lr must be positive, got {lr}")
    need(kl_weight is None or kl_weight >= 0, f"--kl-weight must not be negative, got {kl_weight}")
    writable_dir(out)
    import json

    from fluid_cli.shapes.tokenizers import run_train_tokenizer

    report = run_train_tokenizer(
        kind, out, threads, size=size, layout=layout, patch=patch, steps=steps, batch_size=batch_size, lr=lr, downsample=downsample,
        vocab=vocab, width=width, seed=seed, kl_weight=kl_weight,
    )  # fmt: skip
    typer.echo(json.dumps(report) if json_out else str(out))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(D.out, "--out", help="Where data, tokenizers, the run and report.md go."),
    minutes: float = typer.Option(
        D.minutes, "--minutes", help="Time budget for the whole pipeline; training gets what is left."
    ),
    records: int = typer.Option(D.records, "--records", help="Training images of the shapes dataset."),
    size: str = typer.Option(
        D.size, "--size", help=f"Registry size of the rand-cont model: {' | '.join(SIZES)}."
    ),
    tokenizer_steps: int | None = typer.Option(
        D.tokenizer_steps,
        "--tokenizer-steps",
        help="Training steps of the shapes VAE (default: train-tokenizer's, 800; docs/shapes.md).",
    ),
    sample_steps: int = typer.Option(
        D.sample_steps, "--steps", help="K, random-order sampling steps (at most the 16 tokens)."
    ),
    cfg: float = typer.Option(D.cfg, "--cfg", help="Classifier-free guidance scale for the samples."),
    seed: int = typer.Option(D.seed, help="Seed of the data, the tokenizers and the model."),
) -> None:
    """Run the whole pipeline offline on the built-in shapes benchmark and write a report. Prints its path.

    shapes-data -> train-tokenizer vae + t5 -> tokenize -> encode-text -> train rand-cont -> sample the
    evaluation prompts -> shapes-GenEval -> report.md (scores per tag next to the tokenizer's ceiling,
    image grids, loss curve). About 15 minutes on 2 CPU cores; a rerun skips finished stages.
    """
    from fluid_cli.registry import get_size

    get_size(size)  # refused now, not after minutes of data and tokenizer stages
    finite(minutes=minutes, cfg=cfg)
    need(minutes > 0, f"--minutes must be positive, got {minutes}")
    need(cfg >= 0, f"--cfg must not be negative, got {cfg}")
    at_least(1, records=records, tokenizer_steps=tokenizer_steps, steps=sample_steps)
    writable_dir(out)
    from fluid_cli.cli.entry import run_cli
    from fluid_cli.demo import run_demo

    settings = DemoSettings(out=out, minutes=minutes, records=records, size=size, seed=seed,
                            tokenizer_steps=tokenizer_steps, sample_steps=sample_steps, cfg=cfg)  # fmt: skip
    typer.echo(str(run_demo(settings, run_cli)))
