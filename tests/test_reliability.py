"""Faults injected into training: kill -9, a kill mid-save, SIGTERM, bad shards, NaN, ENOSPC, config
changes on resume, crafted pickles. Each test shows what is kept (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHORT_RUN, tiny_train_args
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.train import checkpoint as ckpt

runner = CliRunner()


def _args(synth: Path, out: Path, steps: int, *extra: str, data: Path | None = None) -> list[str]:
    return tiny_train_args(synth, out, "--steps", str(steps), "--seed", "5", "--val-every", "0", *SHORT_RUN,
                           "--set", "train.keep_checkpoints=50", *extra, image_tokens=data)  # fmt: skip


def _train(synth: Path, out: Path, steps: int, *extra: str, data: Path | None = None):
    return runner.invoke(app, _args(synth, out, steps, *extra, data=data))


def _trace(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "grad_norm", "samples_seen", "data_crc")
    return [{k: r[k] for k in keys} for r in rows if "loss" in r]


def assert_same_trace(run: Path, reference: Path) -> None:
    """Step by step: the same steps, samples seen and consumed records (crc of their ids) exactly;
    loss and grad norm within 1e-5 relative. The killed part ran in another process, whose kernels
    may sum floats in another order (thread count, CPU), so only float rounding may differ."""
    got, want = _trace(run), _trace(reference)
    assert [(r["step"], r["samples_seen"], r["data_crc"]) for r in got] == [
        (r["step"], r["samples_seen"], r["data_crc"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]


def _spawn(args: list[str], prelude: str = "") -> subprocess.Popen:
    code = f"import sys\n{prelude}\nfrom fluid_cli.cli import main\nsys.argv = ['fluid'] + {args!r}\nmain()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(synth, tmp_path_factory) -> Path:
    """An uninterrupted 16-step run: the reference every interrupted run must match."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert _train(synth, run, 16, "--ckpt-every", "4").exit_code == 0
    return run


