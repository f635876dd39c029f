"""GenEval: the pure scorer on hand-made detections (every tag, threshold edges, the cap, exclude
clauses, position margins), the package data, and `fluid eval-geneval` on a full 553 x 4 folder
with a stub detector plugged in as `py:MODULE:FUNCTION` (and the generation path with a fake sampler)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fluid
from PIL import Image
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from fluid_cli.eval import geneval_rules as R
from fluid_cli.eval.geneval_rules import Detection, keep_detections, relative_position, score_image
from fluid_cli.eval.geneval_run import score_folder, summarize

runner = CliRunner()
PALETTE = {"red": (255, 0, 0), "orange": (255, 128, 0), "yellow": (255, 255, 0), "green": (0, 160, 0),
           "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 150, 200), "brown": (120, 70, 20),
           "black": (0, 0, 0), "white": (255, 255, 255)}  # fmt: skip
GREY = (0x99, 0x99, 0x99)

# A stub plug-in module: detections come from a table keyed by the image's pixels; colours are the
# nearest palette colour of the crop's non-grey pixels (an exact classifier for these images).
STUB = f"""
import hashlib, json, os
import numpy as np
from fluid_cli.eval import Detection

PALETTE = {PALETTE}

def make_detector(classes):
    table = json.loads(open(os.environ["GENEVAL_STUB_TABLE"]).read())
    def detect(image):
        key = hashlib.md5(image.convert("RGB").tobytes()).hexdigest()
        return [Detection(d["cls"], d["score"], tuple(d["box"])) for d in table.get(key, [])]
    detect.identity = {{"id": "stub", "rows": len(table)}}
    return detect

def make_classifier():
    names, rgb = list(PALETTE), np.array(list(PALETTE.values()), dtype=float)
    def classify(crops, cls):
        out = []
        for c in crops:
            px = np.asarray(c.convert("RGB"), dtype=float).reshape(-1, 3)
            px = px[(px != 0x99).any(1)] if (px != 0x99).any(1).any() else px
            out.append(names[int(((rgb - np.median(px, 0)) ** 2).sum(1).argmin())])
        return out
    return classify
