"""Devices and processes: the only module that touches cuda / xla / mps specifics.

Decides the device once (`--device auto|cuda|xla|mps|cpu`; auto = xla when a TPU runtime is
configured, else cuda, mps, cpu), the autocast dtype (bf16 on accelerators, fp32 on CPU), the
process group from torchrun's environment, and sync / memory helpers. Model code never calls
`.cuda()`; it receives tensors on the device chosen here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)
DEVICES = ("auto", "cuda", "xla", "mps", "cpu")


def _xla_configured() -> bool:
    return bool(
        os.environ.get("PJRT_DEVICE") or os.environ.get("TPU_NAME") or os.environ.get("XRT_TPU_CONFIG")
    )


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
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise FluidError(
                "--device xla needs torch-xla: install the 'xla' extra in its own environment (docs/scale.md)"
            ) from None
        return xm.xla_device()
    if name == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 on accelerators and fp32 (no autocast) on CPU, unless asked otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise FluidError(f"unknown precision {precision!r}; valid: auto, bf16, fp32")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Dist:
    """Join torchrun's process group (nccl on cuda, gloo on cpu) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_name in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_nccl else "gloo")
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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (for honest timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()


def mark_step(device: torch.device) -> None:
    """End of a training step: XLA cuts and runs the graph here; a no-op elsewhere."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
