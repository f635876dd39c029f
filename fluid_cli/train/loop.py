"""`fluid train`: the training loop (the run's state is built in train/state.py, checkpoints in train/checkpoint.py).

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
from fluid_cli.train.state import TrainState

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


def _step_loss(state: TrainState, batch: dict, normalizer: float, train: bool) -> torch.Tensor:
    """Forward (+ backward when training) over micro-batches; returns the summed normalised loss."""
    t = state.recipe.train
    micro = t.micro_batch_size or batch["positions"].shape[0]
    total = torch.zeros((), device=state.device)
    parts = list(_micro_batches(batch, micro))
    for i, mb in enumerate(parts):
        seed = state.recipe.train.seed if train else VAL_SEED
        keys = kr.make_keys(seed, mb["positions"]).to(state.device)
        tokens, text, mask = model_inputs(
            mb,
            keys,
            state.model,
            state.model_cfg,
            state.device,
            t.cfg_dropout if train else 0.0,
            state.flip and train,
        )
        sync = (
            contextlib.nullcontext()
            if not train or i == len(parts) - 1 or state.dist.world == 1
            else state.ddp.no_sync()
        )
        with sync, backend.autocast(state.device, state.amp_dtype):
            loss_sum, _ = state.forward(tokens, text, mask, keys)
            # DDP averages gradients over processes, so scale by the world size to get a sum
            loss = loss_sum / normalizer * state.dist.world
        if train:
            loss.backward()
        total = total + loss.detach() / state.dist.world
    return total


def _global_normalizer(state: TrainState, step: int, seed: int, batch_size: int) -> float:
    """Token weight of the whole global batch, from the keys alone (cheap: no forward)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    keys = kr.make_keys(seed, positions).to(state.device)
    return float(state.model.token_weights(keys).sum().clamp(min=1))


@torch.no_grad()
def validate(state: TrainState) -> float | None:
    if not state.val_batches:  # no held-out data, or train.val_batches = 0: no val_loss at all
        return None
    state.model.eval()
    total, n = 0.0, 0
    for vb in state.val_batches:
        norm = float(
            state.model.token_weights(kr.make_keys(VAL_SEED, vb["all_positions"]).to(state.device)).sum()
        )
        total += (
            float(backend.all_reduce_mean(_step_loss(state, vb, norm, train=False), state.dist))
            * state.dist.world
        )
        n += 1
    state.model.train()
    return total / max(n, 1)


