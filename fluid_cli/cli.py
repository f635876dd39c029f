"""The `fluid` command line: thin Typer commands that parse options and call one stage each.

Heavy imports (torch, diffusers, transformers) happen inside the commands, so `fluid --help` stays
fast. Logs and progress go to stderr; stdout carries only data (an output path, or JSON).
Run `fluid --help` to see every command.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from fluid_cli.errors import FluidError, RequeueExit

app = typer.Typer(
    name="fluid",
    help="Fluid: autoregressive text-to-image models over continuous or discrete tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("FLUID_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def main() -> None:
    """Console-script entry point. Typer's standalone mode handles usage errors (one line, exit 2);
    a FluidError becomes `error: ...` on stderr and exit 1; FLUID_DEBUG=1 shows the traceback."""
    _setup_logging()
    try:
        app()
    except FluidError as e:
        if os.environ.get("FLUID_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RequeueExit as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# ---- commands (each one imports its stage lazily) ----------------------------------------------


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
    import json

    from fluid_cli.scaling import fit_scaling as run_fit_scaling

    md_path, summary = run_fit_scaling(
        list(run_dirs or []), out, table, list(extrapolate or []), n_boot, seed, ci
    )
    print(json.dumps(summary, indent=2) if json_out else md_path)


@app.command("models")
def models_cmd(
    json_out: bool = typer.Option(
        False, "--json", help="Print JSON (one object per variant x size) instead of a table."
    ),
    variant: str | None = typer.Option(None, help="Only this variant."),
) -> None:
    """List every variant x size in the registry with its parameter count and FLOPs per image.

    Counts are computed on the meta device (no weights are allocated) at the paper's data shapes:
    256 tokens of 16 channels or a 8192-code vocabulary, T5-XXL text (4096 wide, 128 tokens).
    """
    from fluid_cli.models.table import model_rows, print_table

    rows = model_rows(variant)
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=1))
    else:
        print_table(rows)


@app.command("train")
def train_cmd(
    variant: str | None = typer.Option(
        None, help="rand-cont | rand-disc | rast-cont | rast-disc (recipe: model.variant)."
    ),
    size: str | None = typer.Option(
        None, help="tiny | 166m | 369m | 665m | 1.1b | 3.1b | 10.5b (recipe: model.size)."
    ),
    image_tokens: Path | None = typer.Option(
        None, "--image-tokens", help="Image-token artifact dir from `fluid tokenize`."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="Text-embedding artifact dir from `fluid encode-text`."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: config.json, metrics.jsonl, checkpoints/."),
    recipe: Path | None = typer.Option(None, "--recipe", help="TOML recipe (see recipes/)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: section.key=value (repeatable)."
    ),
    steps: int | None = typer.Option(None, help="Training steps (train.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (train.batch_size)."),
    ckpt_every: int | None = typer.Option(None, "--ckpt-every", help="Save a checkpoint every N steps."),
    val_every: int | None = typer.Option(None, "--val-every", help="Validation loss every N steps."),
    seed: int | None = typer.Option(None, help="Seed of the data order, masks, noise and init."),
    device: str | None = typer.Option(None, help="auto | cuda | xla | mps | cpu (runtime.device)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the run's latest committed checkpoint."
    ),
) -> None:
    """Train a model on precomputed image tokens and text embeddings. Prints the run directory.

    Example: fluid train --variant rand-cont --size 1.1b --recipe recipes/rand-cont-1.1b.toml
    --image-tokens data/webli-latents --text data/webli-t5 --out runs/fluid-1.1b
    """
    from fluid_cli.config import resolve
    from fluid_cli.train import loop, setup

    flags = {
        "model": {"variant": variant, "size": size},
        "data": {
            "image_tokens": str(image_tokens) if image_tokens else None,
            "text": str(text) if text else None,
        },
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "ckpt_every": ckpt_every,
            "val_every": val_every,
            "seed": seed,
        },
        "runtime": {"device": device},
    }
    r = resolve(recipe, flags, set_)
    s = setup.build(r, out, resume)
    typer.echo(str(loop.run(s)))


@app.command("synth-data")
def synth_data_cmd(
    out: Path = typer.Argument(
        ..., help="Output dir: latents/, codes/ and text/ artifacts are written inside."
    ),
    records: int = typer.Option(512, help="Number of image-caption records."),
    seed: int = typer.Option(0, help="Seed of the captions and patterns."),
) -> None:
    """Write a small synthetic dataset (no downloads) that `fluid train` reads directly.

    Prints the output dir. Use OUT/latents with a -cont variant or OUT/codes with a -disc variant,
    and OUT/text as --text.
    """
    from fluid_cli.synthetic import write_synthetic

    write_synthetic(out, records=records, seed=seed)
    typer.echo(str(out))


_SPLIT_HELP = "Split the work across N processes (output shards i with i % N == --shard-index); default: torchrun's WORLD_SIZE."


@app.command("tokenize")
def tokenize_cmd(
    sources: list[str] = typer.Argument(
        ...,
        help="Webdataset tars (paths, globs, data/{00000..00099}.tar), a captions .jsonl/.csv, or a COCO captions .json.",
    ),
    tokenizer: str = typer.Option(
        ...,
        "--tokenizer",
        help="Image tokenizer: hub id or local dir of a diffusers AutoencoderKL (continuous) or VQModel (discrete).",
    ),
    out: Path = typer.Option(..., "--out", help="Output artifact dir (shards + manifest.json)."),
    resolution: int = typer.Option(256, help="Images are center-cropped and resized to this size."),
    images_dir: Path | None = typer.Option(
        None, "--images-dir", help="Image folder of a captions table (default: its dir) or of a COCO JSON."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Images per forward pass (each is encoded flipped too)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)."),
    records_per_shard: int = typer.Option(1024, "--records-per-shard", help="Record slots per output shard."),
    num_shards: int | None = typer.Option(None, "--num-shards", help=_SPLIT_HELP),
    shard_index: int | None = typer.Option(
        None, "--shard-index", help="This process's index in [0, --num-shards); default: RANK."
    ),
    flip: bool = typer.Option(
        True, "--flip/--no-flip", help="Also store the horizontally flipped image's tokens."
    ),
) -> None:
    """Encode images into VAE latents or VQ codes, sharded and resumable. Prints the output dir.

    Example: fluid tokenize 'data/{00000..00099}.tar' --tokenizer stabilityai/sd-vae-ft-ema --out data/latents
    """
    from fluid_cli.stages.image_tokenize import run_tokenize

    run_tokenize(sources, tokenizer, out, resolution, images_dir, batch_size, device, records_per_shard,
                 num_shards, shard_index, flip)  # fmt: skip
    typer.echo(str(out))


@app.command("encode-text")
def encode_text_cmd(
    sources: list[str] = typer.Argument(
        ..., help="The same sources as `tokenize`, or a prompts .txt file (one per line; - for stdin)."
    ),
    encoder: str = typer.Option(
        ...,
        "--encoder",
        help="T5 encoder: hub id or local dir (its tokenizer is loaded from the same place).",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output artifact dir (shards + manifest.json + null-text.safetensors)."
    ),
    max_length: int = typer.Option(128, "--max-length", help="Captions are truncated to this many tokens."),
    images_dir: Path | None = typer.Option(
        None, "--images-dir", help="Image folder of a captions table or COCO JSON (for --check-images)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Captions per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: cuda when available)."),
    records_per_shard: int = typer.Option(1024, "--records-per-shard", help="Record slots per output shard."),
    num_shards: int | None = typer.Option(None, "--num-shards", help=_SPLIT_HELP),
    shard_index: int | None = typer.Option(
        None, "--shard-index", help="This process's index in [0, --num-shards); default: RANK."
    ),
    check_images: bool = typer.Option(
        True,
        "--check-images/--no-check-images",
        help="Skip records whose image is missing or corrupt, as tokenize does (keys then join exactly).",
    ),
    coco_caption: int = typer.Option(
        0, "--coco-caption", help="Which caption of a COCO image, in annotation order (0: the first)."
    ),
) -> None:
    """Encode captions with a frozen T5 encoder into bf16 hidden states, sharded and resumable. Prints the output dir.

    Example: fluid encode-text 'data/{00000..00099}.tar' --encoder google/t5-v1_1-xxl --out data/t5
    """
    from fluid_cli.stages.text_encode import run_encode_text

    run_encode_text(sources, encoder, out, max_length, images_dir, batch_size, device, records_per_shard,
                    num_shards, shard_index, check_images, coco_caption)  # fmt: skip
    typer.echo(str(out))


bench_app = typer.Typer(
    help="Throughput benchmarks (images/s, tokens/s, TFLOP/s, MFU) on random data.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
def bench_train_cmd(
    variant: str = typer.Option("rand-cont", help="Registry variant."),
    size: str = typer.Option("166m", help="Registry size."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per step (one process)."),
    steps: int = typer.Option(5, help="Timed steps (after 2 warm-up steps)."),
    device: str = typer.Option("auto", help="auto | cuda | xla | mps | cpu."),
    precision: str = typer.Option("auto", help="auto (bf16 on accelerators, fp32 on cpu) | bf16 | fp32."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Training throughput at the paper's data shapes (256 tokens, T5-XXL 4096 x 128)."""
    import json

    from fluid_cli.bench import bench_train

    r = bench_train(
        variant, size, batch_size, steps, device_name=device, precision=precision, compile=compile
    )
    if json_out:
        typer.echo(json.dumps(r))
    else:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        typer.echo(
            f"{r['variant']} {r['size']} on {r['device']} ({r['precision']}), batch {r['batch']}: "
            f"{r['images_per_s']:.2f} img/s, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3f} TFLOP/s, MFU {mfu}"
        )
