"""Counter-based ("keyed") random numbers: every random value is a pure function of (key, stream, index).

Why not torch.Generator streams: a generator's output depends on how many numbers were drawn before,
so masks and noise would change with the batch size, the gradient-accumulation split, the number of
processes, and the device. Here each sample carries a 32-bit key (from the seed and its global sample
index, or from (seed, prompt, image) when sampling), and each random tensor is a hash of
(key, stream, element index). So the same seed gives the same masks, diffusion noise and images
whatever the batch size, world size or device (cuda, xla, cpu), resume needs no RNG state, and XLA
sees no generator ops. The hash is Wellons' "lowbias32", done in int64 with 16-bit split multiplies so
no op ever overflows.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF

# One stream id per use, so that independent quantities never share numbers.
STREAM_MASK_RATIO = 1
STREAM_ORDER = 2
STREAM_DIFF_T = 3
STREAM_DIFF_NOISE = 4
STREAM_FLIP = 5
STREAM_POSTERIOR = 6
STREAM_CFG_DROP = 7
STREAM_SAMPLE_TOKENS = 8  # sampling: categorical draws / diffusion noise per AR step


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # < 2^32
    return (lo + hi) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 avalanche hash of int64 tensors holding values in [0, 2^32)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(h: torch.Tensor | int, v: torch.Tensor | int) -> torch.Tensor:
    """Hash of the pair (h, v); both int64 in [0, 2^32) (python ints are wrapped to tensors)."""
    h = torch.as_tensor(h, dtype=torch.int64)
    v = torch.as_tensor(v, dtype=torch.int64, device=h.device)
    return mix32(h ^ mix32((v + 0x9E3779B9) & M32))


def make_keys(seed: int, *indices: torch.Tensor | int) -> torch.Tensor:
    """Keys for a batch: hash of (seed, index_1, index_2, ...), e.g. (seed, prompt, image)."""
    k = mix32(torch.tensor(seed & M32, dtype=torch.int64))
    for idx in indices:
        k = combine(k, torch.as_tensor(idx, dtype=torch.int64) & M32)
    return k


def _bits(keys: torch.Tensor, shape: tuple[int, ...], stream: int, offset: int = 0) -> torch.Tensor:
    """(B, *shape) uniformly random 32-bit ints from per-row keys (B,)."""
    n = math.prod(shape)
    counter = torch.arange(offset, offset + n, dtype=torch.int64, device=keys.device).view(shape)
    k = combine(keys.to(torch.int64), stream)  # (B,)
    k = k.view(-1, *([1] * len(shape)))
    return combine(k, counter)


def uniform(keys: torch.Tensor, shape: tuple[int, ...], stream: int, offset: int = 0) -> torch.Tensor:
    """(B, *shape) float32 in the open interval (0, 1)."""
    b = _bits(keys, shape, stream, offset)
    return ((b >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def normal(keys: torch.Tensor, shape: tuple[int, ...], stream: int, offset: int = 0) -> torch.Tensor:
    """(B, *shape) float32 standard normal (Box-Muller over two disjoint counter ranges)."""
    n = math.prod(shape)
    u1 = uniform(keys, shape, stream, offset=2 * offset)
    u2 = uniform(keys, shape, stream, offset=2 * offset + n)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def randint(
    keys: torch.Tensor, shape: tuple[int, ...], high: int, stream: int, offset: int = 0
) -> torch.Tensor:
    """(B, *shape) int64 in [0, high). Modulo bias < high / 2^32, negligible for our ranges."""
    return _bits(keys, shape, stream, offset) % high
