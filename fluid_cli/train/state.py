"""Everything `fluid train` builds before the first step: data, model, optimizer, EMA, resume state.

The run directory holds config.json (the resolved recipe, the model config, the data it was trained
on, parameter count and FLOPs), metrics.jsonl and checkpoints/. `--resume` restores the model,
optimizer, EMA and step; the data position and every random draw follow from the step (see
train/data.py), so a resumed run continues the same run (bit-identically on the same machine and
thread count; up to float rounding elsewhere).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fluid_cli import __version__, backend
from fluid_cli.config import Recipe
from fluid_cli.errors import FluidError
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.flops import train_flops_per_image
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.registry import get_variant
from fluid_cli.train import checkpoint as ckpt
from fluid_cli.train import distributed
from fluid_cli.train.data import IndexedBatches, PairedRecords, PositionSampler, collate
from fluid_cli.train.optim import EMA, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The mutable state of one training run: built (or resumed) by `build`, advanced by loop.run."""

    recipe: Recipe
    run_dir: Path
    dist: backend.Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    model_cfg: ModelConfig
    model: FluidModel
    forward: Any  # the model, or its DDP wrapper
    ddp: Any
    optimizer: torch.optim.Optimizer
    ema: EMA
    loader: Any
    val_batches: list[dict] | None
    run_config: dict
    flip: bool
    step: int = 0
    bad_steps_total: int = 0
    extra: dict = field(default_factory=dict)
    parallel: str = "single"  # single | ddp | fsdp | spmd (train/distributed.py)


def _check_variant_data(variant: str, records: PairedRecords) -> None:
    v = get_variant(variant)
    if v.tokens != records.shapes.tokens:
        have = "VAE latents (continuous)" if records.shapes.tokens == "continuous" else "VQ codes (discrete)"
        raise FluidError(
            f"variant {variant} needs {v.tokens} image tokens but {records.images.root} holds {have}; "
            f"use a {'-cont' if records.shapes.tokens == 'continuous' else '-disc'} variant or re-tokenize"
        )


def _load_null_text(model: FluidModel, records: PairedRecords, cfg_dropout: float) -> None:
    path = records.text.extra_path("null_text")
    if path is None or not path.is_file():
        if cfg_dropout > 0:
            raise FluidError(
                f"{records.text.root} has no empty-caption embedding (null_text); re-run `fluid encode-text`, or set train.cfg_dropout=0"
            )
        return
    hidden = load_file(str(path))["hidden"].float()[: model.cfg.text_len]
    model.null_text.zero_()
    model.null_text[: hidden.shape[0]] = hidden
    model.null_text_len.fill_(max(1, hidden.shape[0]))


def _val_batches(
    recipe: Recipe, records: PairedRecords, held_out: list[int], dist: backend.Dist, text_len: int
) -> list[dict] | None:
    t, d = recipe.train, recipe.data
    if t.val_batches <= 0:  # validation off: no batches (validate() then logs no val_loss)
        return None
    if d.val_image_tokens:
        val = PairedRecords(d.val_image_tokens, d.val_text or d.text, what="validation")
        indices = list(range(len(val)))
    else:
        val, indices = records, held_out
    if not indices:
        return None
    per = t.batch_size // dist.world
    out = []
    for b in range(t.val_batches):  # fixed records (cycled when there are few), fixed keys
        positions = [(b * t.batch_size + j) % len(indices) for j in range(t.batch_size)]
        mine = positions[dist.rank * per : (dist.rank + 1) * per]
        batch = collate([val[indices[p]] for p in mine], text_len)
        batch["positions"] = torch.tensor([b * t.batch_size + dist.rank * per + j for j in range(per)])
        batch["all_positions"] = torch.arange(b * t.batch_size, (b + 1) * t.batch_size)
        out.append(batch)
    return out


def _check_resume_config(saved: dict, current: dict) -> None:
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        lines = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
        raise FluidError(
            f"cannot resume: the model would change shape ({lines}); use a new --out for a new model"
        )


def _build_model(recipe: Recipe, records: PairedRecords) -> tuple[ModelConfig, FluidModel]:
    """The model on the CPU, initialised from the seed, with the data's empty-caption states."""
    sh = records.shapes
    model_cfg = ModelConfig.build(
        recipe.model.variant,
        recipe.model.size,
        token_grid=sh.token_grid,
        latent_channels=sh.latent_channels or 4,
        vocab_size=sh.vocab_size or 1,
        text_dim=sh.text_dim,
        text_len=sh.text_len,
        diffusion_batch_mul=recipe.model.diffusion_batch_mul,
        head_prediction=recipe.model.head_prediction,
        head_width_override=recipe.model.head_width,
    )
    torch.manual_seed(recipe.train.seed)  # weight init is the only use of torch's global RNG
    model = FluidModel(model_cfg)
    _load_null_text(model, records, recipe.train.cfg_dropout)
    return model_cfg, model


