"""`fluid train`: the training loop (setup lives in train/setup.py, checkpoints in train/checkpoint.py).

One step = one global batch: this process's share is split into micro-batches, each micro-batch's
summed loss is divided by the token weight of the WHOLE global batch (known up front from the keys),
so the update is identical however the batch is split. Non-finite steps are skipped without touching
weights, optimizer or EMA. SIGTERM finishes the step, saves, and exits with a requeue code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
import zlib
from pathlib import Path

import torch

from fluid_cli import backend
from fluid_cli.errors import FluidError, RequeueExit
from fluid_cli.models import keyed_random as kr
from fluid_cli.train import checkpoint as ckpt
from fluid_cli.train import distributed
from fluid_cli.train.inputs import model_inputs
from fluid_cli.train.optim import lr_at
from fluid_cli.train.progress import TrainProgress
from fluid_cli.train.setup import TrainSetup

log = logging.getLogger(__name__)
VAL_SEED = 0x7A1D  # fixed: validation masks and noise are identical across runs and seeds


class _Preemption:
    """Remembers a SIGTERM so the loop can finish its step, save and exit cleanly."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested_at = time.monotonic()
            log.warning("SIGTERM: finishing this step, saving, then exiting")

        with contextlib.suppress(ValueError):  # not the main thread (e.g. in-process tests)
            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _micro_batches(batch: dict[str, torch.Tensor], size: int):
    n = batch["positions"].shape[0]
    for a in range(0, n, size):
        yield {k: v[a : a + size] for k, v in batch.items()}


def _step_loss(s: TrainSetup, batch: dict, normalizer: float, train: bool) -> torch.Tensor:
    """Forward (+ backward when training) over micro-batches; returns the summed normalised loss."""
    t = s.recipe.train
    micro = t.micro_batch_size or batch["positions"].shape[0]
    total = torch.zeros((), device=s.device)
    parts = list(_micro_batches(batch, micro))
    for i, mb in enumerate(parts):
        seed = s.recipe.train.seed if train else VAL_SEED
        keys = kr.make_keys(seed, mb["positions"]).to(s.device)
        tokens, text, mask = model_inputs(
            mb, keys, s.model, s.model_cfg, s.device, t.cfg_dropout if train else 0.0, s.flip and train
        )
        sync = (
            contextlib.nullcontext()
            if not train or i == len(parts) - 1 or s.dist.world == 1
            else s.ddp.no_sync()
        )
        with sync, backend.autocast(s.device, s.amp_dtype):
            loss_sum, _ = s.forward(tokens, text, mask, keys)
            # DDP averages gradients over processes, so scale by the world size to get a sum
            loss = loss_sum / normalizer * s.dist.world
        if train:
            loss.backward()
        total = total + loss.detach() / s.dist.world
    return total


