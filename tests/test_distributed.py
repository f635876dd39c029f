"""Scale-out: torchrun DDP / FSDP2 on CPU (gloo), checkpoints across process counts, the data split,
the wrapping plan, activation checkpointing, the XLA path (with fake torch_xla modules: torch-xla
cannot be installed next to this torch), and `fluid bench train` with its FLOP counts.

Two-process runs go through `torchrun --standalone --nproc_per_node 2 -m fluid_cli train` in a
subprocess; single-process runs are in-process. Loss curves are compared at fp32 tolerance: the
processes only change the order of floating-point sums.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHORT_RUN, tiny_train_args
from typer.testing import CliRunner

from fluid_cli import backend
from fluid_cli.cli import app
from fluid_cli.config import RuntimeSection
from fluid_cli.errors import FluidError
from fluid_cli.train import checkpoint as ckpt
from fluid_cli.train import distributed
from fluid_cli.train.data import PositionSampler

runner = CliRunner()
STEPS, HALF = 4, 2  # a run of STEPS; interrupted runs save at HALF and resume


def _args(synth: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return tiny_train_args(synth, out, "--seed", "3", "--steps", str(steps), "--ckpt-every", str(HALF),
                           "--val-every", "0", *SHORT_RUN, *extra, variant="rand-cont")  # fmt: skip


def _train_here(synth: Path, out: Path, steps: int, *extra: str) -> None:
    r = runner.invoke(app, _args(synth, out, steps, *extra))
    assert r.exit_code == 0, (r.output, r.exception)


def _torchrun(synth: Path, out: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run(
        [*cmd, "-m", "fluid_cli", *_args(synth, out, steps, *extra)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,  # conftest's environment: hub off, one thread
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines() == [str(out)]  # one line on stdout, from rank 0


def _trace(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def _same_curve(a: Path, b: Path) -> None:
    ta, tb = _trace(a), _trace(b)
    assert [x[0] for x in ta] == [x[0] for x in tb] == list(range(1, STEPS + 1))
    for (_, la, ga), (_, lb, gb) in zip(ta, tb, strict=True):
        assert la == pytest.approx(lb, rel=1e-4) and ga == pytest.approx(gb, rel=1e-4)


def _same_weights(a: Path, b: Path, which: str) -> None:
    wa, wb = ckpt.load_weights(ckpt.latest(a), which), ckpt.load_weights(ckpt.latest(b), which)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    _train_here(synth, run, STEPS)
    return run


# ---- torchrun: DDP and FSDP2 against one process ---------------------------------------------------
def test_ddp_two_processes_match_one_and_resume_in_one(synth, reference, tmp_path):
    run = tmp_path / "ddp"
    _torchrun(synth, run, HALF, "--set", "runtime.parallel=ddp")
    assert [p.name for p in ckpt.committed(run)] == [f"step-{HALF:08d}"]
    _train_here(synth, run, STEPS, "--resume")  # a 2-process (full-state) checkpoint in 1 process
    _same_curve(run, reference)
    _same_weights(run, reference, "model")


def test_fsdp_two_processes_match_one_and_resume_in_one(synth, reference, tmp_path):
    run = tmp_path / "fsdp"
    _torchrun(synth, run, HALF, "--set", "runtime.parallel=fsdp")
    saved = ckpt.latest(run)
    assert (saved / "dcp" / ".metadata").is_file() and (saved / "model.safetensors").is_file()
    assert ckpt.load_config(saved)["recipe"]["runtime"]["parallel"] == "fsdp"
    # 1 process: weights and EMA from the gathered safetensors, optimizer resharded from DCP
    _train_here(synth, run, STEPS, "--resume")
    _same_curve(run, reference)
    for which in ("model", "ema"):
        _same_weights(run, reference, which)


@pytest.mark.slow
def test_fsdp_resumes_full_and_sharded_checkpoints(synth, reference, tmp_path):
    """1-process checkpoint -> FSDP (full state scattered), then FSDP -> FSDP through DCP."""
    run = tmp_path / "mixed"
    _train_here(synth, run, HALF - 1, "--ckpt-every", "1")
    _torchrun(synth, run, HALF, "--resume", "--ckpt-every", "1", "--set", "runtime.parallel=fsdp")
    _torchrun(synth, run, STEPS, "--resume", "--set", "runtime.parallel=fsdp")
    _same_curve(run, reference)
    _same_weights(run, reference, "ema")


@pytest.mark.slow
def test_fsdp_with_compile_and_checkpointing_matches(synth, reference, tmp_path):
    run = tmp_path / "compiled"
    _torchrun(synth, run, STEPS, "--set", "runtime.parallel=fsdp", "--set", "runtime.compile=true")
    _same_curve(run, reference)


# ---- the data split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_each_global_batch_and_an_epoch_has_no_repeats(world):
    indices, B, seed, n = list(range(100, 187)), 8, 5, 87  # an epoch ends mid-batch
    steps = -(-n // B) + 1
    seen: dict[int, int] = {}  # global position -> record
    for step in range(steps):
        per_rank = [PositionSampler(indices, B, r, world, seed, start_step=step) for r in range(world)]
        positions = [pos for s in per_rank for pos in s.positions(step)]
        assert sorted(positions) == list(range(step * B, (step + 1) * B))  # disjoint and covering
        for s in per_rank:
            for record, pos in next(iter(s)):
                seen[pos] = record
    epoch = [seen[p] for p in range(n)]
    assert sorted(epoch) == indices  # every record exactly once in the first epoch
    assert sorted(seen[p] for p in range(n, 2 * n) if p in seen) == sorted(
        {seen[p] for p in range(n, 2 * n) if p in seen}
    )  # and no repeats in the part of the second epoch we drew
    one = PositionSampler(indices, B, 0, 1, seed)
    assert all(one.record_at(p) == r for p, r in seen.items())  # same order at any world size


# ---- plans and activation checkpointing ------------------------------------------------------------
def test_plan_is_size_based_and_checks_values():
    cpu, rt = torch.device("cpu"), RuntimeSection()
    assert distributed.make_plan(rt, "tiny", 1, cpu).parallel == "single"
    assert distributed.make_plan(rt, "1.1b", 8, cpu) == distributed.Plan("ddp", False, False, False)
    big = distributed.make_plan(rt, "3.1b", 8, cpu)
    assert (big.parallel, big.shard_params, big.activation_checkpointing) == ("fsdp", True, True)
    off = RuntimeSection(parallel="fsdp", activation_checkpointing="off", compile=True)
    assert distributed.make_plan(off, "tiny", 2, cpu) == distributed.Plan("fsdp", True, False, True)
    tpu = distributed.make_plan(rt, "10.5b", 1, torch.device("xla"))
    assert (tpu.parallel, tpu.shard_params) == ("spmd", True)
    with pytest.raises(FluidError, match="runtime.parallel 'zero3' is not one of auto, ddp, fsdp"):
        distributed.make_plan(RuntimeSection(parallel="zero3"), "tiny", 2, cpu)
    with pytest.raises(FluidError, match="activation_checkpointing 'yes'.*auto, on, off"):
        distributed.make_plan(RuntimeSection(activation_checkpointing="yes"), "tiny", 2, cpu)


def test_activation_checkpointing_keeps_names_and_gradients():
    from fluid_cli.bench import bench_config, random_batch
    from fluid_cli.models.fluid_model import FluidModel

    cfg = bench_config("rand-cont", "tiny", paper_shapes=False)
    grads = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = FluidModel(cfg)
        names = [n for n, _ in model.named_parameters()]
        if ac:
            assert distributed.apply_activation_checkpointing(model) == 1 + 2 + 2  # aligner, blocks, head
            assert [n for n, _ in model.named_parameters()] == names  # state dicts unchanged
        s, w = model(*random_batch(cfg, 3, torch.device("cpu"), 0))
        (s / w).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# ---- XLA, with fake torch_xla modules ------------------------------------------------------------------
class _FakeXLA:
    """Just the torch_xla functions the toolkit calls, recording what happens."""

    def __init__(self) -> None:
        self.closures: list = []
        self.steps = 0
        self.compiles = 1
        self.sharded: dict[tuple, tuple] = {}

    def modules(self) -> dict[str, types.ModuleType]:
        xm = types.ModuleType("torch_xla.core.xla_model")
        xm.xla_device = lambda: torch.device("xla", 0)
        xm.add_step_closure = lambda fn, args=(): self.closures.append((fn, args))
        xm.mark_step = self.mark_step
        xm.wait_device_ops = lambda: None
        xm.get_memory_info = lambda dev: {"bytes_used": 5, "peak_bytes_used": 7}
        met = types.ModuleType("torch_xla.debug.metrics")
        met.metric_data = lambda name: (self.compiles, 1.0, []) if name == "CompileTime" else None
        spmd = types.ModuleType("torch_xla.distributed.spmd")
        spmd.Mesh = lambda ids, shape, names: types.SimpleNamespace(mesh_shape=shape, names=names)
        spmd.mark_sharding = lambda t, mesh, spec: self.sharded.__setitem__(tuple(t.shape), spec)
        rt = types.ModuleType("torch_xla.runtime")
        rt.global_runtime_device_count = lambda: 4
        mods = {"torch_xla.core.xla_model": xm, "torch_xla.debug.metrics": met}
        mods |= {"torch_xla.distributed.spmd": spmd, "torch_xla.runtime": rt}
        for pkg in ("torch_xla", "torch_xla.core", "torch_xla.debug", "torch_xla.distributed"):
            mods[pkg] = types.ModuleType(pkg)
        return mods

    def mark_step(self) -> None:  # what torch_xla does: run the graph, then the step closures
        self.steps += 1
        pending, self.closures = self.closures, []
        for fn, args in pending:
            fn(*args)


@pytest.fixture
def fake_xla(monkeypatch):
    from fluid_cli.train import xla

    fake = _FakeXLA()
    for name, mod in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(xla, "_STATE", {})
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    return fake


def test_xla_device_and_step_closure_logging(fake_xla, tmp_path):
    from fluid_cli.train import loop

    dev = backend.resolve_device("auto")  # PJRT_DEVICE set: auto means xla
    assert dev == backend.resolve_device("xla") == torch.device("xla", 0)
    rows: list[dict] = []
    s = types.SimpleNamespace(dist=backend.Dist(), run_dir=tmp_path)
    progress = types.SimpleNamespace(update=lambda step, row: rows.append(row))
    row = {"step": 7, "loss": torch.tensor(1.5), "grad_norm": torch.tensor(0.25), "lr": 1e-4}
    backend.step_closure(dev, loop._emit_row, (s, progress, row))  # what the loop does on log steps
    assert rows == [] and not (tmp_path / "metrics.jsonl").exists()  # no host read before the step ran
    backend.mark_step(dev)
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert written == rows[0] == {"step": 7, "loss": 1.5, "grad_norm": 0.25, "lr": 1e-4}
    assert backend.peak_memory_bytes(dev) == 7


def test_xla_recompiles_after_step_3_are_warned(fake_xla, caplog):
    dev = torch.device("xla", 0)
    with caplog.at_level(logging.WARNING, logger="fluid_cli.train.xla"):
        for compiles in (1, 2, 3, 3, 3, 4, 4):  # graphs compiled by the end of steps 1..7
            fake_xla.compiles = compiles
            backend.mark_step(dev)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "at step 6" in warnings[0]  # growth during steps 1-3 is expected


def test_xla_spmd_shards_parameters_on_a_divisible_dim(fake_xla):
    from fluid_cli.train import xla

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(6))
    assert xla.shard_model(model, shard_params=True) == 2  # weight (8, 6) and bias (8,); LN (6,) stays
    assert fake_xla.sharded == {(8, 6): ("fsdp", None), (8,): ("fsdp",)}
    assert xla.shard_model(model, shard_params=False) == 0


def test_xla_without_torch_xla_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "torch_xla.core", None)
    monkeypatch.setitem(sys.modules, "torch_xla.core.xla_model", None)
    with pytest.raises(FluidError, match=r"needs torch-xla.*'xla' extra"):
        backend.resolve_device("xla")


# ---- bench ------------------------------------------------------------------------------------------
BENCH_KEYS = {
    "steps_per_s", "images_per_s", "tokens_per_s", "tflops", "mfu", "peak_memory_gb",
    "flops_per_image_analytic", "flops_per_image_counted", "flops_counted_over_analytic",
}  # fmt: skip


def test_bench_train_json():
    args = ["bench", "train", "--size", "tiny", "--device", "cpu", "--json", "--batch-size", "2"]
    r = runner.invoke(app, [*args, "--steps", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert BENCH_KEYS <= out.keys() and out["device"] == "cpu" and out["mfu"] is None
    assert out["images_per_s"] == pytest.approx(2 * out["steps_per_s"])
    assert out["tokens_per_s"] == pytest.approx(256 * out["images_per_s"])  # the paper's 256 tokens


@pytest.mark.parametrize(
    "variant,size,paper",
    [("rand-cont", "tiny", True), ("rast-disc", "tiny", True), ("rand-cont", "166m", True)],
)
def test_flop_counter_agrees_with_the_analytic_count(variant, size, paper):
    from fluid_cli.bench import bench_config, counted_flops, no_input_grad_flops
    from fluid_cli.models.flops import train_flops_per_image

    cfg = bench_config(variant, size, paper)
    counted, analytic = counted_flops(cfg), 3 * train_flops_per_image(cfg)
    assert counted == pytest.approx(analytic, rel=0.10)
    # the gap is exactly the backward of layers whose input needs no gradient (1x, not 2x)
    assert counted == pytest.approx(analytic - no_input_grad_flops(cfg), rel=1e-6)


def test_peak_table_matches_device_names():
    from fluid_cli.bench import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("TPU v5p-8") == 459.0
    assert peak_tflops("TPU v5litepod-8") == 197.0
    assert peak_tflops("cpu") is None