def _write_metrics(state: TrainState, row: dict) -> None:
    if state.dist.main:
        with open(state.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _save(state: TrainState, step: int) -> Path | None:
    if state.parallel == "fsdp":  # every process writes its shards (train/distributed.py)
        return distributed.save(state, step)
    path = None
    if state.dist.main:
        resume = {"step": step, "optimizer": state.optimizer.state_dict(), "bad_steps": state.bad_steps_total}
        path = ckpt.save_checkpoint(
            state.run_dir,
            step,
            state.model.state_dict(),
            state.ema.state_dict(),
            resume,
            state.run_config,
            state.recipe.train.keep_checkpoints,
        )
        log.info("saved %s", path)
    backend.barrier(state.dist)
    return path


def _consumed_crc(state: TrainState, step: int, crc: int) -> int:
    """Fold the record indices of the whole global batch of `step` into a crc32 (any world size)."""
    sampler, B = state.loader.sampler, state.recipe.train.batch_size
    return zlib.crc32(sampler.records_at(step * B, B).numpy().tobytes(), crc)


def _emit_row(state: TrainState, progress: TrainProgress, row: dict) -> None:
    """Write a metrics row once its tensors can be read (on XLA: after the step's graph ran)."""
    row = {k: float(v) if torch.is_tensor(v) else v for k, v in row.items()}
    _write_metrics(state, row)
    progress.update(row["step"], row)


def _stop_reason(state: TrainState, pre: _Preemption, run_start: float) -> tuple[str | None, float]:
    """('preempted' (SIGTERM on any process), 'time' (train.time_limit_min) or None, the share of
    the time limit used, 0 without one). Under several processes both are combined (one tiny
    all-reduce a step), so every rank stops at the same step and joins the same save (a rank
    stopping alone would deadlock the others' collectives) and uses the same learning rate."""
    limit = state.recipe.train.time_limit_min
    used = (time.monotonic() - run_start) / (limit * 60) if limit else 0.0
    flags = [float(pre.requested_at is not None), used]
    if state.dist.world > 1:
        import torch.distributed as dist

        t = torch.tensor(flags, device=state.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = t.tolist()
    return ("preempted" if flags[0] else "time" if flags[1] >= 1.0 else None), flags[1]


def _lr(t, step: int, time_used: float) -> float:
    """The step's learning rate; a time-limited run decays over the end of whichever of its step
    count or time limit ends it first (so its LR depends on the machine's speed, as its length does)."""
    return lr_at(step, t.lr, t.warmup_steps, max(step / t.steps, time_used), t.decay_fraction)


def run(state: TrainState) -> Path:
    t = state.recipe.train
    params = [p for p in state.model.parameters() if p.requires_grad]
    run_start = time.monotonic()
    deadline = run_start + t.time_limit_min * 60 if t.time_limit_min else None  # as _stop_reason
    progress = TrainProgress(t.steps, state.step, enabled=state.dist.main, deadline=deadline)
    bad_in_row, window_start, window_images = 0, time.perf_counter(), 0
    data_crc = 0  # crc32 of the record indices consumed in the log window (checks exact resume)
    time_used = 0.0  # share of the time limit used so far (for the LR's decay)
    with _Preemption() as pre, progress:
        for batch in state.loader:
            step = state.step
            if step >= t.steps:
                break
            lr = _lr(t, step, time_used)
            for g in state.optimizer.param_groups:
                g["lr"] = lr
            norm = _global_normalizer(state, step, t.seed, t.batch_size)
            loss = (
                backend.all_reduce_mean(_step_loss(state, batch, norm, train=True), state.dist)
                * state.dist.world
            )
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(gnorm))
            if finite:
                state.optimizer.step()
                state.ema.update(state.model, step)
                bad_in_row = 0
            else:  # skip: weights, optimizer state and EMA stay exactly as they were
                bad_in_row += 1
                state.bad_steps_total += 1
                log.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, bad_in_row
                )
            state.optimizer.zero_grad(set_to_none=True)
            backend.mark_step(state.device)
            state.step = step + 1
            window_images += t.batch_size
            data_crc = _consumed_crc(state, step, data_crc)
            if bad_in_row >= t.max_bad_steps:
                last = ckpt.latest(state.run_dir)
                raise FluidError(
                    f"stopped: {bad_in_row} non-finite steps in a row at step {state.step}; no checkpoint written, last good one: {last}"
                )
            stop, time_used = _stop_reason(state, pre, run_start)
            last = state.step == t.steps or stop is not None  # the last step logs, validates and saves
            if state.step % t.log_every == 0 or last:
                backend.synchronize(state.device)
                dt = time.perf_counter() - window_start
                row = {
                    "step": state.step,
                    "loss": loss,  # tensors until _emit_row: no host sync here on XLA
                    "lr": lr,
                    "grad_norm": gnorm,
                    "data_crc": data_crc,
                    "images_per_s": window_images / dt,
                    "tokens_per_s": window_images * state.model_cfg.num_tokens / dt,
                    "samples_seen": state.step * t.batch_size,
                    "skipped_steps": state.bad_steps_total,
                }
                backend.step_closure(state.device, _emit_row, (state, progress, row))
                window_start, window_images, data_crc = time.perf_counter(), 0, 0
            else:
                progress.update(state.step, None)
            if t.val_every and (state.step % t.val_every == 0 or (last and stop != "preempted")):
                v = validate(state)
                if v is not None:
                    _write_metrics(state, {"step": state.step, "val_loss": v})
                    progress.note(f"val_loss {v:.4f}")
            if (t.ckpt_every and state.step % t.ckpt_every == 0) or last:
                if bad_in_row:  # never let a streak of bad steps rotate good checkpoints out
                    log.warning("step %d: not saving during a run of non-finite steps", state.step)
                else:
                    _save(state, state.step)
            if stop:
                if stop == "preempted":
                    raise RequeueExit(
                        f"preempted at step {state.step}; checkpoint saved, rerun with --resume"
                    )
                log.info(
                    "time limit of %.2f min reached at step %d; checkpoint saved",
                    t.time_limit_min,
                    state.step,
                )
                break
    backend.synchronize(state.device)  # XLA: runs the step closures still pending (the last row)
    return state.run_dir