def _run_config(recipe: Recipe, model_cfg: ModelConfig, records: PairedRecords, n_params: int) -> dict:
    return {
        "fluid_version": __version__,
        "variant": model_cfg.variant,
        "size": model_cfg.size,
        "params": n_params,
        "gflops_per_image": train_flops_per_image(model_cfg) / 1e9,
        "model": model_cfg.to_dict(),
        "recipe": recipe.to_dict(),
        "train": recipe.to_dict()["train"],
        "data": {
            "image_tokens": records.images.attrs,
            "text": records.text.attrs,
            "image_kind": records.images.kind,
            "latent_abs_max": records.latent_abs_max(),
        },
    }


def build(recipe: Recipe, run_dir: Path, resume: bool) -> TrainState:
    dist = backend.init_distributed(recipe.runtime.device)
    device = backend.resolve_device(recipe.runtime.device, dist.local_rank)
    amp = backend.autocast_dtype(device, recipe.runtime.precision)
    plan = distributed.make_plan(recipe.runtime, recipe.model.size, dist.world, device)
    if plan.parallel == "spmd":
        from fluid_cli.train import xla

        xla.enable_spmd()  # before any tensor reaches the device
    d, t = recipe.data, recipe.train
    if not d.image_tokens or not d.text:
        raise FluidError(
            "training needs --image-tokens DIR and --text DIR (artifacts of `fluid tokenize` / `fluid encode-text`)"
        )
    records = PairedRecords(d.image_tokens, d.text, max_bad_records=d.max_bad_records)
    _check_variant_data(recipe.model.variant, records)
    model_cfg, model = _build_model(recipe, records)
    if plan.parallel != "fsdp":  # fully_shard moves one unit at a time: no full copy on the device
        model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run_dir = Path(run_dir)
    existing = ckpt.latest(run_dir)
    if existing is not None and not resume:
        raise FluidError(
            f"{run_dir} already holds checkpoints (latest {existing.name}); pass --resume to continue it, or choose a new --out"
        )
    run_config = _run_config(recipe, model_cfg, records, n_params)
    # wrap first: FSDP2 turns the parameters into DTensor shards, which optimizer and EMA then hold
    forward, ddp = distributed.wrap(model, plan, device, amp, dist.world)
    optimizer = make_optimizer(model, t.lr, (t.beta1, t.beta2), t.weight_decay)
    ema = EMA(model, t.ema_decay)
    start, bad_total = 0, 0
    if existing is not None:
        start, bad_total = _resume(existing, model_cfg, model, optimizer, ema, plan)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(run_dir)
        (run_dir / "config.json").write_text(json.dumps(run_config, indent=1) + "\n")
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    n_val = 0 if d.val_image_tokens else min(d.val_records, len(records) // 10)
    train_idx, held_out = list(range(len(records) - n_val)), list(range(len(records) - n_val, len(records)))
    loader = _loader(recipe, records, train_idx, dist, start, plan, device)
    log.info(
        "%s %s: %.1fM parameters, %d training records, %d held out for validation, device %s, %s",
        model_cfg.variant,
        model_cfg.size,
        n_params / 1e6,
        len(train_idx),
        n_val,
        backend.device_name(device),
        plan.parallel,
    )
    return TrainState(
        recipe,
        run_dir,
        dist,
        device,
        amp,
        model_cfg,
        model,
        forward,
        ddp,
        optimizer,
        ema,
        loader,
        _val_batches(recipe, records, held_out, dist, records.shapes.text_len),
        run_config,
        records.flip,
        start,
        bad_total,
        parallel=plan.parallel,
    )


def _resume(existing: Path, model_cfg: ModelConfig, model, optimizer, ema, plan) -> tuple[int, int]:
    """Restore a committed checkpoint into this run's layout; returns (step, bad steps so far)."""
    _check_resume_config(ckpt.load_config(existing)["model"], model_cfg.to_dict())
    state = distributed.restore(existing, model, optimizer, ema, plan)  # any layout, any world size
    log.info("resuming from %s (%s)", existing, plan.parallel)
    return int(state["step"]), int(state.get("bad_steps", 0))


def _loader(recipe: Recipe, records: PairedRecords, train_idx: list[int], dist, start: int, plan, device):
    """This rank's batches from step `start` on (DataLoader workers prefetch whole batches)."""
    d, t, text_len = recipe.data, recipe.train, records.shapes.text_len
    sampler = PositionSampler(train_idx, t.batch_size, dist.rank, dist.world, t.seed, start_step=start)
    loader = torch.utils.data.DataLoader(
        IndexedBatches(records, text_len),
        sampler=sampler,
        batch_size=None,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
    )
    if plan.parallel == "spmd":
        loader = _xla_loader(loader, device, records, text_len, t.batch_size)
    return loader


def _xla_loader(loader, device: torch.device, records: PairedRecords, text_len: int, batch: int):
    """TPU: background host-to-device copies with each field sharded over the chips on dim 0."""
    from fluid_cli.train import xla

    example = IndexedBatches(records, text_len)[[(0, 0)]]  # one record: the fields and their ranks
    dev_loader = xla.device_loader(loader, device, example, batch)
    dev_loader.sampler = loader.sampler  # the loop reads the data order from here
    return dev_loader


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint: they are recomputed identically."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))
