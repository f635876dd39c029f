"""`fluid train-tokenizer vae|vq`: small image tokenizers for the shapes world, in diffusers' formats.

A diffusers `AutoencoderKL` (continuous: the paper's SD-VAE role) and a diffusers `VQModel`
(discrete: the paper's VQGAN role), trained from scratch on images drawn by the shapes generator
and saved with `save_pretrained`, so `fluid tokenize --tokenizer DIR` and `fluid sample` load them
as they load the real ones. The training loops are ours (diffusers ships models, not tokenizer
training): the VAE minimises MSE plus a KL term weighted as SD's (1e-6 of the summed
reconstruction loss); the VQ minimises MSE plus the VQ-VAE codebook and commitment (beta 0.25)
losses through a straight-through estimator, with the codebook seeded from encoder outputs and
unused codes restarted on them (short CPU runs otherwise collapse onto a few codes). After
training the VAE's `scaling_factor` / `shift_factor` are set so latent means are zero-mean,
unit-variance tokens, as SD's 0.18215 does for its VAE. Quality (PSNR, and shapes-GenEval of the
reconstructions) is measured on held-out images and saved as fluid-tokenizer.json. The settings
and the measurements behind them: docs/shapes.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluid_cli.errors import FluidError
from fluid_cli.shapes.generator import GRID, check_world, record
from fluid_cli.shapes.quality import EVAL_SEED, evaluate
from fluid_cli.stages.patch_local import PatchLocal, fold

log = logging.getLogger(__name__)
KL_WEIGHT = 1e-6  # SD's autoencoder: 1e-6 x KL against the summed reconstruction loss
BETA = 0.25  # VQ-VAE commitment weight


@dataclass(frozen=True)
class TokenizerSettings:
    """How a shapes tokenizer is built and trained (`fluid train-tokenizer` options)."""

    kind: str  # "vae" | "vq"
    size: int = 64  # image side in pixels
    layout: str = "grid"  # the shapes world it is trained on (generator.LAYOUTS)
    # pixels per side of the cell the encoder sees alone (stages/patch_local.py); 0: the layout's
    # default, one grid cell (16 px at 64) for "grid", the whole image for "free"
    patch: int = 0
    downsample: int = 0  # 0: size / 8 (64 px: VAE 8x8x4 -> 16 tokens; 32 px: 4, VQ 8x8 = 64 codes)
    # per encoder block (the first len(blocks) are used); () = the kind's default: at 3000 x 4
    # the VAE did better at (16, 32, 64) (31.2 vs 29.2 dB), the VQ at (32, 64, 64) (31.3 vs 26.9)
    channels: tuple[int, ...] = ()
    # VAE latents (4, as SD: grouped 2x2 -> 16-channel tokens); VQ: the code dimension. 0: the kind's
    # default, VAE 4, VQ 16: a 16 px cell's 16 numbers, as the VAE gives it (resolved_latent_channels)
    latent_channels: int = 0
    vocab: int = 512  # VQ codebook size
    kl_weight: float = KL_WEIGHT  # VAE: weight of the KL term against the summed reconstruction loss
    norm_groups: int = 1  # GroupNorm groups; one group of 16 channels (SD: 32 of 128+), not
    # instance norm, which 16 groups of one channel would be and which trained slower here
    # the defaults are for the default grid world, where a step trains on the ~47 distinct cells of
    # 64 images (training_batch): 800 steps at 2e-3, annealed to zero (lr_factor), took the VAE to
    # 33.8-35.5 dB and a reconstruction shapes-GenEval of 0.94-1.00 over three seeds; at 3e-3 it was
    # 0.87-0.90. The free layout (whole images) was measured best at 3000 steps x 4 images at 2e-3
    # (the VQ needs all 3000: 25.8 dB at 2000, 32.4 at 3000; small batches won at a fixed budget);
    # docs/shapes.md
    steps: int = 800
    batch_size: int = 64
    lr: float = 0.0  # 0: the kind's default (resolved_lr)
    seed: int = 0

    def resolved_lr(self) -> float:
        """VAE 2e-3; VQ 5e-4: at 2e-3 the VQ's encoder at --downsample 16 stalled on the background
        (reconstruction MSE 0.15 after 200 steps as a plain autoencoder; 5e-4 with 16-dim codes:
        0.018), and the 800-step VQ reached 32.1 / 33.8 dB, ceiling 0.89 / 0.995 (seeds 0 / 1)
        instead of 18-21 dB and 0.00-0.05 (docs/shapes.md)."""
        return self.lr or (5e-4 if self.kind == "vq" else 2e-3)

    def resolved_latent_channels(self) -> int:
        return self.latent_channels or (16 if self.kind == "vq" else 4)

    def resolved_downsample(self) -> int:
        return self.downsample or max(2, self.size // 8)

    def resolved_patch(self) -> int:
        """Cell side the encoder sees alone; 0 = the whole image."""
        if self.patch:
            return self.patch
        return self.size // GRID if self.layout == "grid" else 0


def model_config(s: TokenizerSettings) -> dict:
    """The diffusers config: one down block per halving plus one, no mid-block attention (at 4x4 -
    8x8 latents convolutions already see the whole image)."""
    f, side = s.resolved_downsample(), s.resolved_patch() or s.size
    if f not in (2, 4, 8, 16) or side % f or s.size % side:
        raise FluidError(
            f"--downsample {f} must be 2, 4, 8 or 16 and divide the encoder's input side {side}, "
            f"which must divide --size {s.size}"
        )
    blocks = int(math.log2(f)) + 1
    widths = s.channels or ((16, 32, 64) if s.kind == "vae" else (32, 64, 64))
    channels = tuple(widths[min(i, len(widths) - 1)] for i in range(blocks))
    cfg = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "norm_num_groups": s.norm_groups,
        "mid_block_add_attention": False,
        "sample_size": side,
        "latent_channels": s.resolved_latent_channels(),
    }
    if s.kind == "vq":
        cfg.update(num_vq_embeddings=s.vocab, vq_embed_dim=s.resolved_latent_channels())
    return cfg


def build_model(s: TokenizerSettings):
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(s.seed)  # deterministic init
    cls = {"vae": AutoencoderKL, "vq": VQModel}.get(s.kind)
    if cls is None:
        raise FluidError(f"unknown tokenizer kind {s.kind!r}; valid: vae, vq")
    model = cls(**model_config(s))
    if s.kind == "vae":
        # start with a near-deterministic posterior (std ~0.05, not 1): otherwise the decoder first
        # sees mostly noise, and with SD's tiny KL weight unlearning it takes most of a short run
        with torch.no_grad():
            model.quant_conv.bias[s.resolved_latent_channels() :] = -6.0
    return model


def images(seed: int, start: int, n: int, size: int, layout: str = "grid") -> torch.Tensor:
    """Records start..start+n of a seed as a (n, 3, size, size) batch in [-1, 1]."""
    arr = np.stack([record(seed, i, size, layout)[0] for i in range(start, start + n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def training_batch(s: TokenizerSettings, step: int) -> torch.Tensor:
    """Step `step`'s encoder inputs: whole images, or for a patch-local tokenizer the distinct cells
    of batch_size images (each once). An image is ~85% plain background cells, all alike once
    encoded alone, and on the grid world the same few dozen object cells recur: training on every
    cell spent most steps on the background and reached 0.09 MSE in 320 steps, where the distinct
    cells reached 0.023 (docs/shapes.md)."""
    x = images(s.seed, step * s.batch_size, s.batch_size, s.size, s.layout)
    patch = s.resolved_patch()
    if not patch:
        return x
    cells = fold(x, s.size // patch)  # (B * cells^2, 3, patch, patch)
    return torch.unique(cells.flatten(1), dim=0).reshape(-1, *cells.shape[1:])  # sorted: deterministic


def _reconstruction_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # L2 only: with L1 the ~85% flat grey background keeps sending full-size sign gradients once it
    # is right, and a 300-step run lost 1.3 dB PSNR to L1 + L2 (docs/shapes.md)
    return F.mse_loss(y, x)


def vae_loss(model, x: torch.Tensor, kl_weight: float = KL_WEIGHT) -> tuple[torch.Tensor, dict]:
    post = model.encode(x).latent_dist
    y = model.decode(post.sample()).sample
    rec = _reconstruction_loss(x, y)
    kl = post.kl().mean() / x[0].numel()  # per image, on the same per-pixel scale as `rec`
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


class CodeStats:
    """Code hits over a window of steps; codes never hit in a window are dead and restart on
    current encoder outputs (VQGAN-style restarts: short CPU runs otherwise use a few codes)."""

    def __init__(self, vocab: int, window: int = 100):
        self.counts, self.window, self.used = torch.zeros(vocab), window, vocab

    def update(self, idx: torch.Tensor) -> None:
        self.counts += torch.bincount(idx.flatten(), minlength=self.counts.numel()).float()

    def maybe_restart(self, step: int, codebook: torch.Tensor, z: torch.Tensor, g: torch.Generator) -> int:
        if (step + 1) % self.window:
            return 0
        dead = (self.counts == 0).nonzero().flatten()
        self.used = self.counts.numel() - len(dead)
        if len(dead):
            pick = torch.randint(0, z.shape[0], (len(dead),), generator=g)
            noise = 0.01 * z.detach().std() * torch.randn(len(dead), z.shape[1], generator=g)
            codebook.data[dead] = z[pick].detach() + noise
        self.counts.zero_()
        return len(dead)


def vq_warmup_steps(steps: int) -> int:
    """Steps the VQ first trains as a plain autoencoder (no quantizer), before its codebook is
    seeded on the encoder outputs. Quantizing from step 0, the encoder collapsed: its outputs
    shrank to one point (commitment loss 4e-8, 18 codes used, every image decoded as background,
    21.4 dB and a reconstruction shapes-GenEval of 0.00 in 800 steps); codes seeded on outputs that
    already tell the cells apart keep them apart (docs/shapes.md)."""
    return steps // 4


def vq_loss(model, x: torch.Tensor, stats: CodeStats, g: torch.Generator, step: int, warmup: int = 0):
    h = model.encode(x).latents  # (B, D, h, w), the input of model.quantize
    b, d, hh, ww = h.shape
    if step < warmup:  # the autoencoder phase: decode the encoder outputs themselves
        y = model.decode(h, force_not_quantize=True).sample
        rec = _reconstruction_loss(x, y)
        return rec, {"rec": rec.item(), "commit": 0.0, "codes_used": 0, "restarted": 0}
    z = h.permute(0, 2, 3, 1).reshape(-1, d)
    codebook = model.quantize.embedding.weight
    if step == warmup:  # seed the codebook on encoder outputs, so every code starts where data is
        pick = torch.randint(0, z.shape[0], (codebook.shape[0],), generator=g)
        noise = 0.01 * z.detach().std() * torch.randn(codebook.shape, generator=g)
        codebook.data.copy_(z[pick].detach() + noise)
    idx = torch.cdist(z, codebook).argmin(dim=1)  # as diffusers' VectorQuantizer picks codes
    zq = codebook[idx]
    codebook_loss, commit = F.mse_loss(zq, z.detach()), F.mse_loss(z, zq.detach())
    zq_st = (z + (zq - z).detach()).reshape(b, hh, ww, d).permute(0, 3, 1, 2)  # straight-through
    y = model.decode(zq_st, force_not_quantize=True).sample
    rec = _reconstruction_loss(x, y)
    stats.update(idx)
    restarted = stats.maybe_restart(step, codebook, z, g)
    loss = rec + codebook_loss + BETA * commit
    info = {"rec": rec.item(), "commit": commit.item(), "codes_used": stats.used, "restarted": restarted}
    return loss, info


def lr_factor(step: int, steps: int) -> float:
    """The LR multiplier at `step` (0-based) of `steps`: linear warm-up over min(50, steps/4) steps,
    then a cosine that reaches ~0 at the last step. The earlier schedule ended at 0.1x, and the grid
    world's 800-step VAE then depended on luck: 34.5 and 29.5 dB for seeds 0 and 1 at 2e-3
    (reconstruction shapes-GenEval 0.96 and 0.45), and the same seed gave 36.7 dB on one CPU and
    32.2 on another. Annealed to zero: 35.5 and 34.6 dB (1.00, 0.94); docs/shapes.md."""
    warmup = max(1, min(50, steps // 4))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train(model, s: TokenizerSettings, progress=None) -> tuple[object, list[dict]]:
    """The training loop: fresh generator images every step, AdamW, warm-up then cosine to zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.resolved_lr(), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, s.steps))
    g = torch.Generator().manual_seed(s.seed)
    stats = CodeStats(s.vocab)
    history = []
    model.train()
    for step in range(s.steps):
        x = training_batch(s, step)
        if s.kind == "vae":
            loss, info = vae_loss(model, x, s.kl_weight)
        else:
            loss, info = vq_loss(model, x, stats, g, step, vq_warmup_steps(s.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": loss.item(), **info})
        if progress:
            progress(history[-1])
    return model.eval(), history


@torch.no_grad()
def calibrate(model, x: torch.Tensor, encoder=None) -> dict:
    """Set the VAE's shift_factor / scaling_factor so (mean - shift) * scaling of latents is
    zero-mean, unit-variance over held-out images (image_tokenize applies them that way).
    `encoder`: how the pipeline encodes with `model` (a PatchLocal wrapper), default the model."""
    mean = (encoder or model).encode(x).latent_dist.mean
    shift, scale = float(mean.mean()), float(1.0 / mean.std())
    model.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"shift_factor": shift, "scaling_factor": scale}


def train_tokenizer(s: TokenizerSettings, out: Path, progress=None) -> dict:
    """The `fluid train-tokenizer vae|vq` stage: train, calibrate, evaluate, save_pretrained(out).
    Writes out/fluid-tokenizer.json (settings, timings, quality) last and returns it."""
    check_world(s.size, s.layout)
    if s.steps < 1 or s.batch_size < 1:
        raise FluidError("--steps and --batch-size must be at least 1")
    out = Path(out)
    model = build_model(s)
    patch = s.resolved_patch()
    wrapped = PatchLocal(model, patch) if patch else model  # how the pipeline will encode
    t0 = time.perf_counter()
    model, history = train(model, s, progress)  # on cells, for a patch-local one (training_batch)
    train_s = time.perf_counter() - t0
    held_out = images(EVAL_SEED, 10_000, 256, s.size, s.layout)
    extra = calibrate(model, held_out, wrapped) if s.kind == "vae" else {}
    model.save_pretrained(out)  # before evaluating: a finished training is never lost
    quality, _ = evaluate(wrapped, s.size, s.layout)
    f, widths = s.resolved_downsample(), list(model.config.block_out_channels)
    grid = s.size // f
    tokens = (grid // 2) ** 2 if s.kind == "vae" else grid**2  # the VAE's latents are grouped 2x2
    report = {
        "kind": s.kind,
        "class": type(model).__name__,
        "settings": {
            **asdict(s),
            "downsample": f,
            "channels": widths,
            "patch": patch,
            "lr": s.resolved_lr(),
            "latent_channels": s.resolved_latent_channels(),
        },
        "patch": patch,  # read by fluid tokenize / sample: each patch x patch cell is encoded alone
        "latent_grid": [grid, grid],
        "tokens_per_image": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1),
        "final": history[-1],
        **extra,
        **quality,
    }
    (out / "fluid-tokenizer.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def run_train_tokenizer(kind: str, out: Path, threads: int = 1, **options) -> dict:
    """The `fluid train-tokenizer` stage: vae / vq (TokenizerSettings options) or t5 (the text
    encoder: options width, layers, heads, seed). Runs on `threads` CPU threads (0: torch's
    default), restored afterwards. Logs progress to stderr about ten times."""
    before = torch.get_num_threads()
    if threads:
        # a batch of 4 small images gains little from threads (1.4x from 2 on an idle 2-core box)
        # and on a busy machine threads that wait for each other ran 50x slower (docs/shapes.md)
        torch.set_num_threads(threads)
    try:
        return _run(kind, out, **options)
    finally:
        torch.set_num_threads(before)


def _run(kind: str, out: Path, **options) -> dict:
    if kind == "t5":
        from fluid_cli.shapes.text_encoder import build_text_encoder

        keep = {k: options[k] for k in ("width", "layers", "heads", "seed") if k in options}
        return build_text_encoder(out, **keep)
    if kind not in ("vae", "vq"):
        raise FluidError(f"unknown tokenizer kind {kind!r}; valid: vae, vq, t5")
    fields = set(TokenizerSettings.__dataclass_fields__)
    s = TokenizerSettings(kind=kind, **{k: v for k, v in options.items() if k in fields and v is not None})
    steps = s.steps
    t0, every = time.perf_counter(), max(1, steps // 10)

    def progress(h: dict) -> None:
        if h["step"] % every == 0 or h["step"] == steps:
            info = " ".join(f"{k} {v:.4g}" for k, v in h.items() if k != "step")
            log.info("%s step %d/%d %s (%.0f s)", kind, h["step"], steps, info, time.perf_counter() - t0)

    report = train_tokenizer(s, out, progress)
    log.info(
        "%s: %.2f dB PSNR, shapes-GenEval of reconstructions %.3f, %d tokens/image; trained in %.0f s",
        kind, report["psnr_db"], report["geneval_recon"], report["tokens_per_image"], report["train_seconds"],
    )  # fmt: skip
    return report
