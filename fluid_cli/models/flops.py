"""Analytic FLOPs of one image through the model: for the paper's training compute and for MFU.

The paper defines training compute as model GFLOPs x batch size x steps x 3 (backward ~ 2x forward).
We count multiply-adds as 2 FLOPs in every matmul (linear layers and attention scores / values);
norms, activations and softmax are ignored (< 1%). The diffusion head runs `diffusion_batch_mul`
times per token in training and once per token per diffusion step when sampling.
`fluid models` prints these; `fluid bench` checks them against torch's FLOP counter.
"""

from __future__ import annotations

from fluid_cli.models.config import ModelConfig, head_output_dim


def _block_flops(tokens: int, width: int, mlp_ratio: int, ctx: int = 0) -> int:
    """One transformer block on `tokens` queries (cross-attention to `ctx` keys when ctx > 0)."""
    f = 2 * tokens * (4 * width * width)  # qkv + out projections
    f += 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v
    f += 2 * tokens * (2 * mlp_ratio * width * width)  # MLP
    if ctx:
        f += 2 * tokens * 2 * width * width + 2 * ctx * 2 * width * width  # q, out; k, v of text
        f += 2 * 2 * tokens * ctx * width
    return f


def head_flops_per_token(cfg: ModelConfig) -> int:
    W, C = cfg.head_width, cfg.token_channels
    f = 2 * (C * W + cfg.width * W + 256 * W + W * W)  # input proj, cond proj, timestep MLP
    f += cfg.head_depth * 2 * (2 * W * W + 3 * W * W)  # per block: MLP (2 W^2) + adaLN (3 W^2)
    f += 2 * (2 * W * W + W * head_output_dim(C, cfg.head_prediction))  # final adaLN + output layer
    return f


def backbone_flops(cfg: ModelConfig) -> int:
    """Text aligner + image transformer (+ the tied softmax output for discrete), one image."""
    S, L, W = cfg.text_len, cfg.num_tokens, cfg.width
    f = 2 * S * cfg.text_dim * W + cfg.aligner_depth * _block_flops(S, W, cfg.mlp_ratio)
    f += 2 * L * (cfg.token_channels or 0) * W  # continuous input projection (embedding lookups are free)
    f += cfg.depth * _block_flops(L, W, cfg.mlp_ratio, ctx=S)
    if not cfg.continuous:
        f += 2 * L * W * cfg.vocab_size
    return f


def train_flops_per_image(cfg: ModelConfig) -> int:
    """Forward FLOPs of one training image, the paper's 'model GFLOPs' (x1e9)."""
    f = backbone_flops(cfg)
    if cfg.continuous:
        f += cfg.diffusion_batch_mul * cfg.num_tokens * head_flops_per_token(cfg)
    return f
