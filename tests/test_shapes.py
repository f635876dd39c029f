"""The embedded shapes benchmark: generator, exact detector + shapes-GenEval, held-out split, and the
offline tokenizers / text encoder in the real formats (`fluid shapes-data`, `fluid train-tokenizer`)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.eval.geneval_rules import Detection, relative_position
from fluid_cli.shapes.generator import GRID, record, write_shapes
from fluid_cli.shapes.geneval import score_images
from fluid_cli.shapes.prompts import TAGS, caption, heldout_specs
from fluid_cli.shapes.render import COLOURS, SHAPES
from fluid_cli.shapes.text_encoder import training_captions

runner = CliRunner()


def invoke_ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def records() -> list[tuple[np.ndarray, str, dict]]:
    return [record(7, i, 64) for i in range(300)]  # the default world: 64 px, grid layout


def test_generator_is_deterministic(tmp_path: Path):
    a, b, c = (write_shapes(tmp_path / n, records=40, seed=s) for n, s in [("a", 3), ("b", 3), ("c", 4)])
    tar = "train/shapes-00000.tar"
    assert (a / tar).read_bytes() == (b / tar).read_bytes()
    assert (a / tar).read_bytes() != (c / tar).read_bytes()
    assert (a / "heldout.jsonl").read_bytes() == (c / "heldout.jsonl").read_bytes()  # the split is fixed
    # a record does not depend on how many are written
    img, cap, meta = record(3, 5, 64)
    with tarfile.open(a / tar) as tf:
        assert tf.extractfile("shapes-00000005.txt").read().decode() == cap
        assert json.loads(tf.extractfile("shapes-00000005.json").read()) == meta


def test_records_cover_all_tags_and_captions_match_metadata(records):
    assert {m["tag"] for _, _, m in records} == set(TAGS)
    for img, cap, meta in records:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert cap == meta["prompt"]
        objects = meta["objects"]
        n = sum(c["count"] for c in meta["include"])
        assert len(objects) == n  # exactly what the caption asks: no extra objects
        for clause in meta["include"]:
            mine = [o for o in objects if o["shape"] == clause["class"]]
            assert len(mine) == clause["count"]
            if "color" in clause:
                assert all(o["colour"] == clause["color"] for o in mine)


def test_positions_are_unambiguous(records):
    positions = [m for _, _, m in records if m["tag"] == "position"]
    assert len(positions) > 20
    for meta in positions:
        ref, obj = meta["include"]
        relation, _ = obj["position"]
        box = {o["shape"]: o["box"] for o in meta["objects"]}
        det = {k: Detection(k, 1.0, tuple(v)) for k, v in box.items()}
        # exactly the asked relation under GenEval's rule (0.1 margin), no diagonal second one
        assert relative_position(det[obj["class"]], det[ref["class"]]) == {relation}


def test_detector_scores_one_on_ground_truth_and_zero_on_blanks(records):
    rows = score_images((m, img) for img, _, m in records)
    per_tag = {t: np.mean([r["correct"] for r in rows if r["tag"] == t]) for t in TAGS}
    assert per_tag == {t: 1.0 for t in TAGS}, [r for r in rows if not r["correct"]][:3]
    rng = np.random.default_rng(0)
    blanks = [np.full((64, 64, 3), v, np.uint8) for v in (128, 0, 255)]
    blanks.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rows = score_images((m, b) for _, _, m in records[:60] for b in blanks)
    assert not any(r["correct"] for r in rows)


def test_detector_is_exact_on_the_free_layout():
    for px in (32, 64):
        rows = score_images((m, img) for img, _, m in (record(1, i, px, "free") for i in range(60)))
        assert all(r["correct"] for r in rows)


def test_grid_layout_puts_one_object_in_each_used_cell(records):
    """Every 16 px cell (one image token) is plain background or exactly one object, drawn 12 px
    wide at the cell's centre: so a token takes one of 1 + 5 shapes x 10 colours values."""
    from fluid_cli.shapes.render import BACKGROUND

    cell = 64 // GRID
    kinds = set()
    for img, _, meta in records:
        boxes = [o["box"] for o in meta["objects"]]
        used = {(b[1] // cell, b[0] // cell) for b in boxes}
        assert len(used) == len(boxes)  # one object per cell
        for b in boxes:  # the tight box lies inside its cell, 2 px from every edge
            gx, gy = b[0] // cell, b[1] // cell
            assert b[2] <= (gx + 1) * cell - 2 and b[3] <= (gy + 1) * cell - 2
            assert b[0] >= gx * cell + 2 and b[1] >= gy * cell + 2
        for gy in range(GRID):
            for gx in range(GRID):
                patch = img[gy * cell : (gy + 1) * cell, gx * cell : (gx + 1) * cell]
                plain = (patch == BACKGROUND).all()
                assert plain != ((gy, gx) in used)
                kinds.add(patch.tobytes())
    assert 30 < len(kinds) <= 1 + 5 * 10


def test_a_grid_at_32px_is_refused(tmp_path: Path):
    result = runner.invoke(app, ["shapes-data", str(tmp_path / "d"), "--size", "32"])
    assert result.exit_code == 1 and "--layout grid needs --size 64" in str(result.exception)
    assert not (tmp_path / "d").exists()
    invoke_ok(["shapes-data", str(tmp_path / "f"), "--size", "32", "--layout", "free", "--records", "3"])


def test_heldout_prompts_are_disjoint_from_training(tmp_path: Path):
    out = write_shapes(tmp_path / "d", records=300, seed=0)
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    prompts = {h["prompt"] for h in heldout}
    assert (out / "heldout.txt").read_text().splitlines() == [h["prompt"] for h in heldout]
    assert {h["tag"] for h in heldout} == set(TAGS)
    assert prompts == {caption(s) for s in heldout_specs()}
    # the compositional prompts are never training captions; single_object prompts (one per shape,
    # no composition) are evaluated on every shape and trained on too
    single = {h["prompt"] for h in heldout if h["tag"] == "single_object"}
    assert single == {f"a photo of a {s}" for s in SHAPES} and single <= set(training_captions())
    assert not (prompts - single) & set(training_captions())
    with tarfile.open(out / "train/shapes-00000.tar") as tf:
        seen = {tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")}
    assert not (prompts - single) & seen
    train_words = {w for c in training_captions() for w in c.split()}
    for h in heldout:  # GenEval's schema, classes are shapes, and every word was seen in training
        assert set(h) <= {"tag", "prompt", "include", "exclude"}
        assert all(c["class"] in SHAPES and c.get("color", "red") in COLOURS for c in h["include"])
        assert set(h["prompt"].split()) <= train_words


def test_shapes_data_command(tmp_path: Path):
    out = tmp_path / "shapes"
    assert invoke_ok(["shapes-data", str(out), "--records", "12", "--seed", "1"]) == str(out)
    assert invoke_ok(["shapes-data", str(out), "--records", "12", "--seed", "1"]) == str(out)  # done: skip
    result = runner.invoke(app, ["shapes-data", str(out), "--records", "13"])
    assert result.exit_code == 1 and "other settings" in str(result.exception)
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "train/shapes-00000.tar"), shardshuffle=False))
    assert len(samples) == 12 and {"png", "txt", "json"} <= set(samples[0])


