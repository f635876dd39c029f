"""Data commands: `fluid synth-data`, `fluid verify`, `fluid tokenize`, `fluid encode-text`."""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, existing, one_of, writable_dir
from fluid_cli.config import Device
from fluid_cli.settings import EncodeTextSettings, ShardingSettings, TokenizeSettings

_SPLIT_HELP = "Split the work across N processes (output shards i with i % N == --shard-index); default: torchrun's WORLD_SIZE."
_INDEX_HELP = "This process's index in [0, --num-shards); default: RANK."
_SLOTS_HELP = "Record slots per output shard."
_DEVICE_HELP = f"{one_of(Device)} (auto: cuda when available)."
T, E, SPLIT = TokenizeSettings, EncodeTextSettings, ShardingSettings  # the defaults below


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

    from fluid_cli.artifact import verify_paths

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
    at_least(1, records=records)
    writable_dir(out, "OUT")
    from fluid_cli.synthetic import write_synthetic

    write_synthetic(out, records=records, seed=seed)
    typer.echo(str(out))


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
    resolution: int = typer.Option(T.resolution, help="Images are center-cropped and resized to this size."),
    images_dir: Path | None = typer.Option(
        None, "--images-dir", help="Image folder of a captions table (default: its dir) or of a COCO JSON."
    ),
    batch_size: int = typer.Option(
        T.batch_size, "--batch-size", help="Images per forward pass (each is encoded flipped too)."
    ),
    device: str = typer.Option(T.device, help=_DEVICE_HELP),
    records_per_shard: int = typer.Option(SPLIT.records_per_shard, "--records-per-shard", help=_SLOTS_HELP),
    num_shards: int | None = typer.Option(None, "--num-shards", help=_SPLIT_HELP),
    shard_index: int | None = typer.Option(None, "--shard-index", help=_INDEX_HELP),
    flip: bool = typer.Option(
        T.flip, "--flip/--no-flip", help="Also store the horizontally flipped image's tokens."
    ),
) -> None:
    """Encode images into VAE latents or VQ codes, sharded and resumable. Prints the output dir.

    Example: fluid tokenize 'data/{00000..00099}.tar' --tokenizer stabilityai/sd-vae-ft-ema --out data/latents
    """
    at_least(8, resolution=resolution)
    at_least(1, batch_size=batch_size, records_per_shard=records_per_shard, num_shards=num_shards)
    at_least(0, shard_index=shard_index)
    existing(images_dir, "--images-dir", folder=True)
    writable_dir(out)
    settings = TokenizeSettings(
        sources=tuple(sources), tokenizer=tokenizer, out=out, resolution=resolution, images_dir=images_dir,
        batch_size=batch_size, device=device, flip=flip,
        sharding=ShardingSettings(records_per_shard, num_shards, shard_index),
    )  # fmt: skip
    from fluid_cli.stages.pretrained import resolve_image_tokenizer

    resolve_image_tokenizer(tokenizer)  # a missing model fails here, in a second, before torch is imported
    from fluid_cli.stages.image_tokenize import run_tokenize

    run_tokenize(settings)
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
    max_length: int = typer.Option(
        E.max_length, "--max-length", help="Captions are truncated to this many tokens."
    ),
    images_dir: Path | None = typer.Option(
        None, "--images-dir", help="Image folder of a captions table or COCO JSON (for --check-images)."
    ),
    batch_size: int = typer.Option(E.batch_size, "--batch-size", help="Captions per forward pass."),
    device: str = typer.Option(E.device, help=_DEVICE_HELP),
    records_per_shard: int = typer.Option(SPLIT.records_per_shard, "--records-per-shard", help=_SLOTS_HELP),
    num_shards: int | None = typer.Option(None, "--num-shards", help=_SPLIT_HELP),
    shard_index: int | None = typer.Option(None, "--shard-index", help=_INDEX_HELP),
    check_images: bool = typer.Option(
        E.check_images,
        "--check-images/--no-check-images",
        help="Skip records whose image is missing or corrupt, as tokenize does (keys then join exactly).",
    ),
    coco_caption: int = typer.Option(
        E.coco_caption,
        "--coco-caption",
        help="Which caption of a COCO image, in annotation order (0: the first).",
    ),
) -> None:
    """Encode captions with a frozen T5 encoder into bf16 hidden states, sharded and resumable. Prints the output dir.

    Example: fluid encode-text 'data/{00000..00099}.tar' --encoder google/t5-v1_1-xxl --out data/t5
    """
    at_least(1, max_length=max_length, batch_size=batch_size, records_per_shard=records_per_shard,
             num_shards=num_shards)  # fmt: skip
    at_least(0, shard_index=shard_index, coco_caption=coco_caption)
    existing(images_dir, "--images-dir", folder=True)
    writable_dir(out)
    settings = EncodeTextSettings(
        sources=tuple(sources), encoder=encoder, out=out, max_length=max_length, images_dir=images_dir,
        batch_size=batch_size, device=device, check_images=check_images, coco_caption=coco_caption,
        sharding=ShardingSettings(records_per_shard, num_shards, shard_index),
    )  # fmt: skip
    from fluid_cli.stages.pretrained import resolve_text_encoder

    resolve_text_encoder(encoder)  # a missing model fails here, in a second, before torch is imported
    from fluid_cli.stages.text_encode import run_encode_text

    run_encode_text(settings)
    typer.echo(str(out))
