"""Tokenizer quality on held-out shapes images: PSNR and shapes-GenEval of reconstructions.

Reconstruction goes the way the pipeline goes (the VAE's posterior mean, the VQ's nearest codes),
and the decoded images are rounded to uint8 as a PNG would store them. Used by
`fluid train-tokenizer` (fluid-tokenizer.json) and docs/shapes.md.
"""

from __future__ import annotations

import numpy as np
import torch

from fluid_cli.shapes.generator import record

EVAL_SEED = 999_999  # held-out images: a seed stream no dataset seed (0, 1, ...) shares


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Encode and decode as the pipeline does: the VAE's posterior mean, the VQ's nearest codes."""
    if hasattr(model, "quantize"):
        return model.decode(model.encode(x).latents).sample  # decode() quantizes
    return model.decode(model.encode(x).latent_dist.mode()).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded as a PNG would store it."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (capped at 60 dB for exact reconstructions)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 60.0)


def _scored_reconstructions(model, recs: list, batch: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(originals, reconstructions, shapes-GenEval rows) of generator records, reconstructed in
    batches as the pipeline does."""
    from fluid_cli.shapes.geneval import score_images

    originals = np.stack([r[0] for r in recs])
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recon = np.concatenate([to_uint8(reconstruct(model, x[i : i + batch])) for i in range(0, len(x), batch)])
    rows = score_images((r[2], img) for r, img in zip(recs, recon, strict=True))
    return originals, recon, rows


def tokenizer_ceiling(
    tokenizer: str, seed: int, size: int, layout: str, n: int = 300, batch: int = 50
) -> dict:
    """shapes-GenEval of the tokenizer's reconstructions of n training images (records 0..n-1 of
    the dataset's seed), encoded and decoded as `fluid tokenize` / `fluid sample` do (latent means,
    patch-local if the tokenizer is): the best score any generator could reach through it. The
    same shape as the summary of the generated images (overall, tags, counts)."""
    from fluid_cli.eval.geneval_run import summarize
    from fluid_cli.stages import pretrained as pt

    model = pt.load_image_tokenizer(pt.resolve_image_tokenizer(tokenizer))
    recs = [record(seed, i, size, layout) for i in range(n)]
    originals, recon, rows = _scored_reconstructions(model, recs, batch)
    return {
        "metric": "shapes-geneval",
        **summarize(rows),
        "images": n,
        "psnr_db": float(psnr(originals, recon).mean()),
    }


def evaluate(
    model, size: int, layout: str = "grid", n: int = 256, batch: int = 64
) -> tuple[dict, np.ndarray]:
    """PSNR and shapes-GenEval of reconstructions of n held-out images (seed EVAL_SEED)."""
    recs = [record(EVAL_SEED, i, size, layout) for i in range(n)]
    originals, recon, rows = _scored_reconstructions(model, recs, batch)
    tags: dict[str, list[bool]] = {}
    for row in rows:
        tags.setdefault(row["tag"], []).append(row["correct"])
    per_tag = {t: float(np.mean(v)) for t, v in tags.items()}
    return {
        "heldout_images": n,
        "psnr_db": float(psnr(originals, recon).mean()),
        "geneval_recon": float(np.mean(list(per_tag.values()))),
        "geneval_recon_tags": per_tag,
    }, recon