def _tiny(kind: str, out: Path, *extra: str) -> dict:
    args = ["train-tokenizer", kind, "--out", str(out), "--steps", "3", "--batch-size", "4"]
    return json.loads(invoke_ok([*args, *extra, "--json"]))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """vae, vq (default 8x8 codes), vq16 (4x4 codes) and t5, trained for 3 steps, saved to disk."""
    root = tmp_path_factory.mktemp("tok")
    extra = {"vae": [], "vq": ["--vocab", "64"], "vq16": ["--vocab", "64", "--downsample", "16"], "t5": []}
    return {k: (root / k, _tiny(k[:2] if k != "vae" else k, root / k, *e)) for k, e in extra.items()}


def test_image_tokenizers_save_in_diffusers_format(tokenizers):
    import torch
    from diffusers import AutoencoderKL, VQModel

    path, rep = tokenizers["vae"]
    assert rep["tokens_per_image"] == 16 and rep["latent_grid"] == [8, 8] and rep["patch"] == 16
    vae = AutoencoderKL.from_pretrained(path)  # a plain diffusers model, trained on 16 px cells
    assert vae.config.scaling_factor == pytest.approx(rep["scaling_factor"])
    x = torch.zeros(1, 3, 16, 16)
    assert vae.encode(x).latent_dist.mean.shape == (1, 4, 2, 2)
    path, rep = tokenizers["vq"]
    vq = VQModel.from_pretrained(path)
    assert rep["tokens_per_image"] == 64 and vq.config.num_vq_embeddings == 64
    _, _, (_, _, idx) = vq.quantize(vq.encode(x).latents)
    assert idx.numel() == 4 and 0 <= int(idx.min()) and int(idx.max()) < 64
    assert 0 < rep["psnr_db"] < 60 and 0 <= rep["geneval_recon"] <= 1
    assert tokenizers["vq16"][1]["tokens_per_image"] == 16 and tokenizers["vq16"][1]["latent_grid"] == [4, 4]


