"""A smoke run of `fluid demo` at a tiny budget: every stage of the pipeline, offline, in CI."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.demo import TEXT_TOKENS
from fluid_cli.shapes.text_encoder import training_captions


def test_demo_pipeline_smoke(tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--minutes",
        "0.1",
        "--records",
        "256",
        "--tokenizer-steps",
        "10",
        "--steps",
        "4",
    ]
    r = CliRunner().invoke(app, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    report = out / "report.md"
    assert r.stdout.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    assert "shapes-GenEval" in text and "![loss](report/loss.png)" in text
    for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert (out / "report" / f"grid-{tag}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_json = json.loads((out / "report.json").read_text())
    scores, ceiling = report_json["scores"], report_json["tokenizer_ceiling"]
    assert scores["all_tags"] and 0.0 <= scores["overall"] <= 1.0
    assert scores["images"] == 5 * len((out / "shapes" / "heldout.txt").read_text().splitlines())
    assert min(c["images"] for c in scores["counts"].values()) >= 25  # every tag, single_object too
    # the ceiling: the detector on the tokenizer's reconstructions, in the scores' shape
    assert set(ceiling["tags"]) == set(scores["tags"]) and ceiling["images"] == 300
    assert 0.0 <= ceiling["overall"] <= 1.0 and ceiling["all_tags"]
    assert "tokenizer ceiling" in text
    objects = scores["objects"]  # drawn vs asked: GenEval's rules alone pass crowded images
    assert objects["images"] == scores["images"] and objects["asked_mean"] >= 1.0
    assert 0.0 <= objects["exact"] <= 1.0 and "Objects per image" in text
    # captions are encoded to TEXT_TOKENS, not 128: every training caption and held-out prompt fits
    text_attrs = json.loads((out / "text" / "manifest.json").read_text())["attrs"]
    assert text_attrs["max_length"] == TEXT_TOKENS and text_attrs["truncated"] == 0
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizers" / "t5"))
    prompts = training_captions() + (out / "shapes" / "heldout.txt").read_text().splitlines()
    assert max(len(tokenizer(p)["input_ids"]) for p in prompts) <= TEXT_TOKENS
    # a rerun skips every finished stage and rewrites the same report
    assert CliRunner().invoke(app, args).exit_code == 0


def test_sample_reserve_scales_with_the_vaes_measured_speed(tmp_path):
    from fluid_cli.demo import MIN_SAMPLE_RESERVE_S, SAMPLE_RESERVE_S, _sample_reserve_s

    def reserve(report: dict | None) -> float:
        if report is not None:
            (tmp_path / "fluid-tokenizer.json").write_text(json.dumps(report))
        return _sample_reserve_s(tmp_path)

    assert reserve(None) == SAMPLE_RESERVE_S  # no report: the fixed reserve
    slow = reserve({"train_seconds": 272.0, "settings": {"steps": 800}})
    assert slow == pytest.approx(0.6 * 272.0)  # 0.6x the VAE's 800 steps
    assert reserve({"train_seconds": 136.0, "settings": {"steps": 400}}) == pytest.approx(slow)  # per step
    assert reserve({"train_seconds": 5.0, "settings": {"steps": 800}}) == MIN_SAMPLE_RESERVE_S
    assert reserve({"train_seconds": 5.0, "settings": {}}) == SAMPLE_RESERVE_S  # malformed: fixed
