"""Checkpoints that are never half-written, never non-finite, and never overwrite the last good one.

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors  ema.safetensors   weights (+ the null-text buffer), safetensors only
        config.json                           everything `sample` / `eval-*` need to rebuild the model
        train_state.pt                        optimizer + counters, written by us, read weights_only=True
        COMMIT                                written last: a directory without it is ignored
A checkpoint is written into a temp directory and renamed into place; older ones are pruned only
after the new one is committed. Used by `fluid train` (save, resume) and `fluid sample` (load).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)
COMMIT = "COMMIT"


def _step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict,
    config: dict,
    keep: int = 3,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint atomically. `extra_dirs` (name -> a finished directory, e.g. FSDP's sharded
    DCP state written by every process) are moved inside before the COMMIT marker."""
    bad = non_finite(model_state) + non_finite(ema_state)
    if bad:
        raise FluidError(
            f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}; the last good checkpoint is kept"
        )
    final = _step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors")
        )
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors")
        )
        (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=1) + "\n")
        torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for name, src in (extra_dirs or {}).items():  # their files were fsynced by their writer
            os.replace(src, tmp / name)
            _fsync_dir(tmp / name)
        (tmp / COMMIT).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            need = sum(v.numel() * v.element_size() for v in [*model_state.values(), *ema_state.values()])
            raise FluidError(
                f"disk full while saving {final}: about {need * 2 / 1e9:.2f} GB are needed (weights, EMA and "
                "optimizer); the previous checkpoint is intact. Free space and rerun with --resume"
            ) from None
        raise
    prune(run_dir, keep)
    return final


def committed(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMMIT).is_file())


def prune(run_dir: Path, keep: int) -> None:
    done = committed(run_dir)
    for old in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir: Path) -> int:
    """Remove temp dirs and uncommitted checkpoint dirs left by a killed save."""
    root = Path(run_dir) / "checkpoints"
    n = 0
    for p in root.glob(".step-*.tmp-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    for p in root.glob("step-*") if root.is_dir() else []:
        if not (p / COMMIT).is_file():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def latest(run_dir: Path) -> Path | None:
    done = committed(run_dir)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A run dir (-> its latest committed checkpoint) or a checkpoint dir."""
    p = Path(path)
    if (p / COMMIT).is_file():
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():
        ck = latest(p)
        if ck is None:
            raise FluidError(f"run {p} has no committed checkpoint yet; train longer or pass --ckpt-every")
        return ck
    if p.is_dir() and (p / "model.safetensors").is_file():
        raise FluidError(
            f"checkpoint {p} has no {COMMIT} marker: it was not completely written; use an earlier one"
        )
    raise FluidError(f"{p} is neither a run directory nor a checkpoint directory")


def check_weights(ckpt: Path, which: str = "ema") -> None:
    """Cheap (headers and file sizes only): the weight files exist and are complete safetensors.
    `fluid sample` calls it before any work, so a damaged checkpoint is named in a second."""
    from safetensors import safe_open

    for name in ["model.safetensors"] + (["ema.safetensors"] if which == "ema" else []):
        path = Path(ckpt) / name
        if not path.is_file():
            raise FluidError(f"checkpoint {ckpt} has no {name}; use another checkpoint of the run")
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError
            raise FluidError(
                f"{path} is damaged or not a safetensors file ({' '.join(str(e).split())[:120]}); "
                "use another checkpoint of the run (checkpoints/step-*)"
            ) from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Weights from safetensors only. 'ema': the EMA weights overlaid on the model's buffers."""
    check_weights(ckpt, which)
    try:
        state = load_file(str(ckpt / "model.safetensors"))
        if which == "ema":
            state.update(load_file(str(ckpt / "ema.safetensors")))
    except Exception as e:  # a file damaged inside its data (the header was fine)
        raise FluidError(
            f"checkpoint {ckpt}: cannot read its weights ({' '.join(str(e).split())[:120]}); use another checkpoint"
        ) from None
    bad = non_finite(state)
    if bad:
        raise FluidError(
            f"checkpoint {ckpt} holds non-finite weights ({', '.join(bad[:3])}); use an earlier one"
        )
    return state


def load_config(ckpt: Path) -> dict:
    path = Path(ckpt) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FluidError(f"checkpoint {ckpt} has no config.json; use another checkpoint of the run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FluidError(
            f"{path} is not valid JSON ({getattr(e, 'msg', e.__class__.__name__)}); it was damaged: "
            "use another checkpoint of the run (checkpoints/step-*)"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise FluidError(
            f"{path} has no model section: not a fluid checkpoint config; use another checkpoint"
        )
    return config


def load_train_state(ckpt: Path) -> dict:
    try:  # weights_only: a tampered file cannot run code, it fails to load
        return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise FluidError(
            f"cannot read {ckpt / 'train_state.pt'} as plain training state ({type(e).__name__}); refusing to resume from it"
        ) from None
