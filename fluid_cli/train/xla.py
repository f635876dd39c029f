"""TPU specifics (torch-xla, PJRT runtime, SPMD): the toolkit's only torch_xla imports besides backend.py.

Imported lazily, only when the device is xla; torch-xla is an optional extra pinned to its matching
torch (`pip install -e .[xla]`: torch 2.9.0 + torch-xla 2.9.0, in its own environment; see
docs/scale.md). Written against the torch-xla 2.9 API and exercised on CPU with fake torch_xla
modules (tests/test_distributed.py); not run on a TPU here.

- SPMD: one process per host drives every local chip. The mesh is (chips, 1) with axes
  ('fsdp', 'model'); inputs are sharded on the batch axis by MpDeviceLoader; for the large sizes
  every parameter is also sharded on its largest divisible dimension (ZeRO-3 / FSDP via GSPMD, the
  compiler inserts the all-gathers and reduce-scatters). Parameter names do not change.
- Step closures carry the metrics to the host after the step's graph ran (no mid-step host sync).
- Static shapes: the number of compiled graphs ('CompileTime' samples) is recorded after step 3 and
  a warning is logged when it grows later (a shape or a Python branch changed between steps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from fluid_cli.errors import FluidError

log = logging.getLogger(__name__)
SETTLE_STEPS = 3  # the first steps may compile a few graphs (first step, first optimizer step)
_STATE: dict = {}  # the mesh and the recompile watch of this process


def require() -> None:
    """ImportError when torch-xla is not installed (backend.py turns it into a FluidError)."""
    import torch_xla.core.xla_model  # noqa: F401


def _xm():
    import torch_xla.core.xla_model as xm

    return xm


def device() -> torch.device:
    return _xm().xla_device()


def mark_step() -> None:
    _xm().mark_step()


def wait() -> None:
    _xm().wait_device_ops()


def add_step_closure(fn: Callable[..., None], args: tuple = ()) -> None:
    _xm().add_step_closure(fn, args=args)


def compile_count() -> int:
    """Graphs compiled so far in this process (samples of the 'CompileTime' metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class RecompileWatch:
    """Warns when XLA compiles new graphs after the first SETTLE_STEPS steps."""

    def __init__(self, settle_steps: int = SETTLE_STEPS) -> None:
        self.settle, self.steps, self.baseline = settle_steps, 0, 0
        self.warnings = 0

    def after_step(self) -> None:
        self.steps += 1
        if self.steps < self.settle:
            return
        n = compile_count()
        if self.steps > self.settle and n > self.baseline:
            self.warnings += 1
            log.warning(
                "XLA compiled %d new graph(s) at step %d (%d in all): shapes are not static. One "
                "more after the first validation or checkpoint is expected; growth at every step is "
                "not (check batch shapes, micro_batch_size and Python branches on tensor values)",
                n - self.baseline,
                self.steps,
                n,
            )
        self.baseline = n


def recompile_watch() -> RecompileWatch:
    return _STATE.setdefault("watch", RecompileWatch())


def peak_memory_bytes(dev: torch.device) -> int:
    info = _xm().get_memory_info(dev)
    return int(info.get("peak_bytes_used", info.get("bytes_used", 0))) if isinstance(info, dict) else 0


def device_kind() -> str:
    """'TPU v5p-8' from the TPU VM's environment (matched against bench.PEAK_TFLOPS)."""
    kind = os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("ACCELERATOR_TYPE")
    return f"TPU {kind}" if kind else f"xla ({os.environ.get('PJRT_DEVICE', 'unknown')})"


def checkpoint_fn() -> Callable:
    """Activation checkpointing that XLA does not optimise away (torch_xla's version adds
    optimisation barriers). Its reentrant form takes no keyword arguments, so they are closed over:
    here they are flags and boolean masks, nothing that needs a gradient."""
    from torch_xla.utils.checkpoint import checkpoint

    def run(f: Callable, *args, **kwargs):
        return checkpoint(lambda *a: f(*a, **kwargs), *args, use_reentrant=True)

    return run


# ---- SPMD -------------------------------------------------------------------------------------------
def enable_spmd() -> None:
    """Must run before any tensor is placed on the device (torch-xla's rule)."""
    import torch_xla.runtime as xr

    if xr.process_count() > 1:
        raise FluidError(
            "multi-host TPU slices are not supported yet (needs per-host data splits and "
            "torch_xla's distributed checkpoint planner); use a single-host slice (docs/scale.md)"
        )
    xr.use_spmd()


def mesh():
    if "mesh" not in _STATE:
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        n = xr.global_runtime_device_count()
        _STATE["mesh"] = xs.Mesh(np.arange(n), (n, 1), ("fsdp", "model"))
    return _STATE["mesh"]


def shard_model(model: nn.Module, shard_params: bool) -> int:
    """Shard each parameter over the 'fsdp' axis on its largest divisible dim (when shard_params);
    parameters left unmarked are replicated. Returns the number of sharded parameters."""
    if not shard_params:
        return 0
    import torch_xla.distributed.spmd as xs

    m = mesh()
    n, count = m.mesh_shape[0], 0
    for p in model.parameters():
        dims = [d for d in range(p.ndim) if p.shape[d] % n == 0]
        if not dims:
            continue  # small vectors stay replicated
        d = max(dims, key=lambda i: p.shape[i])
        xs.mark_sharding(p, m, tuple("fsdp" if i == d else None for i in range(p.ndim)))
        count += 1
    log.info("SPMD: %d parameters sharded over %d devices", count, n)
    return count


def device_loader(loader, dev: torch.device, example: dict[str, torch.Tensor], batch: int):
    """MpDeviceLoader: background host-to-device copies, each batch field sharded on dim 0."""
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.distributed.spmd as xs

    m = mesh()
    if batch % m.mesh_shape[0]:
        raise FluidError(f"batch {batch} does not split over {m.mesh_shape[0]} TPU devices")
    specs = {k: xs.ShardingSpec(m, ("fsdp",) + (None,) * (v.ndim - 1)) for k, v in example.items()}
    return pl.MpDeviceLoader(loader, dev, input_sharding=specs)
