"""Image tokens <-> tokenizer outputs: the paper's 2x2 grouping of VAE latents into tokens.

SD-VAE latents (B, 4, 32, 32) -> (B, 256, 16): each token is a 2x2 patch of 4 channels, laid out
channel-major within the token as MAR's `patchify` does. VQ codes (B, 16, 16) -> (B, 256).
"""

from __future__ import annotations

import torch


def patchify(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    B, C, H, W = latents.shape  # (B, C, H, W)
    h, w = H // patch, W // patch
    x = latents.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("bchpwq->bhwcpq", x)
    return x.reshape(B, h * w, C * patch * patch)  # (B, L, C*p*p)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], channels: int, patch: int = 2) -> torch.Tensor:
    B = tokens.shape[0]  # tokens: (B, L, C*p*p)
    h, w = grid
    x = tokens.reshape(B, h, w, channels, patch, patch)
    x = torch.einsum("bhwcpq->bchpwq", x)
    return x.reshape(B, channels, h * patch, w * patch)  # (B, C, H, W)


def codes_to_tokens(codes: torch.Tensor) -> torch.Tensor:
    return codes.reshape(codes.shape[0], -1).long()  # (B, h, w) -> (B, L)
