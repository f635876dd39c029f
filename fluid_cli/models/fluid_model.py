"""FluidModel: one backbone for the paper's four variants (modules and the training loss only).

    text (B,S,Dt) -> TextAligner -> ctx (B,S,W)
    image tokens -> embed (Linear for continuous, tied Embedding for discrete) -> + pos
      random order: masked positions replaced by a learnable mask token, bidirectional attention
      raster order: shifted right behind a learnable start token, causal attention
    -> blocks of [self-attn, cross-attn(ctx), MLP] -> LayerNorm -> z (B,L,W)
    -> continuous: per-token DiffusionHead(z) (diffusion loss); discrete: z @ E^T (cross-entropy)
Sampling loops live in fluid_cli/sampling/, not here (as diffusers separates models and pipelines).
All randomness comes from per-sample keys (models/keyed_random.py), never from global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.diffusion_head import DiffusionHead
from fluid_cli.models.transformer import Block, KVCache, TextAligner


class FluidModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        W, L = cfg.width, cfg.num_tokens
        self.aligner = TextAligner(cfg.text_dim, cfg.text_len, W, cfg.heads, cfg.aligner_depth, cfg.mlp_ratio)
        if cfg.continuous:
            self.token_in = nn.Linear(cfg.token_channels, W)
        else:
            self.token_emb = nn.Embedding(cfg.vocab_size, W)
            self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # random order: the mask token; raster order: the start token that precedes token 0
        # random order: the mask token; raster: the start token (a checkpoint key, so not renamed)
        self.special_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos = nn.Parameter(torch.zeros(1, L, W))
        self.blocks = nn.ModuleList(
            [Block(W, cfg.heads, cfg.mlp_ratio, cross=True) for _ in range(cfg.depth)]
        )
        self.norm_out = nn.LayerNorm(W, eps=1e-6)
        self._init_weights()  # before the head: it zero-inits its own output layers (as MAR/DiT)
        if cfg.continuous:
            self.head = DiffusionHead(
                token_dim=cfg.token_channels,
                cond_dim=W,
                width=cfg.head_width,
                depth=cfg.head_depth,
                num_train_steps=cfg.diffusion_steps,
                batch_mul=cfg.diffusion_batch_mul,
                prediction=cfg.head_prediction,
            )
        # The empty caption's T5 states: the unconditional input for classifier-free guidance. Set
        # from the text artifact at train start and saved with the weights, so sampling needs no data.
        self.register_buffer("null_text", torch.zeros(cfg.text_len, cfg.text_dim))
        self.register_buffer("null_text_len", torch.ones((), dtype=torch.int64))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in (self.special_token, self.pos):
            nn.init.trunc_normal_(p, std=0.02)

    # ---- pieces shared by training and the samplers ------------------------------------------
    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.aligner(text, text_mask)  # (B, S, W)

    def null_text_batch(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption padded to `length`: (B, S, Dt) states and (B, S) mask."""
        text = self.null_text[:length].unsqueeze(0).expand(batch, -1, -1)
        mask = torch.arange(length, device=text.device) < self.null_text_len
        return text, mask.unsqueeze(0).expand(batch, -1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) latents or (B, T) codes -> (B, T, W)."""
        if self.cfg.continuous:
            return self.token_in(tokens)
        return self.token_emb(tokens)

    def backbone(
        self,
        x: torch.Tensor,  # (B, T, W) embedded inputs, positions already added
        ctx: torch.Tensor,
        ctx_mask: torch.Tensor,
        causal: bool,
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = blk(x, ctx, ctx_mask, causal=causal, cache=cache, start=start)
        return self.norm_out(x)  # (B, T, W)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Discrete head: the input embedding reused as the output projection (weight tying)."""
        return z @ self.token_emb.weight.t() + self.out_bias  # (B, T, V)

    # ---- training ------------------------------------------------------------------------------
    def random_mask(self, keys: torch.Tensor) -> torch.Tensor:
        """MaskGIT training mask: ratio = cos(pi/2 * u), u ~ U(0,1); at least one token masked."""
        L = self.cfg.num_tokens
        u = kr.uniform(keys, (1,), kr.STREAM_MASK_RATIO)  # (B, 1)
        num_masked = torch.clamp(torch.ceil(torch.cos(math.pi / 2 * u) * L), 1, L)  # (B, 1)
        order = kr.uniform(keys, (L,), kr.STREAM_ORDER)  # (B, L): random priority per position
        rank = order.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order
        return rank < num_masked  # (B, L) bool, static shape (no data-dependent gathers)

    def condition_states(
        self,
        tokens: torch.Tensor,  # (B, L, C) or (B, L)
        text: torch.Tensor,  # (B, S, Dt)
        text_mask: torch.Tensor,  # (B, S)
        mask: torch.Tensor | None,  # (B, L) bool, random order: True = hidden behind the mask token
    ) -> torch.Tensor:
        """Backbone outputs z (B, L, W); z[:, i] is the condition for predicting token i."""
        return self.backbone_pass(tokens, self.encode_text(text, text_mask), text_mask, mask)

    def backbone_pass(
        self,
        tokens: torch.Tensor,  # (B, L, C) or (B, L)
        ctx: torch.Tensor,  # (B, S, W) aligned text (encode_text), computed once by samplers
        ctx_mask: torch.Tensor,  # (B, S)
        mask: torch.Tensor | None,  # (B, L) bool, random order: True = hidden behind the mask token
    ) -> torch.Tensor:
        """`condition_states` for already aligned text: the full-sequence backbone pass of training and
        random order (turning tokens into pixels is sampling/decode.py's job, not this)."""
        B = tokens.shape[0]
        x = self.embed_tokens(tokens)
        if self.cfg.random_order:
            x = torch.where(mask[..., None], self.special_token.to(x.dtype), x)
        else:  # raster: token i is predicted at position i from tokens < i (shift right)
            x = torch.cat([self.special_token.to(x.dtype).expand(B, 1, -1), x[:, :-1]], dim=1)
        return self.backbone(x + self.pos, ctx, ctx_mask, causal=not self.cfg.random_order)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, L, C) float latents or (B, L) long codes
        text: torch.Tensor,  # (B, S, Dt)
        text_mask: torch.Tensor,  # (B, S) bool
        keys: torch.Tensor,  # (B,) int64 per-sample random keys
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-token losses x weights, sum of weights): diffusion loss or cross-entropy.

        Sums, not a mean, so the training loop can divide by the weight of the whole global batch:
        then the loss is the same however the batch is split into micro-batches and processes.
        """
        B, L = tokens.shape[:2]
        mask = self.random_mask(keys) if self.cfg.random_order else None
        z = self.condition_states(tokens, text, text_mask, mask)
        weight = mask.to(torch.float32) if mask is not None else torch.ones(B, L, device=z.device)
        if self.cfg.continuous:
            return self._diffusion_loss(tokens, z, weight, keys)
        ce = F.cross_entropy(self.logits(z).float().flatten(0, 1), tokens.flatten(), reduction="none")
        return (ce * weight.flatten()).sum(), weight.sum()

    def token_weights(self, keys: torch.Tensor) -> torch.Tensor:
        """(B,) number of tokens each sample's loss covers (masked ones, or all for raster)."""
        if self.cfg.random_order:
            return self.random_mask(keys).sum(dim=1).to(torch.float32)
        return torch.full(keys.shape, float(self.cfg.num_tokens), device=keys.device)

    def _diffusion_loss(self, tokens, z, weight, keys) -> torch.Tensor:
        B, L, C = tokens.shape
        mul, T = self.cfg.diffusion_batch_mul, self.cfg.diffusion_steps
        # keyed timesteps and noise, laid out (mul, B, L) to match the head's repeat of (B*L) rows
        t = kr.randint(keys, (mul, L), T, kr.STREAM_DIFF_T).transpose(0, 1).reshape(-1)
        noise = kr.normal(keys, (mul, L, C), kr.STREAM_DIFF_NOISE).transpose(0, 1).reshape(-1, C)
        per_token = self.head.per_token_loss(tokens.reshape(B * L, C).float(), z.reshape(B * L, -1), t, noise)
        per_token = per_token.view(mul, B * L).mean(0)  # average of the `mul` noise draws
        return (per_token * weight.reshape(-1)).sum(), weight.sum()