"""


def classify(crops, cls):
    """The same exact classifier, in process."""
    names, rgb = list(PALETTE), np.array(list(PALETTE.values()), dtype=float)
    out = []
    for c in crops:
        px = np.asarray(c.convert("RGB"), dtype=float).reshape(-1, 3)
        keep = (px != 0x99).any(1)
        out.append(names[int(((rgb - np.median(px[keep] if keep.any() else px, 0)) ** 2).sum(1).argmin())])
    return out


def canvas(*boxes) -> Image.Image:
    """A 64x64 image with (box, colour name) rectangles on light grey-blue."""
    im = np.full((64, 64, 3), (200, 210, 220), dtype=np.uint8)
    for (x0, y0, x1, y1), colour in boxes:
        im[y0:y1, x0:x1] = PALETTE[colour]
    return Image.fromarray(im)


def det(cls, score=0.95, box=(0, 0, 10, 10), mask=None) -> Detection:
    return Detection(cls, score, box, mask)


# ---- the scorer, tag by tag ---------------------------------------------------------------------


def test_single_object_threshold_edges():
    meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    im = canvas()
    assert score_image(meta, [det("bench", 0.3)], im, classify) == (False, "expected 1 bench, found 0")
    assert score_image(meta, [det("bench", 0.3000001)], im, classify) == (True, "")
    assert score_image(meta, [det("dog", 0.99)], im, classify)[0] is False


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1}]}
    im = canvas()
    assert score_image(meta, [det("dog"), det("cup", 0.5)], im, classify) == (True, "")
    ok, why = score_image(meta, [det("dog"), det("dog")], im, classify)
    assert not ok and why == "expected 1 cup, found 0"


def test_counting_threshold_and_exclude():
    meta = {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    }
    im = canvas()
    assert score_image(meta, [det("dog", 0.95), det("dog", 0.9)], im, classify) == (
        False,
        "expected 2 dog, found 1",
    )
    assert score_image(meta, [det("dog", 0.95), det("dog", 0.9000001)], im, classify) == (True, "")
    assert score_image(meta, [det("dog", 0.95), det("dog", 0.91), det("dog", 0.5)], im, classify)[
        0
    ]  # 0.5 < 0.9
    ok, why = score_image(meta, [det("dog", 0.95)] * 3, im, classify)
    assert not ok and why == "expected fewer than 3 dog, found 3"


def test_cap_of_16_per_class_highest_first():
    dets = [det("kite", 0.31 + i / 100) for i in range(20)]
    kept = keep_detections(dets, "single_object")["kite"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.50) and kept[-1].score == pytest.approx(0.35)
    # the cap counts for exclude clauses too: 20 detections are 16 kept, fewer than 17
    meta = {
        "tag": "single_object",
        "include": [{"class": "kite", "count": 1}],
        "exclude": [{"class": "kite", "count": 17}],
    }
    assert score_image(meta, dets, canvas(), classify) == (True, "")
    meta["exclude"][0]["count"] = 16
    assert score_image(meta, dets, canvas(), classify) == (False, "expected fewer than 16 kite, found 16")


def test_colors_crop_uses_mask_on_grey():
    im = canvas(((10, 10, 30, 30), "blue"), ((30, 10, 40, 30), "red"))
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 10:30] = True
    car = det("car", 0.8, (10, 10, 40, 30), mask)  # box covers blue + red; the mask only the blue
    crop = R.colour_crop(im, car)
    assert (
        crop.size == (30, 20) and crop.getpixel((25, 5)) == GREY and crop.getpixel((5, 5)) == PALETTE["blue"]
    )
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    assert score_image(meta, [car], im, classify) == (True, "")
    meta["include"][0]["color"] = "pink"
    ok, why = score_image(meta, [car], im, classify)
    assert not ok and why == "expected 1 pink car, found 0 pink (colours: 1 blue)"


def test_color_attr_checks_each_clause():
    im = canvas(((0, 0, 10, 10), "purple"), ((20, 0, 30, 10), "black"))
    meta = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                             {"class": "apple", "count": 1, "color": "black"}]}  # fmt: skip
    good = [det("wine glass", box=(0, 0, 10, 10)), det("apple", box=(20, 0, 30, 10))]
    assert score_image(meta, good, im, classify) == (True, "")
    swapped = [det("wine glass", box=(20, 0, 30, 10)), det("apple", box=(0, 0, 10, 10))]
    ok, why = score_image(meta, swapped, im, classify)
    assert not ok and why.count("expected") == 2


def test_position_rule_and_margins():
    b = det("teddy bear", box=(0, 0, 10, 10))

    def at(x, y=0.0):
        return det("dog", box=(x, y, x + 10, y + 10))

    # margin 0.1 x (10 + 10) = 2 on x: an offset of 2 is inside it (no relation), 2.01 just outside
    assert relative_position(at(2.0), b) == set()
    assert relative_position(at(2.01), b) == set()  # outside the margin, but (2.01 - 2) / 2.01 <= 0.5
    # "right of" needs (dx - 2) / |offset| > 0.5: dx = 4 is the edge
    assert relative_position(at(4.0), b) == set()
    assert relative_position(at(4.01), b) == {"right of"}
    assert relative_position(at(-4.01), b) == {"left of"}
    assert relative_position(at(0, 30), b) == {"below"} and relative_position(at(0, -30), b) == {"above"}
    assert relative_position(at(30, 30), b) == {"right of", "below"}  # diagonal: both
    meta = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}  # fmt: skip
    assert score_image(meta, [b, at(20)], canvas(), classify) == (True, "")
    ok, why = score_image(meta, [b, at(-20)], canvas(), classify)
    assert not ok and why == "expected dog right of teddy bear, found left of"
    ok, why = score_image(meta, [at(20)], canvas(), classify)  # no target: both clauses fail
    assert not ok and why == "expected 1 teddy bear, found 0; no target for dog to be right of"


def test_package_data_via_importlib_resources():
    base = resources.files("fluid_cli").joinpath("data", "geneval")
    assert "MIT" in base.joinpath("LICENSE").read_text()
    meta = R.load_metadata()
    assert len(meta) == 553 and len(R.coco_classes()) == 80
    assert {m["tag"] for m in meta} == set(R.TAGS)


# ---- a full folder with a stub detector ------------------------------------------------------------

SPOTS = {"right of": (47, 27), "left of": (7, 27), "above": (27, 7), "below": (27, 47), None: (47, 27)}


def synth(meta: dict, p: int, i: int) -> tuple[Image.Image, list[dict]]:
    """Image i of prompt p: 0-1 satisfy the prompt, 2 has every score at 0.3 (dropped), 3 nothing."""
    boxes, dets = [], []
    inc = meta["include"]
    for k in range(inc[0]["count"]):
        x, y = (27, 27) if len(inc) > 1 else (4 + 14 * k, 27)
        boxes.append(((x, y, x + 10, y + 10), inc[0].get("color", "black"), inc[0]["class"]))
    if len(inc) > 1:
        x, y = SPOTS[(inc[1].get("position") or [None])[0]]
        boxes.append(((x, y, x + 10, y + 10), inc[1].get("color", "black"), inc[1]["class"]))
    im = np.asarray(canvas(*[(b, c) for b, c, _ in boxes])).copy()
    im[63, 63] = (p % 256, p // 256, i)  # unique pixels for the stub's table
    score = 0.95 if i < 2 else 0.3
    dets = [{"cls": cls, "score": score, "box": b} for b, _, cls in boxes] if i < 3 else []
    return Image.fromarray(im), dets


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    d = tmp_path_factory.mktemp("stub")
    (d / "stub_geneval.py").write_text(STUB)
    table = {}
    for p, meta in enumerate(R.load_metadata()):
        for i in range(4):
            im, dets = synth(meta, p, i)
            table[hashlib.md5(im.tobytes()).hexdigest()] = dets
    (d / "table.json").write_text(json.dumps(table))
    return d


@pytest.fixture()
def plug(stub, monkeypatch):
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.setenv("GENEVAL_STUB_TABLE", str(stub / "table.json"))
    return ["--detector", "py:stub_geneval:make_detector", "--clip", "py:stub_geneval:make_classifier"]


def write_folder(root: Path, n_prompts: int | None = None) -> Path:
    for p, meta in enumerate(R.load_metadata()[:n_prompts]):
        (root / f"{p:05d}" / "samples").mkdir(parents=True)
        (root / f"{p:05d}" / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for i in range(4):
            synth(meta, p, i)[0].save(root / f"{p:05d}" / "samples" / f"{i:04d}.png")
    return root


def test_eval_geneval_full_folder_with_stub(tmp_path, plug):
    root = write_folder(tmp_path / "geneval")
    r = runner.invoke(
        app,
        [
            "eval-geneval",
            "--images",
            str(root),
            "--json",
            "--run",
            str(tmp_path / "run"),
            "--step",
            "7",
            *plug,
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tags"] == {t: 0.5 for t in R.TAGS} and res["overall"] == 0.5
    assert res["images"] == 2212 and res["complete"] and res["detector"]["id"] == "stub"
    assert set(res["versions"]) >= {"transformers", "torch", "fluid-cli"}
    rows = [json.loads(ln) for ln in (root / "geneval-results.jsonl").read_text().splitlines()]
    assert len(rows) == 2212 and sum(r["correct"] for r in rows) == 1106
    assert rows[2]["reason"] == "expected 1 bench, found 0" and rows[0]["kept"] == {"bench": 1}
    on_disk = json.loads((tmp_path / "run" / "eval" / "geneval-step7.json").read_text())
    assert on_disk["metric"] == "geneval" and on_disk["overall"] == 0.5 and on_disk["step"] == 7
    assert json.loads((root / "geneval.json").read_text())["overall"] == 0.5
    print(f"\nscorer with stub detector: {res['images_per_s']:.0f} images/s")
    # one image fewer: refused before any model loads (--allow-incomplete: the generation test below)
    (root / "00100" / "samples" / "0003.png").unlink()
    r = runner.invoke(app, ["eval-geneval", "--images", str(root), *plug])
    assert isinstance(r.exception, FluidError) and "incomplete GenEval set: 2211 images" in str(r.exception)
    assert "first: 00100" in str(r.exception)


def test_eval_geneval_generates_through_the_sampler(tmp_path, plug, monkeypatch):
    import inspect

    import fluid_cli.sampling.run as sampling_run

    bench, real = R.load_metadata(), inspect.signature(sampling_run.run_sample)

    def fake_run_sample(run):
        real.bind(run)
        out, prompts_file, images_per_prompt = run.out, run.prompts_file, run.images_per_prompt
        lines = Path(prompts_file).read_text().splitlines()
        assert lines == [m["prompt"] for m in bench] and images_per_prompt == 4 and run.seed == 3
        with open(Path(out) / "samples.jsonl", "w") as f:
            for p in range(12):  # a dozen prompts are enough here: the full set is scored above
                for i in range(images_per_prompt):
                    synth(bench[p], p, i)[0].save(Path(out) / f"p{p:06d}_i{i:03d}.png")
                    f.write(json.dumps({"file": f"p{p:06d}_i{i:03d}.png", "prompt": lines[p], "prompt_index": p,
                                        "image_index": i, "step": 42}) + "\n")  # fmt: skip
        return {"out": str(out)}

    monkeypatch.setattr(sampling_run, "run_sample", fake_run_sample)
    root = tmp_path / "gen"
    r = runner.invoke(app, ["eval-geneval", str(tmp_path / "ckpt"), "--out", str(root), "--seed", "3",
                            "--run", str(tmp_path / "run"), "--allow-incomplete", *plug])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(root / "geneval.json")
    assert json.loads((root / "00552" / "metadata.jsonl").read_text()) == bench[552]
    assert (root / "00011" / "samples" / "0003.png").is_file() and not any(
        (root / "00012" / "samples").iterdir()
    )
    res = json.loads((tmp_path / "run" / "eval" / "geneval-step42.json").read_text())
    assert res["overall"] == 0.5 and res["step"] == 42 and res["images"] == 48 and res["complete"] is False


def test_score_folder_api_with_own_classes(tmp_path):
    root = tmp_path / "shapes"
    meta = {"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a square"}
    (root / "00000" / "samples").mkdir(parents=True)
    (root / "00000" / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    canvas().save(root / "00000" / "samples" / "0000.png")
    rows = score_folder(root, lambda im: [det("square")], classify, classes=["square", "circle"])
    assert rows[0]["correct"] and summarize(rows)["overall"] == 1.0
    with pytest.raises(FluidError, match="class list lacks"):
        score_folder(root, lambda im: [], classify)  # the COCO 80 have no "square"


def test_missing_detector_weights_is_one_line(tmp_path):
    root = write_folder(tmp_path / "g", n_prompts=1)
    p = run_fluid(
        "eval-geneval", "--images", str(root), "--allow-incomplete", env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "facebook/mask2former-swin-small-coco-instance" in lines[0]
        and "--detector DIR" in lines[0]
    )


# ---- the real adapters, on tiny random models saved with save_pretrained ---------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A 80-class Mask2Former (tiny Swin) and a tiny CLIP with a letters-only tokenizer: random
    weights, so this checks the plumbing (shapes, masks, boxes, the CLI path), not accuracy."""
    import string

    import torch
    import transformers as tf

    d = tmp_path_factory.mktemp("tiny-geneval")
    torch.manual_seed(0)
    swin = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    m2f = tf.Mask2FormerConfig(backbone_config=swin, num_labels=80, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_layers=1, decoder_layers=2, num_queries=10, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_attention_heads=2)  # fmt: skip
    tf.Mask2FormerForUniversalSegmentation(m2f).save_pretrained(d / "m2f")
    tf.Mask2FormerImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32
    ).save_pretrained(d / "m2f")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + "-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tf.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d / "clip")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        d / "clip"
    )
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        d / "clip"
    )
    return d


