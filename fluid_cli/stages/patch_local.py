"""Patch-local image tokenizers: a diffusers AutoencoderKL / VQModel applied to each P x P cell of an
image on its own.

A convolutional encoder that sees the whole image makes every token depend on its neighbours: on
the shapes world a plain grey cell next to a star gets other latents than one in an empty corner,
so even background tokens spread over many values that a generator must reproduce to ~0.15 per
channel (docs/shapes.md). Encoding each cell alone makes a token a function of its own pixels only:
identical cells give identical tokens. The model itself is an ordinary diffusers model (saved with
save_pretrained, trained on P x P crops); the cell size lives in the tokenizer directory's
`fluid-tokenizer.json` (`"patch": P`), which `fluid tokenize` and `fluid sample` read, and the
artifact attrs record it. Latents keep the whole image's layout (B, C, H/f, W/f), so everything
downstream (grouping into tokens, decoding) is unchanged.
"""

from __future__ import annotations

import torch


def fold(x: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * cells^2, C, H / cells, W / cells), cells in row-major order."""
    b, c, h, w = x.shape
    ph, pw = h // cells, w // cells
    x = x.reshape(b, c, cells, ph, cells, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gy, gx, C, ph, pw)
    return x.reshape(b * cells * cells, c, ph, pw)


def unfold(x: torch.Tensor, cells: int) -> torch.Tensor:
    """The inverse of `fold`: (B * cells^2, C, h, w) -> (B, C, cells * h, cells * w)."""
    n, c, h, w = x.shape
    b = n // (cells * cells)
    x = x.reshape(b, cells, cells, c, h, w).permute(0, 3, 1, 4, 2, 5)  # (B, C, gy, h, gx, w)
    return x.reshape(b, c, cells * h, cells * w)


class PatchLocal(torch.nn.Module):
    """`model` (AutoencoderKL or VQModel) applied cell by cell to images of `resolution` pixels cut
    into cells of `patch` pixels. Offers the calls fluid makes of the model: encode (.latent_dist or
    .latents), decode (.sample), quantize and config."""

    def __init__(self, model: torch.nn.Module, patch: int):
        super().__init__()
        self.model, self.patch = model, int(patch)

    @property
    def config(self):
        return self.model.config

    @property
    def quantize(self):
        return self.model.quantize

    def _cells(self, side: int) -> int:
        if side % self.patch:
            raise ValueError(f"image side {side} is not a multiple of the tokenizer's patch {self.patch}")
        return side // self.patch

    def encode(self, x: torch.Tensor):
        """x (B, 3, H, W) -> the model's encoder output with latents laid out as for the whole image.
        Identical cells are encoded once (their latents could not differ): on the shapes grid world
        ~13 of an image's 16 cells are the same plain background, and `fluid tokenize` ran ~5x
        faster; on photographs duplicates are rare and this costs one sort of the batch."""
        cells = self._cells(x.shape[-1])
        flat = fold(x, cells)
        unique, inverse = torch.unique(flat.flatten(1), dim=0, return_inverse=True)
        out = self.model.encode(unique.reshape(-1, *flat.shape[1:]))
        if hasattr(out, "latent_dist"):
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            out.latent_dist = DiagonalGaussianDistribution(unfold(out.latent_dist.parameters[inverse], cells))
        else:
            out.latents = unfold(out.latents[inverse], cells)
        return out

    def decode(self, z: torch.Tensor, **kwargs):
        """z (B, C, h, w) latents of whole images -> the model's decoder output (.sample: images)."""
        cells = z.shape[-1] // self._latent_side()
        out = self.model.decode(fold(z, cells), **kwargs)
        out.sample = unfold(out.sample, cells)
        return out

    def _latent_side(self) -> int:
        """Latents per cell side: the encoder halves the side in every down block but the last."""
        blocks = len(self.model.config.down_block_types)
        return self.patch // 2 ** (blocks - 1)
