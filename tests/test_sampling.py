"""Tests for `fluid sample` and the samplers (fluid_cli/sampling/): CPU, tiny models, no network.

A session fixture trains each variant for 3 steps on `fluid synth-data` records; in-process tests
also randomise the diffusion head's zero-initialised layers so that its samples depend on the
backbone (a 3-step head barely does).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import train_tiny
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from fluid_cli.models import keyed_random as kr
from fluid_cli.sampling import SampleSettings, generate
from fluid_cli.sampling.decode import embed_from_artifact, text_batch
from fluid_cli.sampling.prompts import Prompt
from fluid_cli.sampling.run import load_model
from fluid_cli.sampling.schedule import mask_schedule, random_order_cfg, raster_cfg

VARIANTS = ("rand-cont", "rast-cont", "rand-disc", "rast-disc")
CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow cross"]
FAST = ["--steps", "4", "--diffusion-steps", "5"]
LONG = "two cats sleeping on a blue sofa under a clear blue sky"  # over the model's 8 text tokens
runner = CliRunner()


@pytest.fixture(scope="session")
def runs(synth: Path, tmp_path_factory) -> dict[str, Path]:
    """variant -> run dir with one committed checkpoint (3 steps at a high rate, so weights move)."""
    return {
        v: train_tiny(synth, tmp_path_factory.mktemp(v), v, steps=3, lr=1e-2, warmup_steps=1, ema_decay=0.5)
        for v in VARIANTS
    }


def _model(runs: dict[str, Path], variant: str):
    model, _ = load_model(runs[variant], "model", torch.device("cpu"))
    if model.cfg.continuous:  # give the zero-initialised head layers real values
        g = torch.Generator().manual_seed(0)
        head = model.head
        for lin in [b.ada[-1] for b in head.blocks] + [head.final.ada[-1], head.final.linear]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return model


def _inputs(model, synth: Path, items: list[tuple[int, int]]):
    prompts = [Prompt(i, c, f"test:{i}") for i, c in enumerate(CAPTIONS)]
    states = embed_from_artifact(str(synth / "text"), prompts, model.cfg)
    text, mask = text_batch([states[p] for p, _ in items], model.cfg.text_len, torch.device("cpu"))
    idx = torch.tensor(items)
    return text, mask, kr.make_keys(7, idx[:, 0], idx[:, 1])


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """The promise for one seed across batch sizes, batch orders and head shapes: the same image up
    to float rounding. Matrix kernels block differently for different shapes (and CPUs), so floats
    agree to rounding, not bit for bit. Continuous tokens: within 1e-4 of the largest token (an
    untrained head's tokens are huge, ~3e4, and its t=999 step multiplies rounding by ~300).
    Discrete codes: the same except where a keyed draw lands within rounding of a bin edge (about
    1e-6 per token, then its knock-on in later steps): at least 95% of the codes."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.is_floating_point():
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4
    else:
        assert float((a == b).float().mean()) >= 0.95


def _sample(args: list[str]):
    result = runner.invoke(app, ["sample", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


# ---- schedules -----------------------------------------------------------------------------------


def test_mask_schedule_is_maskgit_cosine() -> None:
    n = mask_schedule(256, 64)
    assert n[0] == 256 and n[-1] == 0 and len(n) == 65
    assert n[1] == math.floor(256 * math.cos(math.pi / 2 / 64))  # 255: one token at the first step
    assert all(a > b for a, b in zip(n, n[1:], strict=False)) and min(n[:-1]) >= 1
    small = mask_schedule(16, 64)  # K > L: some steps predict nothing, but all 16 get made
    assert small[-1] == 0 and sum(a - b for a, b in zip(small, small[1:], strict=False)) == 16
    assert mask_schedule(10, 1) == [10, 0]


def test_cfg_schedules() -> None:
    assert random_order_cfg(3.0, "constant", 256, 8) == [3.0] * 8
    lin = random_order_cfg(3.0, "linear", 256, 64)
    assert lin[0] == pytest.approx(1 + 2 * 1 / 256) and lin[-1] == pytest.approx(1 + 2 * 255 / 256)  # MAR
    assert raster_cfg(2.0, "linear", 4) == [1.25, 1.5, 1.75, 2.0]
    with pytest.raises(ValueError):
        raster_cfg(2.0, "cosine", 4)


# ---- samplers, in process ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_image_whatever_the_batch(runs, synth, variant: str) -> None:
    model = _model(runs, variant)
    items = [(0, 0), (1, 0), (2, 1), (3, 0)]
    s = SampleSettings(steps=6, diffusion_steps=8, cfg=2.5)
    text, mask, keys = _inputs(model, synth, items)
    four = generate(model, text, mask, keys, s)
    ones = torch.cat(
        [generate(model, text[i : i + 1], mask[i : i + 1], keys[i : i + 1], s) for i in range(4)]
    )
    # every draw is keyed by (seed, prompt, image, position): only the matmul shapes differ
    assert_same_images(four, ones)
    if model.cfg.random_order:  # the head on all tokens (one static shape) gives the same tokens
        assert_same_images(
            four, generate(model, text, mask, keys, SampleSettings(6, 8, 2.5, head_tokens="all"))
        )
    assert torch.equal(four, generate(model, text, mask, keys, s))  # same shapes, same process: same bits
    assert not torch.allclose(four[0].float(), four[1].float())


@pytest.mark.parametrize("variant", ["rast-cont", "rast-disc"])
def test_kv_cache_matches_full_prefix(runs, synth, variant: str) -> None:
    model = _model(runs, variant)
    text, mask, keys = _inputs(model, synth, [(0, 0), (1, 0), (3, 2), (2, 0)])
    s = SampleSettings(diffusion_steps=8, cfg=2.0, top_k=20)
    cached = generate(model, text, mask, keys, s)
    full = generate(model, text, mask, keys, s, use_cache=False)
    if model.cfg.continuous:  # other attention kernels: rounding only, relative to the token scale
        # (an untrained head's samples are huge: its t=999 step multiplies eps errors by ~300)
        assert float((cached - full).abs().max() / full.abs().max()) < 1e-5
    else:  # codes: the same up to a draw on a bin edge
        assert_same_images(cached, full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_guidance_scale_one_is_conditional_only(runs, synth, variant: str) -> None:
    model = _model(runs, variant)
    text, mask, keys = _inputs(model, synth, [(0, 0), (1, 0), (2, 0), (3, 0)])
    s = SampleSettings(steps=5, diffusion_steps=8, cfg=1.0)
    plain = generate(model, text, mask, keys, s)  # B rows, no null text
    guided = generate(model, text, mask, keys, s, guided=True)  # 2B rows, uncond + 1 x (cond - uncond)
    assert float((guided.float() - plain.float()).abs().max() / plain.float().abs().max().clamp_min(1)) < 1e-5


def test_confidence_order_fills_every_token(runs, synth) -> None:
    model = _model(runs, "rand-disc")
    text, mask, keys = _inputs(model, synth, [(0, 0), (1, 0), (2, 0), (3, 0)])
    s = SampleSettings(steps=5, discrete_order="confidence", top_k=8)
    a = generate(model, text, mask, keys, s)
    perm = [1, 0, 3, 2]  # another batch order: each image is still the same
    assert a.shape == (4, model.cfg.num_tokens)
    assert_same_images(a[perm], generate(model, text[perm], mask[perm], keys[perm], s))
    assert 0 <= int(a.min()) and int(a.max()) < model.cfg.vocab_size


# ---- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_writes_images(runs, synth, tmp_path, variant: str) -> None:
    from PIL import Image

    out = tmp_path / "out"
    args = [str(runs[variant]), "--prompt", CAPTIONS[0], "--prompt", CAPTIONS[1], "--out", str(out), *FAST,
            "--images-per-prompt", "2", "--text-embeddings", str(synth / "text"), "--grid", "--device", "cpu"]  # fmt: skip
    result = _sample(args)
    assert result.stdout.strip() == str(out)
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["prompt_index"], r["image_index"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["settings"]["steps"] == 4 and rows[0]["step"] == 3 and rows[0]["weights"] == "ema"
    for r in rows:
        with Image.open(out / r["file"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"  # synth-data resolution
    assert Image.open(out / "grid.png").size == (2 * 66 + 2, 2 * 66 + 2)


def assert_same_png(a: Path, b: Path) -> None:
    """Same image up to float rounding: every 8-bit channel within 2/255 (the tokens agree to ~1e-6
    relative across batch sizes; the decoder and the 8-bit rounding can move a pixel by one level)."""
    import numpy as np
    from PIL import Image

    with Image.open(a) as x, Image.open(b) as y:
        pa, pb = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
    assert pa.shape == pb.shape and int(np.abs(pa - pb).max()) <= 2, a.name


def test_interrupted_run_resumes_to_the_same_images(runs, synth, tmp_path) -> None:
    from fluid_cli.sampling.run import run_sample
    from fluid_cli.settings import SampleRunSettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS[:3]) + "\n")
    common = [str(runs["rand-cont"]), "--prompts", str(prompts), *FAST, "--images-per-prompt", "2",
              "--text-embeddings", str(synth / "text")]  # fmt: skip
    _sample([*common, "--out", str(tmp_path / "full"), "--batch-size", "4"])
    part = tmp_path / "part"
    s = SampleSettings(steps=4, diffusion_steps=5)
    kw = {"checkpoint": runs["rand-cont"], "out": part, "prompts_file": str(prompts), "images_per_prompt": 2,
          "text_embeddings": synth / "text", "batch_size": 2}  # fmt: skip
    summary = run_sample(SampleRunSettings(sampling=s, **kw, max_images=3))  # "killed"
    assert summary["written"] == 3 and summary["left"] == 3
    (part / ".p000002_i000.png.tmp-1").write_bytes(b"half a png")  # debris of a kill mid-write
    _sample([*common, "--out", str(part), "--batch-size", "3"])
    full_png = sorted(p.name for p in (tmp_path / "full").glob("*.png"))
    assert sorted(p.name for p in part.glob("*.png")) == full_png and len(full_png) == 6
    for name in full_png:  # written at batch sizes 4 vs 2 then 3: the same images up to rounding
        assert_same_png(part / name, tmp_path / "full" / name)
    lines = (part / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6 and sorted(lines) == sorted(
        (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    )
    before = {p.name: p.read_bytes() for p in part.glob("*.png")}
    again = run_sample(SampleRunSettings(sampling=s, **kw))
    assert again["written"] == 0 and again["already_done"] == 6
    assert {p.name: p.read_bytes() for p in part.glob("*.png")} == before  # a finished run: untouched
    with pytest.raises(FluidError, match="other settings"):
        run_sample(SampleRunSettings(sampling=SampleSettings(4, 5, cfg=2.0), **kw))


def test_bad_prompt_lines_are_reported_and_skipped(runs, synth, tmp_path, caplog) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red square\n\n  \nbad \xff\xfe bytes\na blue circle\r\nnot in the artifact\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        _sample([str(runs["rand-disc"]), "--prompts", str(prompts), "--out", str(out), *FAST,
                 "--text-embeddings", str(synth / "text")])  # fmt: skip
    text = caplog.text
    for line in (2, 3, 4, 6):
        assert f"prompts.txt:{line}:" in text
    assert "not valid UTF-8" in text and "empty prompt" in text and "not in" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["p000000_i000.png", "p000004_i000.png"]


def test_usage_errors_are_one_line(runs, synth, tmp_path) -> None:
    ck = str(runs["rand-cont"])
    with pytest.raises(FluidError, match="--text-embeddings"):  # a synthetic run has no live encoder
        _sample([ck, "--prompt", "a red square", "--out", str(tmp_path / "a")])
    with pytest.raises(FluidError, match="diffusion-steps"):
        _sample([ck, "--prompt", "x", "--out", str(tmp_path / "b"), "--diffusion-steps", "0"])
    with pytest.raises(FluidError, match="no usable prompt"):
        _sample([ck, "--prompt", " ", "--out", str(tmp_path / "c")])


def test_help_documents_the_speed_knobs() -> None:
    result = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())  # rich panels wrap lines inside borders
    for needle in ["--steps", "--diffusion-steps", "--cfg", "--batch-size", "doubles the backbone and head batch",
                   "K x backbone", "S x head", "Ignored for raster"]:  # fmt: skip
        assert needle in text, needle


# ---- real tokenizer and text encoder -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rand-cont", "rast-disc"])
def test_real_encoder_and_decoder(
    runs, tiny_vae_dir, tiny_vq_dir, tiny_t5_dir, tmp_path, caplog, variant: str
) -> None:
    """The checkpoint's config points at conftest's tiny T5, AutoencoderKL (4x) and VQModel (8x)."""
    from PIL import Image

    ck = tmp_path / "ckpt"
    shutil.copytree(runs[variant] / "checkpoints" / "step-00000003", ck)
    config = json.loads((ck / "config.json").read_text())
    cls = "AutoencoderKL" if variant.endswith("cont") else "VQModel"
    tokenizer = str(tiny_vae_dir if cls == "AutoencoderKL" else tiny_vq_dir)
    config["data"]["image_tokens"].update(tokenizer=tokenizer, tokenizer_class=cls, scaling_factor=0.5)
    config["data"]["text"]["encoder"] = str(tiny_t5_dir)
    (ck / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        _sample([str(ck), "--prompt", "a red cube", "--prompt", LONG, "--out", str(out), *FAST])
    assert "--prompt 2: prompt is" in caplog.text and "truncated" in caplog.text  # 8-token model text
    with Image.open(out / "p000001_i000.png") as im:  # 8x8 latents x 4, or 8x8 codes x 8
        assert im.size == ((32, 32) if cls == "AutoencoderKL" else (64, 64)) and im.mode == "RGB"
    config["data"]["text"]["encoder"] = "google/t5-v1_1-xxl"  # not in the HF cache, offline
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(FluidError, match="not available offline"):
        _sample([str(ck), "--prompt", "a red square", "--out", str(tmp_path / "o2")])