def test_kill9_mid_training_then_resume_continues_the_same_run(synth, straight, tmp_path):
    run = tmp_path / "run"
    proc = _spawn(_args(synth, run, 16, "--ckpt-every", "4"))
    _wait_for(run / "checkpoints" / "step-00000008" / "COMMIT", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.latest(run).name in ("step-00000008", "step-00000012")
    r = _train(synth, run, 16, "--ckpt-every", "4", "--resume")
    assert r.exit_code == 0, r.output
    assert_same_trace(run, straight)


def test_kill9_during_checkpoint_write_keeps_the_previous_one(synth, straight, tmp_path):
    run = tmp_path / "run"
    # die inside the save of step 8, after the weights are written but before COMMIT
    prelude = (
        "import os, signal, torch\n_save = torch.save\n"
        "def _boom(obj, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 8: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _save(obj, *a, **k)\n"
        "torch.save = _boom\n"
    )
    proc = _spawn(_args(synth, run, 16, "--ckpt-every", "4"), prelude)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((run / "checkpoints").glob(".step-00000008.tmp-*"))
    assert leftovers, "the kill should leave a partial temp checkpoint behind"
    assert ckpt.latest(run).name == "step-00000004"  # the partial one is never chosen
    assert _train(synth, run, 16, "--ckpt-every", "4", "--resume").exit_code == 0
    assert not list((run / "checkpoints").glob(".step-*"))  # cleaned on start
    assert_same_trace(run, straight)


def test_sigterm_finishes_the_step_saves_and_asks_for_requeue(synth, tmp_path):
    run = tmp_path / "run"
    proc = _spawn(_args(synth, run, 10_000, "--ckpt-every", "1000"))
    metrics = run / "metrics.jsonl"
    _wait_for(metrics, proc)
    while len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30  # the default preemption budget
    assert proc.returncode == 75, err  # EX_TEMPFAIL: schedulers requeue on it
    assert "stopped: preempted" in err and "Traceback" not in err
    last = _trace(run)[-1]["step"]
    assert ckpt.latest(run).name == f"step-{last:08d}"  # zero completed steps lost


def test_corrupt_and_wrong_shape_shards_are_skipped(synth, tmp_path):
    import shutil

    data = tmp_path / "latents"
    shutil.copytree(synth / "latents", data)
    p = data / "shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-200])  # truncated
    wrong = data / "shard-00002.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(wrong), "pt") as f:
        meta = f.metadata()
    t = load_file(str(wrong))
    save_file(
        {k: v[:, :2].contiguous() for k, v in t.items()}, str(wrong), metadata=meta
    )  # 2 channels, not 4
    from fluid_cli.train.data import PairedRecords

    pr = PairedRecords(str(data), str(synth / "text"))
    assert len(pr) == 96 - 32  # every record of the other shards is there
    reasons = {s["shard"]: s["reason"] for s in pr.skipped}
    assert "unreadable" in reasons["shard-00001.safetensors"]
    assert "shape" in reasons["shard-00002.safetensors"]
    r = _train(synth, tmp_path / "run", 2, data=data)
    assert r.exit_code == 0, r.output
    r = _train(synth, tmp_path / "run2", 2, "--set", "data.max_bad_records=10", data=data)
    assert isinstance(r.exception, FluidError) and "32 records are unreadable or malformed" in str(
        r.exception
    )


def test_nonfinite_step_is_skipped_without_touching_state(synth, tmp_path, monkeypatch):
    from fluid_cli.train.optim import EMA

    real_forward, real_update = FluidModel.forward, EMA.update
    seen = {"calls": 0, "params": [], "ema_updates": 0}

    def flaky(self, *a, **k):
        seen["calls"] += 1
        if seen["calls"] in (3, 4):  # weights as the 3rd step starts, and as the 4th starts
            seen["params"].append({n: p.detach().clone() for n, p in self.named_parameters()})
        s, w = real_forward(self, *a, **k)
        return (s * float("nan"), w) if seen["calls"] == 3 else (s, w)  # the third step's loss is NaN

    def counted(self, *a, **k):
        seen["ema_updates"] += 1
        return real_update(self, *a, **k)

    monkeypatch.setattr(FluidModel, "forward", flaky)
    monkeypatch.setattr(EMA, "update", counted)
    run = tmp_path / "run"
    assert _train(synth, run, 5, "--ckpt-every", "1").exit_code == 0
    before, after = seen["params"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed no weight
    assert seen["ema_updates"] == 4  # 5 steps, one skipped
    opt = ckpt.load_train_state(run / "checkpoints" / "step-00000005")["optimizer"]
    assert {int(st["step"]) for st in opt["state"].values()} == {4}  # AdamW's own counter skipped it too
    assert not (run / "checkpoints" / "step-00000003").exists()  # no save in a bad streak
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1


def test_too_many_nonfinite_steps_stop_without_a_checkpoint(synth, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(synth, run, 2, "--ckpt-every", "2").exit_code == 0
    real = FluidModel.forward
    monkeypatch.setattr(
        FluidModel,
        "forward",
        lambda self, *a, **k: (real(self, *a, **k)[0] * float("inf"), torch.tensor(1.0)),
    )
    r = _train(synth, run, 50, "--ckpt-every", "2", "--resume", "--set", "train.max_bad_steps=3")
    assert isinstance(r.exception, FluidError) and "3 non-finite steps in a row" in str(r.exception)
    assert [p.name for p in ckpt.committed(run)] == ["step-00000002"]  # the good one survives, nothing new


def test_disk_full_during_save_keeps_the_previous_checkpoint(synth, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(synth, run, 2, "--ckpt-every", "2").exit_code == 0
    real = ckpt.save_file

    def full(tensors, path, *a, **k):
        if "step-00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full)
    r = _train(synth, run, 4, "--ckpt-every", "2", "--resume")
    assert isinstance(r.exception, FluidError)
    msg = str(r.exception)
    assert "disk full while saving" in msg and "step-00000004" in msg and "GB are needed" in msg
    assert ckpt.latest(run).name == "step-00000002"
    ckpt.load_weights(ckpt.latest(run))  # intact
    assert not list((run / "checkpoints").glob(".step-*"))


def test_resume_refuses_shape_changes_and_allows_harmless_ones(synth, tmp_path):
    run = tmp_path / "run"
    assert _train(synth, run, 2, "--ckpt-every", "2").exit_code == 0
    r = runner.invoke(app, _args(synth, run, 4, "--resume", "--set", "model.diffusion_batch_mul=2"))
    assert isinstance(r.exception, FluidError)
    assert "would change shape" in str(r.exception) and "diffusion_batch_mul: 4 -> 2" in str(r.exception)
    r = _train(synth, run, 4, "--ckpt-every", "2", "--resume", "--set", "train.lr=5e-4")
    assert r.exit_code == 0, r.output


def test_crafted_pickle_is_refused_before_any_code_runs(synth, tmp_path):
    run = tmp_path / "run"
    assert _train(synth, run, 2, "--ckpt-every", "2").exit_code == 0
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 2, "optimizer": Evil()}, ckpt.latest(run) / "train_state.pt")
    r = _train(synth, run, 4, "--resume")
    assert isinstance(r.exception, FluidError) and "refusing to resume" in str(r.exception)
    assert not marker.exists()
