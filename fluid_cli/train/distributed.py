"""Scale-out for `fluid train`: how the model is wrapped for several processes, and checkpoints that
any number of processes can read back.

    make_plan  runtime.parallel (auto | ddp | fsdp), runtime.activation_checkpointing, runtime.compile
               -> a Plan. auto: FSDP2 for sizes >= 3.1b when there are several processes, else DDP
               (size-based on purpose: under DDP, 3.1b needs 66 GB per GPU before activations for
               fp32 weights, gradients, AdamW moments and EMA; docs/scale.md).
    wrap       activation checkpointing per block, then DDP; or FSDP2 (`fully_shard` per transformer
               block and the diffusion head, then the root) with bf16 parameters and fp32 gradient
               reduction on accelerators; or torch-xla SPMD sharding on TPU (train/xla.py).
    save       FSDP: a sharded torch.distributed.checkpoint (DCP) of model, optimizer and EMA in the
               checkpoint's dcp/, plus the full model and EMA gathered into safetensors, which is what
               `sample` and `eval-*` read. Other layouts save full state from rank 0 (train/loop.py).
    restore    any checkpoint into any layout: a full one (1 process or DDP) into FSDP, an FSDP one
               into 1 process or DDP, and DCP at another world size (DCP reshards on load).
Only this module, train/xla.py and backend.py know about process groups and device meshes; the loop
sees a forward callable and an object with `no_sync()`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fluid_cli import backend
from fluid_cli.errors import FluidError
from fluid_cli.train import checkpoint as ckpt

log = logging.getLogger(__name__)
FSDP_SIZES = frozenset({"3.1b", "10.5b"})
DCP_DIR = "dcp"


@dataclass(frozen=True)
class Plan:
    parallel: str  # "single" | "ddp" | "fsdp" | "spmd" (XLA: one process drives every local chip)
    shard_params: bool  # FSDP2 on GPUs, or parameters sharded over the SPMD mesh on TPU
    activation_checkpointing: bool
    compile: bool


def make_plan(runtime: Any, size: str, world: int, device: torch.device) -> Plan:
    """Resolve the recipe's runtime section (its choices checked when it was built) into a plan."""
    want_shards = runtime.parallel == "fsdp" or (runtime.parallel == "auto" and size in FSDP_SIZES)
    if device.type == "xla":
        parallel = "spmd"
    elif world <= 1:
        parallel = "single"  # FSDP over one process would only add overhead
    else:
        parallel = "fsdp" if want_shards else "ddp"
    sharded = parallel == "fsdp" or (parallel == "spmd" and want_shards)
    ac = {"on": True, "off": False}.get(runtime.activation_checkpointing, sharded)
    return Plan(parallel, sharded, ac, runtime.compile)


def checkpointed_units(model: nn.Module) -> list[nn.Module]:
    """Blocks whose activations are recomputed in backward: text aligner, image blocks, head blocks."""
    units = [*model.aligner.blocks, *model.blocks]
    head = getattr(model, "head", None)
    return units + (list(head.blocks) if head is not None else [])


def apply_activation_checkpointing(model: nn.Module, ckpt_fn: Callable | None = None) -> int:
    """Wrap each block's forward in a checkpoint (non-reentrant).

    The forward is replaced on the instance instead of wrapping the module (checkpoint_wrapper), so
    parameter names, and with them state dicts, EMA names and safetensors keys, stay unchanged.
    """
    fn = ckpt_fn or (lambda f, *a, **kw: checkpoint(f, *a, use_reentrant=False, **kw))
    units = checkpointed_units(model)
    for unit in units:
        inner = unit.forward
        unit.forward = lambda *a, _inner=inner, **kw: fn(_inner, *a, **kw)
    return len(units)


class FSDPGradSync:
    """The loop's `no_sync()` under FSDP2: a no-op on purpose. Gradients are reduce-scattered after
    every micro-batch and accumulate sharded, so memory stays at 1/world per process; skipping the
    sync would hold full unsharded fp32 gradients (44 GB for 10.5b) until the last micro-batch."""

    def no_sync(self):
        return contextlib.nullcontext()


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    units = [*model.aligner.blocks, *model.blocks]
    head = getattr(model, "head", None)
    return units + ([head] if head is not None else [])