def _global_normalizer(s: TrainSetup, step: int, seed: int, batch_size: int) -> float:
    """Token weight of the whole global batch, from the keys alone (cheap: no forward)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    keys = kr.make_keys(seed, positions).to(s.device)
    return float(s.model.token_weights(keys).sum().clamp(min=1))


@torch.no_grad()
def validate(s: TrainSetup) -> float | None:
    if not s.val_batches:  # no held-out data, or train.val_batches = 0: no val_loss at all
        return None
    s.model.eval()
    total, n = 0.0, 0
    for vb in s.val_batches:
        norm = float(s.model.token_weights(kr.make_keys(VAL_SEED, vb["all_positions"]).to(s.device)).sum())
        total += float(backend.all_reduce_mean(_step_loss(s, vb, norm, train=False), s.dist)) * s.dist.world
        n += 1
    s.model.train()
    return total / max(n, 1)


def _write_metrics(s: TrainSetup, row: dict) -> None:
    if s.dist.main:
        with open(s.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _save(s: TrainSetup, step: int) -> Path | None:
    if s.parallel == "fsdp":  # every process writes its shards (train/distributed.py)
        return distributed.save(s, step)
    path = None
    if s.dist.main:
        state = {"step": step, "optimizer": s.optimizer.state_dict(), "bad_steps": s.bad_steps_total}
        path = ckpt.save_checkpoint(
            s.run_dir,
            step,
            s.model.state_dict(),
            s.ema.state_dict(),
            state,
            s.run_config,
            s.recipe.train.keep_checkpoints,
        )
        log.info("saved %s", path)
    backend.barrier(s.dist)
    return path


def _consumed_crc(s: TrainSetup, step: int, crc: int) -> int:
    """Fold the record indices of the whole global batch of `step` into a crc32 (any world size)."""
    sampler, B = s.loader.sampler, s.recipe.train.batch_size
    return zlib.crc32(sampler.records_at(step * B, B).numpy().tobytes(), crc)


def _emit_row(s: TrainSetup, progress: TrainProgress, row: dict) -> None:
    """Write a metrics row once its tensors can be read (on XLA: after the step's graph ran)."""
    row = {k: float(v) if torch.is_tensor(v) else v for k, v in row.items()}
    _write_metrics(s, row)
    progress.update(row["step"], row)


def _stop_reason(s: TrainSetup, pre: _Preemption, run_start: float) -> tuple[str | None, float]:
    """('preempted' (SIGTERM on any process), 'time' (train.time_limit_min) or None, the share of
    the time limit used, 0 without one). Under several processes both are combined (one tiny
    all-reduce a step), so every rank stops at the same step and joins the same save (a rank
    stopping alone would deadlock the others' collectives) and uses the same learning rate."""
    limit = s.recipe.train.time_limit_min
    used = (time.monotonic() - run_start) / (limit * 60) if limit else 0.0
    flags = [float(pre.requested_at is not None), used]
    if s.dist.world > 1:
        import torch.distributed as dist

        t = torch.tensor(flags, device=s.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = t.tolist()
    return ("preempted" if flags[0] else "time" if flags[1] >= 1.0 else None), flags[1]


def _lr(t, step: int, time_used: float) -> float:
    """The step's learning rate; a time-limited run decays over the end of whichever of its step
    count or time limit ends it first (so its LR depends on the machine's speed, as its length does)."""
    return lr_at(step, t.lr, t.warmup_steps, max(step / t.steps, time_used), t.decay_fraction)


def run(s: TrainSetup) -> Path:
    t = s.recipe.train
    params = [p for p in s.model.parameters() if p.requires_grad]
    run_start = time.monotonic()
    deadline = run_start + t.time_limit_min * 60 if t.time_limit_min else None  # as _stop_reason
    progress = TrainProgress(t.steps, s.step, enabled=s.dist.main, deadline=deadline)
    bad_in_row, window_start, window_images = 0, time.perf_counter(), 0
    data_crc = 0  # crc32 of the record indices consumed in the log window (checks exact resume)
    time_used = 0.0  # share of the time limit used so far (for the LR's decay)
    with _Preemption() as pre, progress:
        for batch in s.loader:
            step = s.step
            if step >= t.steps:
                break
            lr = _lr(t, step, time_used)
            for g in s.optimizer.param_groups:
                g["lr"] = lr
            norm = _global_normalizer(s, step, t.seed, t.batch_size)
            loss = backend.all_reduce_mean(_step_loss(s, batch, norm, train=True), s.dist) * s.dist.world
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(gnorm))
            if finite:
                s.optimizer.step()
                s.ema.update(s.model, step)
                bad_in_row = 0
            else:  # skip: weights, optimizer state and EMA stay exactly as they were
                bad_in_row += 1
                s.bad_steps_total += 1
                log.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, bad_in_row
                )
            s.optimizer.zero_grad(set_to_none=True)
            backend.mark_step(s.device)
            s.step = step + 1
            window_images += t.batch_size
            data_crc = _consumed_crc(s, step, data_crc)
            if bad_in_row >= t.max_bad_steps:
                last = ckpt.latest(s.run_dir)
                raise FluidError(
                    f"stopped: {bad_in_row} non-finite steps in a row at step {s.step}; no checkpoint written, last good one: {last}"
                )
            stop, time_used = _stop_reason(s, pre, run_start)
            last = s.step == t.steps or stop is not None  # the last step logs, validates and saves
            if s.step % t.log_every == 0 or last:
                backend.synchronize(s.device)
                dt = time.perf_counter() - window_start
                row = {
                    "step": s.step,
                    "loss": loss,  # tensors until _emit_row: no host sync here on XLA
                    "lr": lr,
                    "grad_norm": gnorm,
                    "data_crc": data_crc,
                    "images_per_s": window_images / dt,
                    "tokens_per_s": window_images * s.model_cfg.num_tokens / dt,
                    "samples_seen": s.step * t.batch_size,
                    "skipped_steps": s.bad_steps_total,
                }
                backend.step_closure(s.device, _emit_row, (s, progress, row))
                window_start, window_images, data_crc = time.perf_counter(), 0, 0
            else:
                progress.update(s.step, None)
            if t.val_every and (s.step % t.val_every == 0 or (last and stop != "preempted")):
                v = validate(s)
                if v is not None:
                    _write_metrics(s, {"step": s.step, "val_loss": v})
                    progress.note(f"val_loss {v:.4f}")
            if (t.ckpt_every and s.step % t.ckpt_every == 0) or last:
                if bad_in_row:  # never let a streak of bad steps rotate good checkpoints out
                    log.warning("step %d: not saving during a run of non-finite steps", s.step)
                else:
                    _save(s, s.step)
            if stop:
                if stop == "preempted":
                    raise RequeueExit(f"preempted at step {s.step}; checkpoint saved, rerun with --resume")
                log.info(
                    "time limit of %.2f min reached at step %d; checkpoint saved", t.time_limit_min, s.step
                )
                break
    backend.synchronize(s.device)  # XLA: runs the step closures still pending (the last row)
    return s.run_dir
