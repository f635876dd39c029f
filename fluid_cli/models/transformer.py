"""Transformer building blocks: attention (with an optional KV cache), cross-attention, MLP, blocks.

The image blocks are the paper's "self-attention, cross-attention, and MLP" (pre-LayerNorm); the text
aligner reuses the same block without cross-attention. Attention goes through
F.scaled_dot_product_attention so the fused kernels (flash / memory-efficient) are used on GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys/values of one self-attention layer for raster-order decoding."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        causal: bool = False,
        key_mask: torch.Tensor | None = None,  # (B, T) bool, True = attend
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if cache is not None:
            # raster decoding: write this chunk's keys at [start, start+T), attend to the prefix
            cache.k[:, :, start : start + T] = k.to(cache.k.dtype)
            cache.v[:, :, start : start + T] = v.to(cache.v.dtype)
            k, v = cache.k[:, :, : start + T].to(q.dtype), cache.v[:, :, : start + T].to(q.dtype)
            if causal and T > 1:
                # query i (absolute start+i) sees keys <= start+i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the aligned text tokens (keys/values)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape  # x: (B, T, C); ctx: (B, S, C); ctx_mask: (B, S) bool
        S, H = ctx.shape[1], self.heads
        q = self.q(x).view(B, T, H, C // H).transpose(1, 2)
        k, v = self.kv(ctx).view(B, S, 2, H, C // H).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention to text, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6) if cross else None
        self.cross = CrossAttention(width, heads) if cross else None
        self.norm3 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        ctx: torch.Tensor | None = None,  # (B, S, C)
        ctx_mask: torch.Tensor | None = None,  # (B, S)
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, key_mask=key_mask, cache=cache, start=start)
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        return x + self.mlp(self.norm3(x))


class TextAligner(nn.Module):
    """The paper's trainable text aligner: T5 states -> model width, then bidirectional blocks."""

    def __init__(self, text_dim: int, text_len: int, width: int, heads: int, depth: int, mlp_ratio: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, text_len, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, cross=False) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # text: (B, S, text_dim), text_mask: (B, S) bool -> (B, S, width)
        h = self.proj(text) + self.pos[:, : text.shape[1]]
        for blk in self.blocks:
            h = blk(h, key_mask=text_mask)
        return self.norm(h)