def _wrap_fsdp(model: nn.Module, plan: Plan, device: torch.device, amp: torch.dtype | None, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    # bf16 gathers and compute copies, fp32 reduce-scatter and fp32 master shards. Inputs are not
    # cast: autocast does the compute casts (as under DDP) and the diffusion targets stay fp32.
    mp = MixedPrecisionPolicy(
        param_dtype=amp, reduce_dtype=torch.float32 if amp else None, cast_forward_inputs=False
    )
    for unit in _fsdp_units(model):
        if plan.compile:
            unit.compile()  # in place, per block: names unchanged, FSDP hooks stay outside the graph
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model, FSDPGradSync()


def wrap(model: nn.Module, plan: Plan, device: torch.device, amp: torch.dtype | None, world: int):
    """Returns (forward callable, grad-sync object or None). Build the optimizer and EMA after this:
    FSDP2 replaces the parameters by DTensor shards."""
    if plan.activation_checkpointing:
        ckpt_fn = None
        if plan.parallel == "spmd":
            from fluid_cli.train import xla

            ckpt_fn = xla.checkpoint_fn()  # XLA would otherwise CSE the recomputation away
        n = apply_activation_checkpointing(model, ckpt_fn)
        log.info("activation checkpointing on %d blocks", n)
    if plan.parallel == "fsdp":
        return _wrap_fsdp(model, plan, device, amp, world)
    if plan.parallel == "spmd":
        from fluid_cli.train import xla

        xla.shard_model(model, plan.shard_params)
        if plan.compile:
            log.info("runtime.compile ignored on XLA: the lazy-tensor graph is already compiled")
        return model, None
    forward, ddp = model, None
    if plan.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        forward = ddp
    if plan.compile:
        forward = torch.compile(forward)  # DDP: DDPOptimizer splits the graph at gradient buckets
    return forward, ddp


# ---- checkpoints ---------------------------------------------------------------------------------
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full_cpu(state: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """Gather DTensors one at a time (a collective: every rank calls it); rank 0 keeps CPU copies."""
    out = {}
    for k, v in state.items():
        full = v.full_tensor() if _is_dtensor(v) else v
        if main:
            out[k] = full.detach().cpu()
    return out


def save(train_state: Any, step: int) -> Path | None:
    """FSDP checkpoint, called by EVERY process: sharded DCP + full safetensors written by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    root = Path(train_state.run_dir) / "checkpoints"
    staging = root / f".step-{step:08d}.tmp-dcp"  # matches ckpt.clean_partial's pattern
    if train_state.dist.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    backend.barrier(train_state.dist)
    sharded = {
        "model": get_model_state_dict(train_state.model),
        "optim": get_optimizer_state_dict(train_state.model, train_state.optimizer),
        "ema": train_state.ema.state_dict(),
    }
    dcp.save(sharded, checkpoint_id=str(staging))
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_full = get_model_state_dict(train_state.model, options=full_opts)  # rank 0 only holds the result
    ema_full = _full_cpu(train_state.ema.state_dict(), train_state.dist.main)
    path = None
    if train_state.dist.main:
        state = {"step": step, "bad_steps": train_state.bad_steps_total, "layout": "fsdp"}
        path = ckpt.save_checkpoint(
            train_state.run_dir,
            step,
            model_full,
            ema_full,
            state,
            train_state.run_config,
            train_state.recipe.train.keep_checkpoints,
            extra_dirs={DCP_DIR: staging},
        )
        log.info("saved %s (sharded state in %s/)", path, DCP_DIR)
    backend.barrier(train_state.dist)
    return path


def to_shards(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `like` (a DTensor shard: sliced locally, no communication), or
    moved to `like`'s device when `like` is a plain tensor."""
    full = full.to(like.device, like.dtype)
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    # every rank read the same file, so each can slice its own shard (src_data_rank=None)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _load_indexed_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """torch's own optimizer.state_dict() (full tensors keyed by parameter index) into any layout."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    converted = {}
    for i, per_param in state["state"].items():
        p = params[int(i)]
        converted[i] = {
            k: to_shards(v, p) if k != "step" and torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in per_param.items()
        }
    optimizer.load_state_dict({**state, "state": converted})


def _load_dcp(path: Path, model: nn.Module, optimizer, ema, everything: bool) -> None:
    """Read DCP state in place; DCP reshards it to this run's layout (any world size, or none)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state: dict[str, Any] = {"optim": get_optimizer_state_dict(model, optimizer)}
    if everything:
        state["model"], state["ema"] = get_model_state_dict(model), ema.state_dict()
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if everything:
        set_model_state_dict(model, state["model"])  # EMA shadows were filled in place
    set_optimizer_state_dict(model, optimizer, state["optim"])


def restore(path: Path, model: nn.Module, optimizer, ema, plan: Plan) -> dict:
    """Load a committed checkpoint into this run's layout; returns its training counters."""
    from safetensors.torch import load_file

    state = ckpt.load_train_state(path)
    sharded = path / DCP_DIR
    if plan.parallel == "fsdp" and sharded.is_dir():
        _load_dcp(sharded, model, optimizer, ema, everything=True)
        return state
    weights = ckpt.load_weights(path, "model")
    current = model.state_dict()
    if plan.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict({k: v.to(current[k].device) for k, v in weights.items()})
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    if "optimizer" in state:
        _load_indexed_optimizer(optimizer, state["optimizer"])
    elif sharded.is_dir():
        _load_dcp(sharded, model, optimizer, ema, everything=False)
    else:
        raise FluidError(f"checkpoint {path} holds no optimizer state; cannot resume from it")
    return state
