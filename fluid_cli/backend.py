"""Devices and processes: the only module, with train/xla.py, that touches cuda / xla / mps specifics.

Decides the device once (`--device auto|cuda|xla|mps|cpu`; auto = xla when a TPU runtime is
configured, else cuda, mps, cpu), the autocast dtype (bf16 on accelerators, fp32 on CPU), the
process group from torchrun's environment, compile, and sync / memory / step-closure helpers. Model
code never calls `.cuda()`; it receives tensors on the device chosen here. torch_xla is imported
lazily (through train/xla.py), so nothing here needs it unless the device is xla.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from fluid_cli.config import Device, Precision, choices
from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)
DEVICES = choices(Device)


def _xla_configured() -> bool:
    return bool(
        os.environ.get("PJRT_DEVICE") or os.environ.get("TPU_NAME") or os.environ.get("XRT_TPU_CONFIG")
    )


def _xla():
    """train/xla.py, which imports torch_xla; one clear error when torch-xla is not installed."""
    try:
        from fluid_cli.train import xla

        xla.require()
    except ImportError:
        raise FluidError(
            "--device xla needs torch-xla: install the 'xla' extra in its own environment (docs/scale.md)"
        ) from None
    return xla


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise FluidError(f"unknown device {name!r}; valid devices: {', '.join(DEVICES)}")
    if name == "auto":
        if _xla_configured():
            name = "xla"
        elif torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FluidError(
                "--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "xla":
        return _xla().device()
    if name == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 on accelerators and fp32 (no autocast) on CPU, unless asked otherwise."""
    if precision not in choices(Precision):
        raise FluidError(f"unknown precision {precision!r}; valid: {', '.join(choices(Precision))}")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_fn(fn: Callable, device: torch.device) -> Callable:
    """torch.compile, except on XLA where the lazy-tensor graph is compiled by XLA already."""
    if device.type == "xla":
        return fn
    return torch.compile(fn)


# ---- processes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    cuda: nccl for CUDA tensors plus gloo for CPU tensors (DCP's planning, object collectives), with
    this process's GPU bound first so nccl never lands every rank on cuda:0. cpu / mps: gloo.
    On TPU the SPMD runtime drives every local chip from one process, so no process group is made.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("FLUID_DIST_TIMEOUT_S", "1800")))
        use_nccl = device_name in ("auto", "cuda") and torch.cuda.is_available() and not _xla_configured()
        if use_nccl:
            torch.cuda.set_device(local)
            dist.init_process_group(
                "cpu:gloo,cuda:nccl", timeout=timeout, device_id=torch.device("cuda", local)
            )
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return Dist(rank, world, local)


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / d.world
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---- steps, syncs, memory ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued device work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xla":
        xla = _xla()
        xla.mark_step()
        xla.wait()


def mark_step(device: torch.device) -> None:
    """End of a training step: XLA cuts and runs the graph here (and counts recompilations);
    a no-op elsewhere."""
    if device.type == "xla":
        xla = _xla()
        xla.mark_step()
        xla.recompile_watch().after_step()


def step_closure(device: torch.device, fn: Callable[..., None], args: Sequence = ()) -> None:
    """Run fn(*args) once the step's values exist: on XLA after the graph has executed (so reading
    a loss does not force a host sync mid-step); elsewhere right away."""
    if device.type == "xla":
        _xla().add_step_closure(fn, tuple(args))
    else:
        fn(*args)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes since the last reset (cuda), the runtime's peak (xla), current (mps)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xla":
        return _xla().peak_memory_bytes(device)
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return 0


def device_name(device: torch.device) -> str:
    """Marketing name (matched against bench.PEAK_TFLOPS): 'NVIDIA H100 80GB HBM3', 'TPU v5p-8'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xla":
        return _xla().device_kind()
    return device.type
