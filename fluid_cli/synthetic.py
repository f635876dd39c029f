"""`fluid synth-data`: a small synthetic dataset written straight to the artifact format, no downloads.

Captions "a {colour} {shape}" become text "embeddings" (a fixed random vector per word, as a frozen
random text encoder would give), and each caption's image latents are a pattern that depends on the
words (colour -> channel offsets, shape -> a spatial mask) plus noise. A model must read the text
to lower its loss, so a falling validation loss shows text conditioning works. It exists so that
`fluid train` can be run end to end on a bare machine; the shapes benchmark (`fluid demo`) goes
through real tokenizers and a real T5 encoder instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluid_cli.shards import FieldSpec, Manifest, atomic_write_bytes, write_manifest, write_shard

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "stripe", "cross"]


def _shape_mask(shape: str, n: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    if shape == "square":
        return ((x.abs() < 0.5) & (y.abs() < 0.5)).float()
    if shape == "circle":
        return (x**2 + y**2 < 0.5).float()
    if shape == "stripe":
        return (y.abs() < 0.25).float()
    return ((x.abs() < 0.2) | (y.abs() < 0.2)).float()


def _captions(records: int, g: torch.Generator) -> list[tuple[int, int]]:
    idx = torch.randint(0, len(COLOURS) * len(SHAPES), (records,), generator=g)
    return [(int(i) // len(SHAPES), int(i) % len(SHAPES)) for i in idx]


def write_synthetic(
    out: Path,
    records: int = 512,
    seed: int = 0,
    latent_size: int = 8,
    latent_channels: int = 4,
    text_dim: int = 32,
    vocab_size: int = 64,
    per_shard: int = 256,
) -> tuple[Path, Path, Path]:
    """Writes OUT/latents (image-latents), OUT/codes (image-codes) and OUT/text (text-embeddings)."""
    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    words = {w: torch.randn(text_dim, generator=g) for w in ["a", *COLOURS, *SHAPES, "<eos>"]}
    colour_offsets = torch.randn(len(COLOURS), latent_channels, generator=g)
    pairs = _captions(records, g)
    keys = [f"synth-{i:06d}" for i in range(records)]
    means, codes, hidden, captions = [], [], [], []
    for c, s in pairs:
        mask = _shape_mask(SHAPES[s], latent_size)  # (H, W)
        mean = colour_offsets[c][:, None, None] * mask + 0.1 * torch.randn(
            latent_channels, latent_size, latent_size, generator=g
        )
        means.append(mean)
        # codes: a VQ-like quantisation of the same pattern (2 channels, 8 levels each)
        q = ((mean[:2].clamp(-2, 1.99) + 2) * 2).long()  # (2, H, W) in [0, 8)
        codes.append((q[0] * 8 + q[1]) % vocab_size)
        caption = f"a {COLOURS[c]} {SHAPES[s]}"
        captions.append(caption)
        hidden.append(torch.stack([words[w] for w in [*caption.split(), "<eos>"]]))
    lat_dir, code_dir, text_dir = out / "latents", out / "codes", out / "text"
    shape = [latent_channels, latent_size, latent_size]
    lat_fields = {n: FieldSpec("float16", shape) for n in ("mean", "std", "mean_flip", "std_flip")}
    code_fields = {n: FieldSpec("int32", [latent_size, latent_size]) for n in ("codes", "codes_flip")}
    text_fields = {"hidden": FieldSpec("bfloat16", [-1, text_dim], ragged=True)}
    lat_shards, code_shards, text_shards = [], [], []
    for i, a in enumerate(range(0, records, per_shard)):
        b = min(a + per_shard, records)
        m = torch.stack(means[a:b])
        std = torch.full_like(m, 0.05)
        lat_shards.append(
            write_shard(
                lat_dir,
                i,
                keys[a:b],
                {"mean": m, "std": std, "mean_flip": m.flip(-1), "std_flip": std},
                lat_fields,
            )
        )
        cd = torch.stack(codes[a:b])
        code_shards.append(
            write_shard(code_dir, i, keys[a:b], {"codes": cd, "codes_flip": cd.flip(-1)}, code_fields)
        )
        rows = [{"caption": c} for c in captions[a:b]]
        text_shards.append(
            write_shard(text_dir, i, keys[a:b], {"hidden": hidden[a:b]}, text_fields, rows=rows)
        )
    producer = {"stage": "synth-data", "model_id": "synthetic", "seed": seed}
    res = latent_size * 8
    write_manifest(
        lat_dir,
        Manifest(
            "image-latents",
            lat_fields,
            {
                "latent_channels": latent_channels,
                "latent_size": [latent_size, latent_size],
                "scaling_factor": 1.0,
                "shift_factor": None,
                "resolution": res,
                "flip": True,
                "tokenizer": "synthetic",
                "tokenizer_class": "synthetic",
            },
            lat_shards,
            producer,
        ),
    )
    write_manifest(
        code_dir,
        Manifest(
            "image-codes",
            code_fields,
            {
                "vocab_size": vocab_size,
                "codes_shape": [latent_size, latent_size],
                "resolution": res,
                "flip": True,
                "tokenizer": "synthetic",
                "tokenizer_class": "synthetic",
            },
            code_shards,
            producer,
        ),
    )
    from safetensors.torch import save

    null = torch.stack([words["<eos>"]]).to(torch.bfloat16)
    atomic_write_bytes(text_dir / "null-text.safetensors", save({"hidden": null}))
    write_manifest(
        text_dir,
        Manifest(
            "text-embeddings",
            text_fields,
            {
                "text_dim": text_dim,
                "max_length": 8,
                "encoder": "synthetic",
                "tokenizer": "synthetic",
                "truncated": 0,
            },
            text_shards,
            producer,
            extras={"null_text": "null-text.safetensors"},
        ),
    )
    return lat_dir, code_dir, text_dir