def test_mask2former_and_clip_adapters_on_tiny_models(tiny_models, tmp_path):
    from fluid_cli.eval.geneval_models import ClipColourClassifier, Mask2FormerDetector

    detector = Mask2FormerDetector(str(tiny_models / "m2f"), device="cpu")
    dets = detector(Image.new("RGB", (80, 60), (10, 200, 30)))
    assert len(dets) == 10 and all(d.cls in R.coco_classes() and 0 <= d.score <= 1 for d in dets)
    for d in dets:
        assert d.mask.shape == (60, 80) and d.mask.dtype == bool
        if d.mask.any():  # the box is the mask's tight box
            ys, xs = np.nonzero(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    clip = ClipColourClassifier(str(tiny_models / "clip"), device="cpu")
    colours = clip([Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (5, 30), (0, 0, 255))], "dog")
    assert len(colours) == 2 and set(colours) <= set(R.COLOURS) and clip._weights["dog"].shape == (10, 16)
    root = write_folder(tmp_path / "g", n_prompts=2)
    r = runner.invoke(app, ["eval-geneval", "--images", str(root), "--allow-incomplete", "--json", "--device", "cpu",
                            "--detector", str(tiny_models / "m2f"), "--clip", str(tiny_models / "clip")])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 8 and res["detector"]["resolved"] == str((tiny_models / "m2f").resolve())
