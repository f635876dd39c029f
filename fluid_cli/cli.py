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

from fluid_cli.errors import FluidError, Interrupted, RequeueExit, describe

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


# ---- checks at the CLI boundary: cheap, before any model or data is loaded ---------------------


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise FluidError(message)


def _at_least(low: int | float, **options) -> None:
    """_at_least(1, batch_size=b): '--batch-size must be at least 1, got 0' (None: not given)."""
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        _need(value is None or value >= low, f"{flag} must be at least {low}, got {value}")


def _finite(low: float | None = None, high: float | None = None, **options) -> None:
    import math

    for name, value in options.items():
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        _need(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        _need(low is None or value >= low, f"{flag} must be at least {low}, got {value}")
        _need(high is None or value <= high, f"{flag} must be at most {high}, got {value}")


def _writable_dir(path: Path | None, option: str = "--out") -> None:
    """`path` is a folder we can create or write into: not a file, not under a file, not read-only.
    Checked before any expensive work, so nothing is computed that cannot be saved."""
    import tempfile

    if path is None:
        return
    path = Path(path)
    _need(
        not path.exists() or path.is_dir(),
        f"{option} {path} is a file, not a folder; pass a new path or an existing folder",
    )
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    _need(probe.is_dir(), f"{option} {path}: {probe} is a file, not a folder; pass a path inside a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".fluid-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FluidError(
            f"{option} {path}: cannot write in {probe} ({e.strerror}); choose a writable place"
        ) from None


def _writable_file(path: Path | None, option: str = "--out") -> None:
    """`path` is a file we can write: not an existing folder, and its folder is writable."""
    if path is None:
        return
    path = Path(path)
    _need(not path.is_dir(), f"{option} {path} is a folder; pass a file path")
    _writable_dir(path.parent, f"{option} {path}: its folder")


def _existing(path: Path | None, option: str, folder: bool | None = None) -> None:
    if path is None or str(path) == "-":
        return
    path = Path(path)
    _need(path.exists(), f"{option} {path} does not exist")
    if folder is True:
        _need(path.is_dir(), f"{option} {path} is a file; pass a folder")
    if folder is False:
        _need(path.is_file(), f"{option} {path} is a folder; pass a file")


_RESUME_HINT = {
    "train": "rerun the same command with --resume to continue from the last checkpoint",
    "tokenize": "rerun the same command to continue (finished shards are kept)",
    "encode-text": "rerun the same command to continue (finished shards are kept)",
    "sample": "rerun the same command to continue (finished images are kept)",
    "demo": "rerun the same command to continue (finished stages are kept)",
}


def _command_name(argv: list[str]) -> str:
    """`fluid bench train ...` -> 'bench train': the words before the first option."""
    words = []
    for a in argv:
        if a.startswith("-") or len(words) == 2 or (words and words[0] != "bench"):
            break
        words.append(a)
    return " ".join(words) or "fluid"


_MAIN_PID: int | None = None


def _on_sigint(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked DataLoader worker: the default, which torch handles quietly
        raise KeyboardInterrupt
    raise Interrupted()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Typer's standalone mode handles usage errors (exit 2); a
    FluidError becomes `error: ...` on stderr and exit 1; any other exception is the safety net's
    one line (errors.describe), exit 1; Ctrl-C says how to continue, exit 130. FLUID_DEBUG=1 shows
    the traceback instead."""
    import signal

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    debug = bool(os.environ.get("FLUID_DEBUG"))
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread: keep the default handler
        previous = None
    try:
        app(args=argv, prog_name="fluid")
    except FluidError as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RequeueExit as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Interrupted as e:
        if debug:
            raise
        hint = _RESUME_HINT.get(command, "rerun the same command")
        print(f"error: {command} interrupted; {hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # the safety net: a stage did not turn this into a FluidError
        if debug:
            raise
        print(f"error: {describe(e, command)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


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
    _at_least(0, n_boot=n_boot)
    _finite(ci=ci)
    _need(0 < ci < 1, f"--ci must be between 0 and 1 (e.g. 0.95), got {ci}")
    _existing(table, "--table", folder=False)
    _writable_dir(out)
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
        None, help="tiny | mini | small | 166m | 369m | 665m | 1.1b | 3.1b | 10.5b (recipe: model.size)."
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
    _at_least(1, steps=steps, batch_size=batch_size)
    _at_least(0, ckpt_every=ckpt_every, val_every=val_every)
    _existing(recipe, "--recipe", folder=False)
    _writable_dir(out)
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
    out_dir = loop.run(s)
    if s.dist.main:  # under torchrun, one line on stdout for pipelines
        typer.echo(str(out_dir))


@app.command("verify")
def verify_cmd(
    artifacts: list[Path] = typer.Argument(
        ..., help="Artifact dirs (with manifest.json), or a folder holding several (e.g. a synth-data OUT)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per artifact."),
) -> None:
    """Check artifacts against their manifests: every shard's header, size and sha256 (recomputed).

    Prints one line per artifact (shards, records, MB hashed, MB/s); a damaged shard is one error line
    naming it and its record range (exit 1). Verified shards are recorded (ARTIFACT/verified.json), so
    `fluid train` does not hash them again. What is checked when: docs/reliability.md.
    """
    import json

    from fluid_cli.shards import verify_paths

    for r in verify_paths(list(artifacts)):
        if json_out:
            typer.echo(json.dumps(r))
        else:
            typer.echo(f"ok {r['artifact']}: {r['shards']} shards, {r['records']} records, "
                       f"{r['bytes'] / 1e6:.1f} MB sha256 in {r['seconds']:.2f} s")  # fmt: skip


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
    _at_least(1, records=records)
    _writable_dir(out, "OUT")
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
    _at_least(8, resolution=resolution)
    _at_least(1, batch_size=batch_size, records_per_shard=records_per_shard, num_shards=num_shards)
    _at_least(0, shard_index=shard_index)
    _existing(images_dir, "--images-dir", folder=True)
    _writable_dir(out)
    from fluid_cli.stages.pretrained import resolve_image_tokenizer

    resolve_image_tokenizer(tokenizer)  # a missing model fails here, in a second, before torch is imported
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
    _at_least(1, max_length=max_length, batch_size=batch_size, records_per_shard=records_per_shard,
              num_shards=num_shards)  # fmt: skip
    _at_least(0, shard_index=shard_index, coco_caption=coco_caption)
    _existing(images_dir, "--images-dir", folder=True)
    _writable_dir(out)
    from fluid_cli.stages.pretrained import resolve_text_encoder

    resolve_text_encoder(encoder)  # a missing model fails here, in a second, before torch is imported
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
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing", help="Recompute each block in backward (less memory)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Training throughput at the paper's data shapes (256 tokens, T5-XXL 4096 x 128).

    Reports steps/s, images/s, tokens/s, TFLOP/s and MFU (analytic model FLOPs x3 against the
    device's bf16 peak), the FLOPs per image counted by torch's FLOP counter next to the analytic
    ones, and peak memory. One process; see docs/scale.md for multi-GPU and TPU runs.
    """
    _at_least(1, batch_size=batch_size, steps=steps)
    import json

    from fluid_cli.bench import bench_train

    r = bench_train(
        variant, size, batch_size, steps, device_name=device, precision=precision, compile=compile,
        activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    if json_out:
        typer.echo(json.dumps(r))
    else:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        typer.echo(
            f"{r['variant']} {r['size']} on {r['device']} ({r['precision']}), batch {r['batch']}: "
            f"{r['images_per_s']:.2f} img/s, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3f} TFLOP/s, MFU {mfu}; "
            f"GFLOPs/image analytic {r['flops_per_image_analytic'] / 1e9:.2f}, counted "
            f"{r['flops_per_image_counted'] / 1e9:.2f} (x{r['flops_counted_over_analytic']:.3f}); "
            f"peak memory {r['peak_memory_gb']:.2f} GB"
        )


@app.command("sample")
def sample_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="A run dir (its latest committed checkpoint) or a checkpoint dir."
    ),
    prompts: str | None = typer.Option(
        None, "--prompts", help="Prompts file, one per line (- = stdin). Prompt index = line number - 1."
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", help="A prompt (repeatable); instead of --prompts."
    ),
    out: Path = typer.Option(..., "--out", help="Output dir: PNGs, samples.jsonl, grid.png."),
    seed: int = typer.Option(
        0, help="Seed; image (prompt p, image i) is keyed by (seed, p, i), whatever the batch or process."
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", help="Images per forward. Speed only: images are identical at any batch size."
    ),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", help="Images per prompt."),
    steps: int = typer.Option(
        64,
        "--steps",
        help="K, random-order steps (the paper: 64). Cost is linear in K. Ignored for raster variants, which take one step per token (L).",
    ),
    diffusion_steps: int = typer.Option(
        100,
        "--diffusion-steps",
        help="S, diffusion steps per continuous token (the paper: 100, respaced from 1000). Head cost is linear in S.",
    ),
    cfg: float = typer.Option(
        3.0,
        "--cfg",
        help="Classifier-free guidance scale; 1 = off. Guidance doubles the backbone and head batch.",
    ),
    cfg_schedule: str = typer.Option(
        "linear", "--cfg-schedule", help="constant | linear (MAR: 1 + (cfg-1) x fraction generated)."
    ),
    temperature: float = typer.Option(
        1.0, help="Continuous: scale of the diffusion noise; discrete: logits / T (0 = argmax)."
    ),
    top_k: int = typer.Option(0, "--top-k", help="Discrete: sample among the k most likely codes (0 = all)."),
    sampler: str = typer.Option(
        "ddpm", help="Per-token diffusion sampler: ddpm | ddim (eta 0, ignores --temperature)."
    ),
    discrete_order: str = typer.Option(
        "random",
        "--discrete-order",
        help="rand-disc: random (the paper) | confidence (MaskGIT: keep the most confident draws).",
    ),
    head_tokens: str = typer.Option(
        "chosen",
        "--head-tokens",
        help="chosen: the head samples only each step's new tokens (S x L per image); all: every token each step (one static shape for XLA, K times the head cost). Same images.",
    ),
    clip_x0: float | None = typer.Option(
        None,
        "--clip-x0",
        help="Continuous: clamp each diffusion step's predicted token to +-VALUE. Default: the training data's latent range (recorded by `fluid train`); 0 = off (MAR's sampler). Keeps short-trained heads from blowing up at t=999.",
    ),
    text_embeddings: Path | None = typer.Option(
        None,
        "--text-embeddings",
        help="A `fluid encode-text` artifact to take the prompts' states from (matched by caption) instead of running the T5 encoder; required for synthetic runs.",
    ),
    grid: bool = typer.Option(
        False, "--grid", help="Also write grid.png, a contact sheet (first 16 prompts x 8 images)."
    ),
    device: str = typer.Option(
        "auto", help="auto | cuda | xla | mps | cpu. bf16 autocast on accelerators, fp32 on cpu."
    ),
    weights: str = typer.Option("ema", help="ema (the paper) | model (the raw weights)."),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="torch.compile the backbone step (first call compiles for ~30 s; pays on GPUs).",
    ),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Make at most this many new images, then stop (rerun to continue)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the output dir."),
) -> None:
    """Generate images from a checkpoint. Prints the output dir.

    Cost per image (guidance doubles each term; the paper's L = 256 tokens):
    random order ~ K x backbone(L tokens) + S x head(L tokens);
    with --head-tokens all: K x backbone(L tokens) + K x S x head(L tokens);
    raster ~ L x backbone(1 token, KV cache) + L x S x head(1 token).

    Speed knobs: --steps K, --diffusion-steps S, --cfg 1 (no guidance: half
    the work), --batch-size (images do not change), --compile.
    Benchmarks: docs/benchmarks.md. Details: docs/sampling.md.

    A rerun with the same settings skips the images already in samples.jsonl.
    Under torchrun each process takes every world-th image.

    Example: fluid sample runs/fluid-1.1b --prompts prompts.txt --out samples/
    """
    _at_least(1, batch_size=batch_size, images_per_prompt=images_per_prompt, steps=steps,
              diffusion_steps=diffusion_steps, max_images=max_images)  # fmt: skip
    _at_least(0, top_k=top_k)
    _finite(0.0, cfg=cfg, temperature=temperature, clip_x0=clip_x0)
    _need(prompts is not None or prompt, "give --prompts FILE or at least one --prompt")
    _need(weights in ("ema", "model"), f"--weights {weights!r} is not one of ema, model")
    _existing(prompts, "--prompts", folder=False)
    _existing(text_embeddings, "--text-embeddings", folder=True)
    _writable_dir(out)
    import json

    from fluid_cli.sampling import SampleSettings
    from fluid_cli.sampling.run import run_sample

    s = SampleSettings(
        steps,
        diffusion_steps,
        cfg,
        cfg_schedule,
        temperature,
        top_k,
        sampler,
        discrete_order,
        head_tokens,
        clip_x0,
    )
    summary = run_sample(
        checkpoint, out, prompts, list(prompt or []), s, seed, batch_size, images_per_prompt,
        text_embeddings, grid, device, weights, compile, max_images,
    )  # fmt: skip
    if summary["rank"] == 0:  # under torchrun, one line for the pipeline
        typer.echo(json.dumps(summary) if json_out else summary["out"])


# ---- evaluation: FID-30K on COCO 2014 captions, GenEval (fluid_cli/eval, docs/evaluation.md) ----


@app.command("coco-30k")
def coco_30k_cmd(
    captions: Path = typer.Argument(
        ..., help="COCO captions JSON, e.g. annotations/captions_train2014.json."
    ),
    out: Path = typer.Option(
        ..., "--out", help="The list (.jsonl); .txt, .coco.json and .meta.json are written beside it."
    ),
    count: int = typer.Option(30000, "--count", help="Images (one caption each); the paper: 30000."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the draw (a sha256 rule: the same list on any machine)."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the meta record (count, seed, sha256s) as JSON."
    ),
) -> None:
    """Draw the FID-30K caption list from COCO 2014 train: one seeded caption per image. Prints the list path.

    Then: fluid sample CKPT --prompts OUT.txt --out samples/ ; fluid eval-fid samples/ --make-ref
    --ref-images train2014/ --ref-list OUT.jsonl. Protocol: docs/evaluation.md.
    """
    _at_least(1, count=count)
    _existing(captions, "CAPTIONS", folder=False)
    _writable_file(out)
    import json

    from fluid_cli.eval.coco_prompts import write_coco_prompts

    meta = write_coco_prompts(captions, out, count, seed)
    typer.echo(json.dumps(meta) if json_out else str(out))


@app.command("eval-fid")
def eval_fid_cmd(
    images: Path | None = typer.Argument(
        None,
        help="Generated images: a folder, or a `fluid sample` dir (its manifest lists the files, step and prompts).",
    ),
    ref: Path | None = typer.Option(
        None,
        "--ref",
        help="Reference: a stats .npz (mu, sigma) or a folder of real images. With --make-ref: where to write the stats (default: ~/.cache/fluid/fid-ref/).",
    ),
    make_ref: bool = typer.Option(
        False,
        "--make-ref",
        help="Compute (or reuse the cached) reference stats of --ref-images [--ref-list].",
    ),
    ref_images: Path | None = typer.Option(
        None, "--ref-images", help="Folder of real images for --make-ref (COCO train2014/)."
    ),
    ref_list: Path | None = typer.Option(
        None,
        "--ref-list",
        help="The `fluid coco-30k` list: the reference is its images; generated prompts are checked against it.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Result JSON (default: IMAGES/fid.json)."),
    run: Path | None = typer.Option(
        None, "--run", help="Also write RUN/eval/fid-step<N>.json (read by `fluid fit-scaling`)."
    ),
    mode: str = typer.Option(
        "clean", "--mode", help="clean | legacy_pytorch | legacy_tensorflow (clean-fid's resize modes)."
    ),
    inception: Path | None = typer.Option(
        None,
        "--inception",
        help="Inception weights file (or dir holding it); default: clean-fid's cache (/tmp/inception-2015-12-05.pt). Never downloaded.",
    ),
    expect_count: int | None = typer.Option(
        None,
        "--expect-count",
        help="Refuse unless there are exactly this many images (default: the reference list's count).",
    ),
    step: int | None = typer.Option(
        None, "--step", help="Checkpoint step to record (default: from the samples manifest)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per feature batch."),
    workers: int = typer.Option(
        0, "--workers", help="DataLoader workers that decode and resize (0: in process)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the result JSON instead of its path."),
) -> None:
    """FID of generated images against reference statistics (clean-fid). Prints the result path.

    Example (the paper's FID-30K): fluid eval-fid samples/ --make-ref --ref-images train2014/
    --ref-list coco30k.jsonl --run runs/fluid-1.1b
    """
    _at_least(1, batch_size=batch_size, expect_count=expect_count)
    _at_least(0, workers=workers, step=step)
    _existing(images, "IMAGES", folder=True)
    _existing(ref_images, "--ref-images", folder=True)
    _existing(ref_list, "--ref-list", folder=False)
    _writable_dir(run, "--run")
    if not make_ref:
        _existing(ref, "--ref")
    _writable_file(out)
    import json

    from fluid_cli.eval.fid_run import run_eval_fid

    r = run_eval_fid(images, ref=ref, ref_images=ref_images, ref_list=ref_list, make_ref=make_ref, out=out,
                     run_dir=run, mode=mode, inception=inception, expect_count=expect_count, step=step,
                     batch_size=batch_size, device=device, workers=workers)  # fmt: skip
    typer.echo(json.dumps(r) if json_out else r.get("path") or r["reference"]["path"])


@app.command("eval-geneval")
def eval_geneval_cmd(
    checkpoint: Path | None = typer.Argument(
        None, help="A run dir or checkpoint dir to generate 4 images per prompt with (or use --images)."
    ),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Score an existing GenEval folder (<DIR>/00000/metadata.jsonl, samples/0000.png) from any generator.",
    ),
    out: Path | None = typer.Option(None, "--out", help="With CHECKPOINT: the GenEval folder to write."),
    run: Path | None = typer.Option(
        None, "--run", help="Also write RUN/eval/geneval-step<N>.json (read by `fluid fit-scaling`)."
    ),
    detector: str = typer.Option(
        "facebook/mask2former-swin-small-coco-instance",
        "--detector",
        help="Mask2Former hub id or local dir; py:MODULE:FUNCTION, a factory FUNCTION(classes) -> detector(image) -> [Detection]; or `shapes` (the shapes world's exact detector and pixel colours: shapes-GenEval).",
    ),
    clip: str = typer.Option(
        "openai/clip-vit-large-patch14",
        "--clip",
        help="CLIP hub id or local dir; or py:MODULE:FUNCTION, a factory FUNCTION() -> classify(crops, class) -> colours.",
    ),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A GenEval-schema metadata .jsonl to use instead of the 553 GenEval prompts (e.g. shapes-data's heldout.jsonl).",
    ),
    allow_incomplete: bool = typer.Option(
        False,
        "--allow-incomplete",
        help="Score a set with fewer than 553 x 4 images (flagged in the result).",
    ),
    step: int | None = typer.Option(
        None, "--step", help="Checkpoint step to record (default: from the samples manifest)."
    ),
    seed: int = typer.Option(0, help="Sampling seed."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sampling batch size."),
    steps: int = typer.Option(64, "--steps", help="Random-order steps K."),
    diffusion_steps: int = typer.Option(100, "--diffusion-steps", help="Diffusion steps S per token."),
    cfg: float = typer.Option(3.0, "--cfg", help="Classifier-free guidance scale."),
    cfg_schedule: str = typer.Option("linear", "--cfg-schedule", help="constant | linear."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    text_embeddings: Path | None = typer.Option(
        None,
        "--text-embeddings",
        help="A `fluid encode-text` artifact holding the 553 prompts (instead of running T5).",
    ),
    weights: str = typer.Option("ema", help="ema | model."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (sampling, detector and CLIP)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the result JSON instead of the table and path."
    ),
) -> None:
    """GenEval: generate (or take) 4 images per prompt and score them with the benchmark's rules.

    Prints the result path (a per-tag table goes to stderr). Rules and weights: docs/evaluation.md.
    Example: fluid eval-geneval runs/fluid-1.1b --out geneval/ --run runs/fluid-1.1b
    """
    _at_least(1, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps)
    _at_least(0, step=step)
    _finite(0.0, cfg=cfg, temperature=temperature)
    _existing(images, "--images", folder=True)
    _existing(prompts, "--prompts", folder=False)
    _writable_dir(run, "--run")
    _existing(text_embeddings, "--text-embeddings", folder=True)
    _writable_dir(out)
    import json

    from fluid_cli.eval.geneval_run import print_table, run_eval_geneval

    settings = {"steps": steps, "diffusion_steps": diffusion_steps, "cfg": cfg, "cfg_schedule": cfg_schedule,
                "temperature": temperature}  # fmt: skip
    sample = {"settings": settings, "seed": seed, "batch_size": batch_size, "text_embeddings": text_embeddings,
              "device": device, "weights": weights}  # fmt: skip
    r = run_eval_geneval(
        checkpoint, images, out, run, detector, clip, device, allow_incomplete, step, sample, prompts
    )
    if json_out:
        typer.echo(json.dumps(r))
    else:
        print_table(r)
        typer.echo(r["path"])


@bench_app.command("sample")
def bench_sample_cmd(
    variant: str = typer.Option("rand-cont", help="Registry variant."),
    size: str = typer.Option("166m", help="Registry size (tiny: synthetic shapes; others: the paper's)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images in the timed batch."),
    steps: int = typer.Option(64, "--steps", help="K, random-order steps (raster: L, ignored)."),
    diffusion_steps: int = typer.Option(100, "--diffusion-steps", help="S, diffusion steps per token."),
    cfg: float = typer.Option(3.0, "--cfg", help="Guidance scale (1 = off: half the work)."),
    head_tokens: str = typer.Option("chosen", "--head-tokens", help="chosen | all (fluid sample --help)."),
    device: str = typer.Option("auto", help="auto | cuda | xla | mps | cpu."),
    precision: str = typer.Option("auto", help="auto (bf16 on accelerators, fp32 on cpu) | bf16 | fp32."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone call."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Sampling throughput with random weights (one timed batch after a short warm-up)."""
    _at_least(1, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps)
    _finite(0.0, cfg=cfg)
    _need(head_tokens in ("chosen", "all"), f"--head-tokens {head_tokens!r} is not one of chosen, all")
    import json

    from fluid_cli.sampling.bench import bench_sampling

    r = bench_sampling(
        variant, size, batch_size, steps, diffusion_steps, cfg, device, head_tokens, precision, compile
    )
    if json_out:
        typer.echo(json.dumps(r))
    else:
        paper = r["paper_sec_per_image"]
        typer.echo(
            f"{r['variant']} {r['size']} on {r['device']} ({r['precision']}), batch {r['batch']}, {r['steps']} AR steps, "
            f"S={r['diffusion_steps']} cfg={r['cfg']}: {r['sec_per_image']:.3f} s/image, {r['images_per_s']:.3f} "
            f"img/s, {r['gflops_per_s']:.1f} GFLOP/s"
            + (f" (paper, TPU v5 per chip: {paper} s/image)" if paper else "")
        )


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
    _at_least(1, records=records)
    _writable_dir(out, "OUT")
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
        help="vae/vq: training steps (default 800: ~3 CPU-minutes for the grid world's vae; free layout: 3000).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="vae/vq: images per step (default 64; free layout: 4)."
    ),
    lr: float | None = typer.Option(
        None, help="vae/vq: peak AdamW learning rate (default 3e-3; free layout: 2e-3)."
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
    _need(kind in ("vae", "vq", "t5"), f"unknown tokenizer kind {kind!r}; valid: vae, vq, t5")
    _at_least(1, size=size, steps=steps, batch_size=batch_size, vocab=vocab, width=width)
    _at_least(0, downsample=downsample, threads=threads, patch=patch)
    _need(layout in ("grid", "free"), f"--layout must be grid or free, got {layout!r}")
    _finite(lr=lr, kl_weight=kl_weight)
    _need(lr is None or lr > 0, f"--lr must be positive, got {lr}")
    _need(kl_weight is None or kl_weight >= 0, f"--kl-weight must not be negative, got {kl_weight}")
    _writable_dir(out)
    import json

    from fluid_cli.shapes.tokenizers import run_train_tokenizer

    report = run_train_tokenizer(
        kind, out, threads, size=size, layout=layout, patch=patch, steps=steps, batch_size=batch_size, lr=lr, downsample=downsample,
        vocab=vocab, width=width, seed=seed, kl_weight=kl_weight,
    )  # fmt: skip
    typer.echo(json.dumps(report) if json_out else str(out))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Where data, tokenizers, the run and report.md go."
    ),
    minutes: float = typer.Option(
        15.0, "--minutes", help="Time budget for the whole pipeline; training gets what is left."
    ),
    records: int = typer.Option(10000, "--records", help="Training images of the shapes dataset."),
    size: str = typer.Option("tiny", "--size", help="Registry size of the rand-cont model."),
    tokenizer_steps: int | None = typer.Option(
        None,
        "--tokenizer-steps",
        help="Training steps of the shapes VAE (default: train-tokenizer's, 800; docs/shapes.md).",
    ),
    sample_steps: int = typer.Option(
        16, "--steps", help="K, random-order sampling steps (at most the 16 tokens)."
    ),
    cfg: float = typer.Option(3.0, "--cfg", help="Classifier-free guidance scale for the samples."),
    seed: int = typer.Option(0, help="Seed of the data, the tokenizers and the model."),
) -> None:
    """Run the whole pipeline offline on the built-in shapes benchmark and write a report. Prints its path.

    shapes-data -> train-tokenizer vae + t5 -> tokenize -> encode-text -> train rand-cont -> sample the
    evaluation prompts -> shapes-GenEval -> report.md (scores per tag next to the tokenizer's ceiling,
    image grids, loss curve). About 15 minutes on 2 CPU cores; a rerun skips finished stages.
    """
    from fluid_cli.registry import get_size

    get_size(size)  # refused now, not after minutes of data and tokenizer stages
    _finite(minutes=minutes, cfg=cfg)
    _need(minutes > 0, f"--minutes must be positive, got {minutes}")
    _need(cfg >= 0, f"--cfg must not be negative, got {cfg}")
    _at_least(1, records=records, tokenizer_steps=tokenizer_steps, steps=sample_steps)
    _writable_dir(out)
    from fluid_cli.demo import run_demo

    typer.echo(str(run_demo(out, minutes, records, size, seed, tokenizer_steps, sample_steps, cfg)))
