"""FID: the Frechet distance against its closed form, stats files, the COCO-30K list, and `fluid
eval-fid` end to end with a tiny pixel-statistics extractor (no Inception, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fluid
from PIL import Image
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from fluid_cli.eval import fid as F
from fluid_cli.eval.coco_prompts import draw, read_coco, write_coco_prompts
from fluid_cli.eval.fid_run import run_eval_fid
from fluid_cli.settings import EvalFidSettings

runner = CliRunner()


def pixel_stats(x):
    """A tiny feature extractor: per-channel mean and std of the resized batch (B, 6)."""
    import torch

    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def write_images(folder: Path, n: int, seed: int, size=(32, 32), offset: int = 0, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = (rng.integers(0, 256, (4, 4, 3)) * 0.5 + offset).clip(0, 255).astype(np.uint8)
        p = folder / (names[i] if names else f"{i:04d}.png")
        Image.fromarray(small).resize(size, Image.BILINEAR).save(p)
        out.append(p)
    return out


# ---- the Frechet distance ---------------------------------------------------------------------


def test_frechet_matches_closed_form_on_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-9)
    # commuting, not diagonal: the same eigenbasis Q, so sqrt(S1 S2) = Q sqrt(ab) Q^T exactly
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-7)
    assert F.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert F.frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == pytest.approx(5.0)


def test_stats_round_trip_and_bad_file(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = F.feature_stats(rng.normal(size=(50, 3)))
    F.save_stats(tmp_path / "s.npz", mu, sigma, {"mode": "clean", "count": 50})
    mu2, sigma2, meta = F.load_stats(tmp_path / "s.npz")
    assert (
        np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta == {"mode": "clean", "count": 50}
    )
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)  # stats written elsewhere: no meta
    assert F.load_stats(tmp_path / "plain.npz")[2] == {}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FluidError, match="not a stats file"):
        F.load_stats(tmp_path / "bad.npz")


# ---- the COCO-30K list ------------------------------------------------------------------------


def fake_coco(path: Path, n_images: int = 40, shuffle_seed: int | None = None) -> Path:
    rng = np.random.default_rng(3)
    images = [{"id": 1000 + i, "file_name": f"COCO_train2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    anns, aid = [], 0
    for im in images:
        for k in range(int(rng.integers(1, 6))):
            aid += 1
            text = "" if k == 0 and im["id"] % 7 == 0 else f"  caption {k} of\nimage {im['id']} "
            anns.append({"id": aid, "image_id": im["id"], "caption": text})
    if shuffle_seed is not None:  # another file order must not change the draw
        r = np.random.default_rng(shuffle_seed)
        images = [images[i] for i in r.permutation(len(images))]
        anns = [anns[i] for i in r.permutation(len(anns))]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_coco_list_is_seeded_one_caption_per_image(tmp_path):
    src = fake_coco(tmp_path / "captions.json")
    r1 = runner.invoke(
        app, ["coco-30k", str(src), "--out", str(tmp_path / "a.jsonl"), "--count", "20", "--json"]
    )
    assert r1.exit_code == 0, r1.output
    meta = json.loads(r1.stdout)
    write_coco_prompts(fake_coco(tmp_path / "shuffled.json", shuffle_seed=5), tmp_path / "b.jsonl", 20, 0)
    a, b = (tmp_path / "a.jsonl").read_text(), (tmp_path / "b.jsonl").read_text()
    assert a == b  # same seed, same list, whatever the file order
    rows = [json.loads(ln) for ln in a.splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert len({r["image_id"] for r in rows}) == 20  # one caption per image
    images, captions = read_coco(src)
    for r in rows:
        assert r["caption"] in captions[r["image_id"]] and r["file_name"] == images[r["image_id"]]
        assert "\n" not in r["caption"] and r["caption"] == r["caption"].strip()
    import hashlib

    assert meta["list_sha256"] == hashlib.sha256(a.encode()).hexdigest() and meta["count"] == 20
    assert (tmp_path / "a.txt").read_text().splitlines() == [r["caption"] for r in rows]
    subset = json.loads((tmp_path / "a.coco.json").read_text())
    assert [im["id"] for im in subset["images"]] == [r["image_id"] for r in rows]
    assert draw(images, captions, 20, 1) != rows  # another seed, another draw
    with pytest.raises(FluidError, match="more than"):
        draw(images, captions, 1000, 0)


# ---- eval-fid end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """A 12-caption list, its 'real' images, and a `fluid sample`-style dir made from it."""
    d = tmp_path_factory.mktemp("fid")
    src = fake_coco(d / "captions.json", n_images=30)
    write_coco_prompts(src, d / "list.jsonl", 12, 0)
    rows = [json.loads(ln) for ln in (d / "list.jsonl").read_text().splitlines()]
    write_images(d / "train2014", 12, seed=1, names=[r["file_name"] for r in rows])
    gen = d / "samples"
    files = write_images(gen, 12, seed=2, offset=60, names=[f"p{i:06d}_i000.png" for i in range(12)])
    with open(gen / "samples.jsonl", "w") as f:
        for i, (r, p) in enumerate(zip(rows, files, strict=True)):
            f.write(json.dumps({"file": p.name, "prompt": r["caption"], "prompt_index": i, "image_index": 0,
                                "step": 123, "checkpoint": "/runs/x/checkpoints/step-123"}) + "\n")  # fmt: skip
    return d


def _fid(images, feature_extractor=None, extractor_name="custom", **settings):
    """run_eval_fid with the settings as keywords, as the tests read best."""
    return run_eval_fid(EvalFidSettings(images=images, **settings), feature_extractor, extractor_name)


def test_eval_fid_end_to_end_with_tiny_extractor(coco_set, tmp_path):
    d = coco_set
    kw = {"feature_extractor": pixel_stats, "extractor_name": "pixel-stats", "device": "cpu"}
    r = _fid(d / "samples", make_ref=True, ref=tmp_path / "ref.npz", ref_images=d / "train2014",
                     ref_list=d / "list.jsonl", run_dir=tmp_path / "run", **kw)  # fmt: skip
    real = F.image_features(sorted((d / "train2014").glob("*.jpg")), pixel_stats, "clean", "cpu")
    fake = F.image_features(sorted((d / "samples").glob("*.png")), pixel_stats, "clean", "cpu")
    want = F.frechet_distance(*F.feature_stats(fake), *F.feature_stats(real))
    assert r["fid"] == pytest.approx(want, rel=1e-6) and r["fid"] > 1
    assert (r["count"], r["resolution"], r["mode"], r["step"], r["captions_checked"]) == (
        12,
        "32x32",
        "clean",
        123,
        True,
    )
    assert r["reference"]["sha256"] == F.sha256_file(tmp_path / "ref.npz")
    on_disk = json.loads((tmp_path / "run" / "eval" / "fid-step123.json").read_text())
    assert on_disk["metric"] == "fid" and on_disk["fid"] == r["fid"] and on_disk["step"] == 123
    assert json.loads((d / "samples" / "fid.json").read_text())["fid"] == r["fid"]
    # the cached stats are reused (same file bytes), and a stats-file reference gives the same FID
    before = (tmp_path / "ref.npz").stat().st_mtime_ns
    r2 = _fid(d / "samples", make_ref=True, ref=tmp_path / "ref.npz", ref_images=d / "train2014",
                      ref_list=d / "list.jsonl", out=tmp_path / "r2.json", **kw)  # fmt: skip
    assert (tmp_path / "ref.npz").stat().st_mtime_ns == before and r2["fid"] == r["fid"]
    r3 = _fid(d / "samples", ref=tmp_path / "ref.npz", out=tmp_path / "r3.json", **kw)
    assert r3["fid"] == pytest.approx(r["fid"]) and r3["count"] == 12
    # a folder against itself: zero
    r4 = _fid(d / "samples", ref=d / "samples", out=tmp_path / "r4.json", **kw)
    assert r4["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FluidError, match="--mode clean"):
        _fid(d / "samples", ref=tmp_path / "ref.npz", mode="legacy_pytorch", out=tmp_path / "x.json", **kw)


def test_eval_fid_refuses_wrong_count_mixed_sizes_and_other_captions(coco_set, tmp_path):
    d = coco_set
    F.save_stats(
        tmp_path / "ref.npz",
        np.zeros(6),
        np.eye(6),
        {"mode": "clean", "source": {"kind": "list", "count": 13}},
    )
    r = runner.invoke(app, ["eval-fid", str(d / "samples"), "--ref", str(tmp_path / "ref.npz")])
    assert isinstance(r.exception, FluidError) and "holds 12 images, the reference list expects 13" in str(
        r.exception
    )
    mixed = tmp_path / "mixed"
    write_images(mixed, 3, seed=4)
    write_images(mixed, 1, seed=5, size=(48, 32), names=["z.png"])
    r = runner.invoke(app, ["eval-fid", str(mixed), "--ref", str(tmp_path / "ref.npz")])
    assert isinstance(r.exception, FluidError) and "mixed image sizes" in str(r.exception)
    other = tmp_path / "other.jsonl"  # the same files, but captions that are not the list's
    lines = [json.loads(ln) for ln in (d / "list.jsonl").read_text().splitlines()]
    other.write_text("".join(json.dumps({**x, "caption": x["caption"] + "!"}) + "\n" for x in lines))
    with pytest.raises(FluidError, match="which is not caption 0"):
        _fid(d / "samples", make_ref=True, ref_images=d / "train2014", ref_list=other,
                     feature_extractor=pixel_stats, device="cpu")  # fmt: skip


def test_missing_inception_is_one_line(coco_set, tmp_path):
    F.save_stats(tmp_path / "ref.npz", np.zeros(6), np.eye(6), {"mode": "clean"})
    p = run_fluid("eval-fid", str(coco_set / "samples"), "--ref", str(tmp_path / "ref.npz"),
             "--inception", str(tmp_path / "nowhere" / F.INCEPTION_FILE))  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: Inception weights")
        and "/tmp/inception-2015-12-05.pt" in lines[0]
    )
    with pytest.raises(FluidError, match="pt_inception"):
        F.inception_path("legacy_pytorch", tmp_path)


@pytest.mark.parametrize("cmd", ["coco-30k", "eval-fid", "eval-geneval"])
def test_help(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_local_torchscript_inception_is_wrapped_like_clean_fid(tmp_path):
    """A stand-in torchscript file with clean-fid's interface: `layers` sees (x - 128) / 128 in
    clean mode; legacy_tensorflow calls the module itself with return_features=True."""
    import torch

    class Layers(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3)).unsqueeze(1).repeat(1, 2048)

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x) + 1.0

    torch.jit.script(Fake()).save(str(tmp_path / F.INCEPTION_FILE))
    x = torch.full((2, 3, 299, 299), 192.0)
    clean, ident = F.inception_extractor("clean", tmp_path, torch.device("cpu"))  # a dir holding the file
    assert clean(x).shape == (2, 2048) and torch.allclose(clean(x), torch.tensor(0.5))
    assert ident["sha256"] == F.sha256_file(tmp_path / F.INCEPTION_FILE)
    tf, _ = F.inception_extractor("legacy_tensorflow", tmp_path / F.INCEPTION_FILE, torch.device("cpu"))
    assert torch.allclose(tf(x), torch.tensor(193.0))