def test_tokenizer_lr_warms_up_then_anneals_to_zero():
    from fluid_cli.shapes.tokenizers import lr_factor

    f = [lr_factor(i, 800) for i in range(800)]
    assert f[0] == pytest.approx(1 / 50) and f[24] == pytest.approx(0.5, abs=0.01)  # linear warm-up
    assert max(f) > 0.98 and f[400] == pytest.approx(0.5, abs=0.01)  # the cosine's midpoint
    assert all(a >= b for a, b in zip(f[50:], f[51:], strict=False))  # never rises after warm-up
    assert f[-1] < 1e-4  # annealed: the last steps settle instead of jumping between minima
    assert lr_factor(0, 2) == pytest.approx(1.0)  # a 2-step run warms up in one step


def test_vq_trains_as_an_autoencoder_then_seeds_its_codebook_on_encoder_outputs():
    """Before vq_warmup_steps the quantizer is bypassed (no codebook gradient, no commitment); at the
    first quantized step every code is seeded next to an encoder output of that step's cells."""
    import torch

    from fluid_cli.shapes.tokenizers import (
        CodeStats,
        TokenizerSettings,
        build_model,
        training_batch,
        vq_loss,
        vq_warmup_steps,
    )  # fmt: skip

    s = TokenizerSettings(kind="vq", downsample=16, vocab=8, steps=8)
    assert s.resolved_lr() == 5e-4 and s.resolved_latent_channels() == 16
    assert TokenizerSettings(kind="vae").resolved_lr() == 2e-3 and vq_warmup_steps(800) == 200
    model, g, stats = build_model(s), torch.Generator().manual_seed(0), CodeStats(8)
    codebook = model.quantize.embedding.weight
    before = codebook.detach().clone()
    x = training_batch(s, 0)
    loss, info = vq_loss(model, x, stats, g, step=0, warmup=2)
    loss.backward()
    assert info["commit"] == 0.0 and codebook.grad is None
    torch.testing.assert_close(codebook.detach(), before)  # untouched in the autoencoder phase
    _, info = vq_loss(model, x, stats, g, step=2, warmup=2)
    z = model.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 16).detach()
    nearest = torch.cdist(codebook.detach(), z).min(dim=1).values
    assert (nearest < 0.05 * z.std() * 16**0.5).all(), nearest  # each code within its seeding noise
    assert info["commit"] > 0.0


