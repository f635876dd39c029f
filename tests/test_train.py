"""`fluid train`, recipes, checkpoints and the CLI's error lines (CPU, tiny, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHORT_RUN, run_fluid, tiny_train_args
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.config import load_recipe, parse_set, resolve
from fluid_cli.errors import FluidError
from fluid_cli.train import checkpoint as ckpt

runner = CliRunner()


def _train(synth: Path, out: Path, *extra: str, variant: str = "rand-cont", data: str = "latents"):
    args = tiny_train_args(
        synth, out, "--seed", "3", *SHORT_RUN, *extra, variant=variant, image_tokens=synth / data
    )
    return runner.invoke(app, args)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = resolve(path, {}, [])
    assert r.train.batch_size >= 1
    if path.name.startswith("rand-cont-"):
        assert r.model.size == path.stem.removeprefix("rand-cont-")
        assert (r.train.lr, r.train.warmup_steps, r.train.steps, r.train.weight_decay) == (
            1e-4,
            65_000,
            1_000_000,
            0.02,
        )
        assert r.train.batch_size == (4096 if r.model.size == "10.5b" else 2048)


def test_bad_recipes_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1e-3\n")
    with pytest.raises(FluidError, match=r"train\.learning_rate.*valid keys.*\blr\b"):
        load_recipe(bad)
    bad.write_text("[trian]\nlr = 1e-3\n")
    with pytest.raises(FluidError, match=r"\[trian\].*valid sections: model, data, train, runtime"):
        load_recipe(bad)
    bad.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(FluidError, match=r"train\.steps must be int"):
        load_recipe(bad)
    with pytest.raises(FluidError, match="unknown variant 'rand-foo'"):
        resolve(None, {"model": {"variant": "rand-foo"}}, [])


def test_set_overrides_recipe_and_flags():
    assert parse_set(["train.lr=3e-4", "model.size=166m", "runtime.compile=true"]) == {
        "train": {"lr": 3e-4},
        "model": {"size": "166m"},
        "runtime": {"compile": True},
    }
    r = resolve(ROOT / "recipes" / "tiny.toml", {"train": {"steps": 7, "lr": None}}, ["train.steps=9"])
    assert r.train.steps == 9 and r.train.lr == 1e-3  # --set beats flags; unset flags keep the recipe


# ---- the CLI -----------------------------------------------------------------------------------
def test_help_of_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    names = [c.name for c in app.registered_commands]
    assert {"models", "train", "synth-data"} <= set(names)
    for name in names:
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage" in r.output


def test_bad_input_is_one_line_not_a_traceback(tmp_path, synth):
    cases = [
        (
            ["train", "--variant", "rand-fast", "--out", str(tmp_path / "r")],
            "unknown variant 'rand-fast'; valid variants: rand-cont",
        ),
        (
            ["train", "--size", "2b", "--out", str(tmp_path / "r")],
            "unknown size '2b'; valid sizes: tiny, mini, small, 166m",
        ),
        (
            [
                "train",
                "--image-tokens",
                str(tmp_path / "nope"),
                "--text",
                str(synth / "text"),
                "--out",
                str(tmp_path / "r"),
            ],
            "does not exist",
        ),
        (
            [
                "train",
                "--variant",
                "rand-disc",
                "--image-tokens",
                str(synth / "latents"),
                "--text",
                str(synth / "text"),
                "--out",
                str(tmp_path / "r"),
            ],
            "variant rand-disc needs discrete image tokens",
        ),
        (["train", "--set", "train.lrr=1", "--out", str(tmp_path / "r")], "unknown recipe key train.lrr"),
    ]
    for args, message in cases:
        p = run_fluid(*args)
        assert p.returncode == 1, (args, p.stderr)
        assert "Traceback" not in p.stderr
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, p.stderr)


def test_incomplete_artifact_is_refused(tmp_path, synth):
    import shutil

    broken = tmp_path / "latents"
    shutil.copytree(synth / "latents", broken)
    (broken / "manifest.json").unlink()
    r = _train(synth, tmp_path / "run", "--steps", "1")
    assert r.exit_code == 0
    r = runner.invoke(
        app,
        [
            "train",
            "--image-tokens",
            str(broken),
            "--text",
            str(synth / "text"),
            "--out",
            str(tmp_path / "run2"),
        ],
    )
    assert isinstance(r.exception, FluidError) and "incomplete: no manifest.json" in str(r.exception)


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,data", [("rand-cont", "latents"), ("rast-disc", "codes")])
def test_train_writes_run_dir(tmp_path, synth, variant, data):
    run = tmp_path / "run"
    r = _train(
        synth, run, "--steps", "4", "--ckpt-every", "2", "--val-every", "2", variant=variant, data=data
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(run)  # stdout: the run dir, for pipelines
    rows = _metrics(run)
    train_rows = [x for x in rows if "loss" in x]
    assert [x["step"] for x in train_rows] == [1, 2, 3, 4]
    assert all(
        k in train_rows[0]
        for k in ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "samples_seen")
    )
    assert [x["step"] for x in rows if "val_loss" in x] == [2, 4]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["variant"] == variant and cfg["params"] > 0 and cfg["gflops_per_image"] > 0
    assert [p.name for p in ckpt.committed(run)] == ["step-00000002", "step-00000004"]
    weights = ckpt.load_weights(ckpt.latest(run))
    assert "null_text" in weights  # the guidance input travels with the weights


def test_resume_is_bit_identical(tmp_path, synth):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    assert _train(synth, straight, "--steps", "6", "--ckpt-every", "3").exit_code == 0
    assert _train(synth, interrupted, "--steps", "3", "--ckpt-every", "3").exit_code == 0
    again = _train(synth, interrupted, "--steps", "6")
    assert isinstance(again.exception, FluidError) and "--resume" in str(
        again.exception
    )  # nothing is overwritten
    assert _train(synth, interrupted, "--steps", "6", "--ckpt-every", "3", "--resume").exit_code == 0

    def trace(run):
        return [
            (x["step"], x["loss"], x["grad_norm"], x["samples_seen"]) for x in _metrics(run) if "loss" in x
        ]

    assert trace(straight) == trace(interrupted)
    a = ckpt.load_weights(ckpt.latest(straight), "model")
    b = ckpt.load_weights(ckpt.latest(interrupted), "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_give_the_same_step(tmp_path, synth):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _train(synth, whole, "--steps", "3").exit_code == 0
    assert _train(synth, split, "--steps", "3", "--set", "train.micro_batch_size=2").exit_code == 0
    for x, y in zip(_metrics(whole), _metrics(split), strict=True):
        if "loss" in x:
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_checkpoints_refuse_nonfinite_and_ignore_partial(tmp_path):
    run = tmp_path / "run"
    good = {"w": torch.ones(3)}
    ckpt.save_checkpoint(run, 1, good, good, {"step": 1}, {"model": {}})
    with pytest.raises(FluidError, match="non-finite"):
        ckpt.save_checkpoint(run, 2, {"w": torch.tensor([1.0, float("nan")])}, good, {"step": 2}, {})
    partial = run / "checkpoints" / "step-00000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest(run).name == "step-00000001"
    with pytest.raises(FluidError, match="COMMIT"):
        ckpt.resolve(partial)
    assert ckpt.clean_partial(run) == 1 and not partial.exists()


def test_lr_warmup_stable_decay():
    from fluid_cli.train.optim import lr_at

    assert lr_at(0, 1.0, 10) == pytest.approx(0.1) and lr_at(50, 1.0, 10) == 1.0
    assert lr_at(50, 1.0, 10, progress=0.99) == 1.0  # decay_fraction 0: the paper's constant LR
    # decay over the last 40%: flat until 60% done, half at 80%, zero at the end
    assert [lr_at(50, 2.0, 10, p, 0.4) for p in (0.5, 0.6, 0.8, 1.0)] == pytest.approx([2.0, 2.0, 1.0, 0.0])
    assert lr_at(1, 1.0, 10, 0.9, 0.4) == pytest.approx(0.2 * 0.25)  # warmup and decay multiply


def test_decay_falls_linearly_over_the_last_steps(tmp_path, synth):
    run = tmp_path / "run"
    r = _train(synth, run, "--steps", "8", "--set", "train.decay_fraction=0.5", "--set", "train.lr=1e-3")
    assert r.exit_code == 0, r.output
    lrs = [x["lr"] for x in _metrics(run) if "lr" in x]
    # step i (0-based) runs at progress i/8: flat through step 4, then 3/4, 1/2, 1/4 of the peak
    assert lrs[2:] == pytest.approx([1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_eta_is_the_sooner_of_the_step_budget_and_the_time_limit():
    from fluid_cli.train.progress import forecast

    assert forecast(100, 1100, 10.0, None) == (100.0, 1100)  # no limit: steps left / rate
    # the demo: a 10-minute limit on a 1,000,000-step budget at 10 steps/s: 10 minutes, ~6,100 steps
    assert forecast(100, 1_000_000, 10.0, 600.0) == (600.0, 100 + 6000 + 1)
    assert forecast(100, 200, 10.0, 600.0) == (10.0, 200)  # the budget ends it first
    assert forecast(0, 1_000_000, None, 600.0) == (600.0, None)  # no rate yet: the limit still bounds it
    assert forecast(0, 10, None, None) == (None, 10)
    assert forecast(5, 100, 1.0, -3.0) == (0.0, 5)  # past the limit: this step is the last


def test_time_limited_run_without_validation(tmp_path, synth):
    run = tmp_path / "run"
    r = _train(synth, run, "--steps", "1000000", "--val-every", "1", "--set", "train.val_batches=0",
               "--set", "train.time_limit_min=0.01")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = _metrics(run)
    last = rows[-1]["step"]
    assert 0 < last < 1000 and not any("val_loss" in x for x in rows)  # no 0.0000 val_loss rows
    bar = [ln for ln in r.stderr.splitlines() if ln.startswith("train ")][-1]
    assert f"{last}/~{last} (time limit)" in bar and "eta 0:00:00" in bar, bar