def test_text_encoder_round_trips_captions(tokenizers):
    from transformers import AutoTokenizer, T5EncoderModel

    path, rep = tokenizers["t5"]
    assert rep["unk_tokens"] == 0
    tok = AutoTokenizer.from_pretrained(path)
    model = T5EncoderModel.from_pretrained(path)
    for text in ["a photo of an orange star left of a white cross", "a photo of four triangles"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert len(ids) == len(text.split()) + 1  # every word is one piece, then </s>
    h = model(**tok(["a photo of a red circle"], return_tensors="pt")).last_hidden_state
    assert h.shape == (1, 7, 64)


def test_data_stages_run_on_shapes_data(tmp_path: Path, tokenizers):
    from fluid_cli.artifact import Artifact

    data = write_shapes(tmp_path / "shapes", records=8, seed=2)
    tars = str(data / "train" / "*.tar")
    for name, kind, field, shape in [
        ("vae", "image-latents", "mean", [4, 8, 8]),
        ("vq", "image-codes", "codes", [8, 8]),
    ]:
        out = tmp_path / name
        invoke_ok(["tokenize", tars, "--tokenizer", str(tokenizers[name][0]), "--out", str(out),
                   "--resolution", "64", "--no-flip", "--device", "cpu"])  # fmt: skip
        art = Artifact.open(out, kind)
        assert art.num_records == 8 and list(art.fields[field].shape) == shape
    out = tmp_path / "t5"
    invoke_ok(
        ["encode-text", tars, "--encoder", str(tokenizers["t5"][0]), "--out", str(out), "--device", "cpu"]
    )
    assert Artifact.open(out, "text-embeddings").num_records == 8


def test_shapes_geneval_scores_a_geneval_folder(tmp_path: Path):
    from PIL import Image

    from fluid_cli.shapes.geneval import score_shapes_folder, write_reference_layout

    root = write_reference_layout(tmp_path / "ref", images_per_prompt=2)
    result = score_shapes_folder(root)
    assert result["images"] == 2 * len(heldout_specs()) and result["all_tags"]
    assert result["overall"] == 1.0 and set(result["tags"].values()) == {1.0}
    objects = result["objects"]  # the generator's own images hold exactly the asked objects
    assert objects["exact"] == 1.0 and objects["drawn_mean"] == objects["asked_mean"] > 1.0
    for png in root.glob("*/samples/*.png"):  # a sampler that writes grey squares scores 0
        Image.new("RGB", (32, 32), (128, 128, 128)).save(png)
    blank = score_shapes_folder(root)
    assert (
        blank["overall"] == 0.0 and blank["objects"]["drawn_mean"] == 0.0 and blank["objects"]["exact"] == 0.0
    )


def test_eval_geneval_cli_scores_shapes_prompts(tmp_path: Path):
    """`fluid eval-geneval --images DIR --prompts heldout.jsonl --detector shapes`: shapes-GenEval
    through the user-facing command, with a result fit-scaling reads; bad --prompts: one error line."""
    from PIL import Image

    from fluid_cli.shapes.geneval import write_reference_layout
    from fluid_cli.shapes.prompts import metadata

    root = write_reference_layout(tmp_path / "ref", images_per_prompt=4)
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(metadata(s)) + "\n" for s in heldout_specs()))
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    args = ["eval-geneval", "--images", str(root), "--prompts", str(prompts), "--detector", "shapes"]
    out = json.loads(invoke_ok([*args, "--run", str(run), "--step", "7", "--json"]))
    assert out["overall"] == 1.0 and out["benchmark"] == "shapes-geneval" and out["complete"]
    saved = json.loads(next((run / "eval").glob("geneval*.json")).read_text())
    assert saved["metric"] == "geneval" and saved["step"] == 7 and saved["overall"] == 1.0
    for png in list(root.glob("0000[0-3]/samples/*.png")):  # blank images for the first four prompts
        Image.new("RGB", (32, 32), (128, 128, 128)).save(png)
    assert json.loads(invoke_ok([*args, "--json"]))["overall"] < 1.0
    (tmp_path / "bad.jsonl").write_text('{"tag": "colors"}\n')
    result = runner.invoke(app, [*args[:3], "--prompts", str(tmp_path / "bad.jsonl"), "--detector", "shapes"])
    assert result.exit_code == 1 and "lacks GenEval's fields" in str(result.exception)


def test_study_fidelity_measure(tmp_path: Path):
    """recipes/shapes_study.py's image-quality measure: 1.0 on ground truth, 0 on blank images, and
    a crisp shape the prompt does not name counts against the image."""
    import importlib.util
    import sys

    from PIL import Image

    from fluid_cli.shapes.geneval import write_reference_layout

    spec = importlib.util.spec_from_file_location(
        "shapes_study", Path(__file__).parents[1] / "recipes" / "shapes_study.py"
    )
    study = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shapes_study", study)  # dataclasses look their module up
    spec.loader.exec_module(study)
    root = write_reference_layout(tmp_path / "ref", images_per_prompt=2)
    assert study.shape_fidelity(root)["fidelity"] == 1.0
    star = next(p for p in sorted(root.glob("*")) if '"star"' in (p / "metadata.jsonl").read_text())
    prompt = json.loads((star / "metadata.jsonl").read_text())
    assert {c["class"] for c in prompt["include"]} == {"star"}  # the single-object star prompt
    swapped = next(p for p in sorted(root.glob("*")) if '"circle"' in (p / "metadata.jsonl").read_text())
    for png in (star / "samples").glob("*.png"):  # a perfect circle for "a photo of a star"
        png.write_bytes((next((swapped / "samples").glob("*.png"))).read_bytes())
    assert study.shape_fidelity(root)["fidelity"] < 1.0
    for png in root.glob("*/samples/*.png"):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(png)
    assert study.shape_fidelity(root)["fidelity"] == 0.0
