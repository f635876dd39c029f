"""`fluid tokenize` and `fluid encode-text` end to end, on tiny random models (no downloads).

Covers the three source kinds and prompts files, the artifact contract `fluid train` reads, keys
joining the two stages, bad data skipped and named, resume after SIGKILL, splits across processes,
the one-line offline error, the full-size SD-VAE shapes, and `fluid train` on the outputs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, TINY_RESOLUTION, image_bytes, wds_members, write_tar
from typer.testing import CliRunner

from fluid_cli.artifact import Artifact
from fluid_cli.cli import app
from fluid_cli.errors import FluidError

RES = str(TINY_RESOLUTION)


def run_ok(args: list[str], input: str | None = None) -> str:
    """Run the CLI in-process; it must succeed and print only the output dir on stdout."""
    result = CliRunner().invoke(app, args, input=input)
    assert result.exit_code == 0, f"{result.exception!r}\n{result.stderr}"
    out = args[args.index("--out") + 1]
    assert result.stdout == f"{out}\n"
    return result.stderr


def records(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    art = Artifact.open(path)
    return {key: art.get(s, r) for key, (s, r) in art.index().items()}


# Stored floats computed in another process or another batch: the same value up to about one unit in
# the last place of the stored dtype (the encoder's kernels may sum in another order), as rtol, atol.
STORED_TOL = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5), torch.float32: (1e-5, 1e-6)}


def assert_same_artifact(a: Path, b: Path) -> None:
    """Two artifact folders hold the same records: the same files, plan, rows (jsonl), record keys and
    skips byte for byte, integer tensors (codes, lengths) exactly, float tensors within STORED_TOL;
    the manifests differ at most in the shard checksums (which hash those floats)."""
    from safetensors import safe_open

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        x, y = a / name, b / name
        if name == "manifest.json":
            mx, my = json.loads(x.read_text()), json.loads(y.read_text())
            for m in (mx, my):
                for shard in m["shards"]:
                    shard.pop("sha256")
            assert mx == my
        elif name.endswith(".safetensors"):
            with safe_open(str(x), "pt") as fx, safe_open(str(y), "pt") as fy:
                assert fx.metadata() == fy.metadata() and sorted(fx.keys()) == sorted(fy.keys()), name
                for k in fx.keys():
                    tx, ty = fx.get_tensor(k), fy.get_tensor(k)
                    if tx.is_floating_point():
                        rtol, atol = STORED_TOL[tx.dtype]
                        torch.testing.assert_close(tx, ty, rtol=rtol, atol=atol, msg=f"{name}:{k}")
                    else:
                        assert torch.equal(tx, ty), f"{name}:{k}"
        else:
            assert x.read_bytes() == y.read_bytes(), name


def captions(path: Path) -> dict[str, str]:
    art = Artifact.open(path)
    return {row["key"]: row["caption"] for i in range(len(art.shard_files)) for row in art.rows(i)}


@pytest.fixture(scope="module")
def wds_outputs(tmp_path_factory, tiny_wds_tars, tiny_vae_dir, tiny_vq_dir, tiny_t5_dir):
    """The three artifacts of the tiny tars, made once through the CLI (brace pattern as source)."""
    d = tmp_path_factory.mktemp("wds-out")
    pattern = str(tiny_wds_tars[0].parent / "{00000..00001}.tar")
    common = [pattern, "--records-per-shard", "5"]
    run_ok(
        ["tokenize", *common, "--tokenizer", str(tiny_vae_dir), "--out", str(d / "lat"), "--resolution", RES]
    )
    run_ok(
        ["tokenize", *common, "--tokenizer", str(tiny_vq_dir), "--out", str(d / "codes"), "--resolution", RES]
    )
    run_ok(
        ["encode-text", *common, "--encoder", str(tiny_t5_dir), "--out", str(d / "txt"), "--max-length", "20"]
    )
    return d


def test_wds_latents_codes_text_contract(wds_outputs, tiny_wds_tars, tiny_vae_dir, tiny_t5_dir):
    d = wds_outputs
    lat, codes, txt = (Artifact.open(d / n) for n in ("lat", "codes", "txt"))
    assert [a.num_records for a in (lat, codes, txt)] == [12, 12, 12]
    assert [len(a.shard_files) for a in (lat, codes, txt)] == [3, 3, 3]  # 12 records, 5 per shard
    assert lat.kind == "image-latents" and codes.kind == "image-codes" and txt.kind == "text-embeddings"
    assert lat.attrs == {
        "latent_channels": 4,
        "latent_size": [8, 8],
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "resolution": 32,
        "flip": True,
        "tokenizer": str(tiny_vae_dir),
        "tokenizer_class": "AutoencoderKL",
    }
    assert codes.attrs["vocab_size"] == 64 and codes.attrs["codes_shape"] == [4, 4]
    from transformers import AutoTokenizer

    long = sum(len(ids) > 20 for ids in AutoTokenizer.from_pretrained(tiny_t5_dir)(CAPTIONS)["input_ids"])
    assert 0 < long < 12
    assert txt.attrs == {
        "text_dim": 32,
        "max_length": 20,
        "encoder": str(tiny_t5_dir),
        "tokenizer": str(tiny_t5_dir),
        "truncated": long,
    }
    assert (
        lat.manifest["producer"]["stage"] == "tokenize" and txt.manifest["producer"]["stage"] == "encode-text"
    )
    assert {k: (v.dtype, v.shape) for k, v in lat.fields.items()} == {
        n: ("float16", [4, 8, 8]) for n in ("mean", "std", "mean_flip", "std_flip")
    }
    # keys: webdataset's own __key__, the same in all three artifacts, in source order
    import webdataset as wds

    wds_keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in tiny_wds_tars], shardshuffle=False)]
    assert wds_keys == [f"{i:09d}" for i in range(12)]
    assert list(lat.index()) == list(codes.index()) == list(txt.index()) == wds_keys
    assert captions(d / "txt") == {f"{i:09d}": CAPTIONS[i] for i in range(12)}
    rec = records(d / "lat")["000000003"]
    assert rec["mean"].dtype == torch.float16 and rec["mean"].shape == (4, 8, 8)
    assert records(d / "codes")["000000003"]["codes"].dtype == torch.int32
    h = records(d / "txt")["000000003"]["hidden"]
    assert h.dtype == torch.bfloat16 and h.shape[1] == 32 and 1 <= h.shape[0] <= 20
    null = txt.extra_path("null_text")
    assert txt.manifest["extras"] == {"null_text": "null-text.safetensors"} and null.is_file()


def test_values_match_direct_model_calls(wds_outputs, tiny_vae_dir, tiny_vq_dir, tiny_t5_dir):
    """The stored tensors are what the models give for the preprocessed image / caption."""
    from diffusers import AutoencoderKL, VQModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    from fluid_cli.stages.image_tokenize import center_crop_arr, open_rgb, to_model_input

    d = wds_outputs
    x = to_model_input(
        [center_crop_arr(open_rgb(image_bytes(4, fmt="PNG")), TINY_RESOLUTION)]
    )  # key ...4 is a png
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
        vq = VQModel.from_pretrained(tiny_vq_dir).eval()
        idx = vq.quantize(vq.encode(x).latents)[2][2].reshape(4, 4)
        tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
        t5 = T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
        hid = t5(**tok([CAPTIONS[4]], max_length=20, truncation=True, return_tensors="pt")).last_hidden_state[
            0
        ]
        null = t5(**tok([""], return_tensors="pt")).last_hidden_state[0]
    lat = records(d / "lat")["000000004"]
    torch.testing.assert_close(lat["mean"].float(), post.mean[0] * 0.18215, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lat["std_flip"].float(), post.std[1] * 0.18215, atol=2e-3, rtol=2e-3)
    # nearest-codebook codes from a batch of 5 vs a batch of 1: equal unless two codebook entries are
    # equidistant to rounding (at most one of the 16 may differ)
    codes = records(d / "codes")["000000004"]["codes"]
    assert codes.shape == idx.shape and int((codes != idx.int()).sum()) <= 1
    torch.testing.assert_close(records(d / "txt")["000000004"]["hidden"].float(), hid, atol=2e-2, rtol=2e-2)
    stored_null = load_file(str(d / "txt" / "null-text.safetensors"))["hidden"]
    assert stored_null.dtype == torch.bfloat16 and stored_null.shape == null.shape == (1, 32)  # just </s>


def test_rerun_of_complete_stage_is_a_no_op(wds_outputs, tiny_wds_tars, tiny_vae_dir, caplog):
    caplog.set_level("INFO")
    d = wds_outputs
    # the rerun checks the shards against the manifest and records that in verified.json; nothing else changes
    before = {p.name: p.stat().st_mtime_ns for p in (d / "lat").iterdir() if p.name != "verified.json"}
    args = [
        *map(str, tiny_wds_tars),
        "--tokenizer",
        str(tiny_vae_dir),
        "--out",
        str(d / "lat"),
        "--resolution",
        RES,
    ]
    run_ok(["tokenize", *args, "--records-per-shard", "5"])
    assert "already complete" in caplog.text
    assert {
        p.name: p.stat().st_mtime_ns for p in (d / "lat").iterdir() if p.name != "verified.json"
    } == before
    result = CliRunner().invoke(app, ["tokenize", *args, "--records-per-shard", "6"])
    assert isinstance(result.exception, FluidError) and "records_per_shard: 5 -> 6" in str(result.exception)


def _image_folder(d: Path) -> Path:
    (d / "imgs").mkdir()
    for i, name in enumerate(["cat.jpg", "dog.png", "boat.webp"]):
        (d / "imgs" / name).write_bytes(image_bytes(i, (40, 56), ("JPEG", "PNG", "WEBP")[i]))
    rows = [("cat.jpg", "a cat"), ("dog.png", "a dog"), ("gone.jpg", "a lost file"), ("boat.webp", "")]
    with open(d / "captions.jsonl", "w") as f:
        f.writelines(json.dumps({"file_name": n, "caption": c}) + "\n" for n, c in rows)
    with open(d / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows(rows)
    return d / "imgs"


def _tokenize_and_encode(src: list[str], out: Path, vae: Path, t5: Path, *tokenize_extra: str) -> None:
    """`fluid tokenize` into OUT/lat and `fluid encode-text` into OUT/txt of the same source."""
    run_ok(
        [
            "tokenize",
            *src,
            "--tokenizer",
            str(vae),
            "--out",
            str(out / "lat"),
            "--resolution",
            RES,
            *tokenize_extra,
        ]
    )
    run_ok(["encode-text", *src, "--encoder", str(t5), "--out", str(out / "txt")])


@pytest.mark.parametrize("table", ["captions.jsonl", "captions.csv"])
def test_folder_with_captions_table(tmp_path, table, tiny_vae_dir, tiny_t5_dir):
    imgs = _image_folder(tmp_path)
    src = [str(tmp_path / table), "--images-dir", str(imgs)]
    _tokenize_and_encode(src, tmp_path, tiny_vae_dir, tiny_t5_dir, "--no-flip")
    lat, txt = Artifact.open(tmp_path / "lat"), Artifact.open(tmp_path / "txt")
    assert list(lat.index()) == list(txt.index()) == ["cat", "dog"]
    assert set(lat.fields) == {"mean", "std"} and lat.attrs["flip"] is False
    assert captions(tmp_path / "txt") == {"cat": "a cat", "dog": "a dog"}
    expect = [
        {
            "key": "gone",
            "source": str(imgs / "gone.jpg"),
            "reason": f"missing image file: No such file or directory: {imgs / 'gone.jpg'}",
        },
        {"key": "boat", "source": str(imgs / "boat.webp"), "reason": "missing caption"},
    ]
    assert lat.manifest["skipped"] == txt.manifest["skipped"] == expect


def test_coco_captions_json(tmp_path, tiny_vae_dir, tiny_t5_dir):
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (42, 7, 9)]
    for i, im in enumerate(images):
        (imgs / im["file_name"]).write_bytes(image_bytes(i))
    anns = [(7, "a dog first"), (42, "a cat"), (7, "a dog second"), (42, "a cat again")]
    coco = {
        "images": images,
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(anns)],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    src = [str(tmp_path / "captions_val2014.json"), "--images-dir", str(imgs)]
    _tokenize_and_encode(src, tmp_path, tiny_vae_dir, tiny_t5_dir)
    run_ok(
        [
            "encode-text",
            *src,
            "--encoder",
            str(tiny_t5_dir),
            "--out",
            str(tmp_path / "txt2"),
            "--coco-caption",
            "1",
        ]
    )
    assert list(Artifact.open(tmp_path / "lat").index()) == ["coco-42", "coco-7"]
    assert captions(tmp_path / "txt") == {
        "coco-42": "a cat",
        "coco-7": "a dog first",
    }  # first in annotation order
    assert captions(tmp_path / "txt2") == {"coco-42": "a cat again", "coco-7": "a dog second"}
    skipped = Artifact.open(tmp_path / "txt").manifest["skipped"]
    assert skipped == [
        {"key": "coco-9", "source": str(imgs / images[2]["file_name"]), "reason": "missing caption"}
    ]
    result = CliRunner().invoke(
        app, ["tokenize", src[0], "--tokenizer", str(tiny_vae_dir), "--out", str(tmp_path / "x")]
    )
    assert isinstance(result.exception, FluidError) and "needs --images-dir" in str(result.exception)


def test_prompts_file_and_stdin(tmp_path, tiny_t5_dir):
    (tmp_path / "prompts.txt").write_text("a red cube\n\n  a blue ball  \n")
    run_ok(
        [
            "encode-text",
            str(tmp_path / "prompts.txt"),
            "--encoder",
            str(tiny_t5_dir),
            "--out",
            str(tmp_path / "a"),
        ]
    )
    run_ok(
        ["encode-text", "-", "--encoder", str(tiny_t5_dir), "--out", str(tmp_path / "b")],
        input="a red cube\n\n a blue ball\n",
    )
    expect = {"prompt-000001": "a red cube", "prompt-000003": "a blue ball"}  # blank lines keep their numbers
    assert captions(tmp_path / "a") == captions(tmp_path / "b") == expect
    assert Artifact.open(tmp_path / "b").manifest["producer"]["sources"] == ["-"]


def _bad_tars(d: Path) -> tuple[list[Path], tuple[int, int], int]:
    """One tar with a corrupt image, a missing caption and a corrupt member header; one truncated
    inside a member; one that is not a tar at all."""
    members = wds_members(100, 6)  # keys 000000100..105, each image then caption
    members[2] = ("000000101.png", image_bytes(101, fmt="PNG")[:60])  # a truncated png
    del members[5]  # 000000102.webp keeps no caption (its .json is gone)
    a = write_tar(d / "a.tar", members)
    data = bytearray(a.read_bytes())
    import tarfile

    with tarfile.open(a) as tf:
        names = {
            t.name.split(".")[0] + ("-cap" if t.name.endswith(("txt", "json")) else ""): t
            for t in tf.getmembers()
        }
        bad = names["000000104"]  # its image member
        gap = (bad.offset, names["000000104-cap"].offset)
    data[bad.offset : bad.offset + 100] = b"\xff" * 100  # the header checksum fails: member lost
    a.write_bytes(bytes(data))
    b = write_tar(d / "b.tar", wds_members(200, 3))
    with tarfile.open(b) as tf:
        cut_member = next(t for t in tf.getmembers() if t.name == "000000201.jpg")
    cut = cut_member.offset_data + 50
    b_end = cut_member.offset_data + -(-cut_member.size // 512) * 512  # where its next header was due
    b.write_bytes(b.read_bytes()[:cut])  # truncated inside 000000201.png
    (d / "c.tar").write_bytes(b"this is not a tar file")
    return [a, b, d / "c.tar"], gap, b_end


def test_bad_data_is_skipped_and_named(tmp_path, tiny_vae_dir, tiny_t5_dir):
    paths, (g0, g1), b_end = _bad_tars(tmp_path)
    tars = [str(p) for p in paths]
    run_ok(
        [
            "tokenize",
            *tars,
            "--tokenizer",
            str(tiny_vae_dir),
            "--out",
            str(tmp_path / "lat"),
            "--resolution",
            RES,
            "--records-per-shard",
            "4",
        ]
    )
    run_ok(
        [
            "encode-text",
            *tars,
            "--encoder",
            str(tiny_t5_dir),
            "--out",
            str(tmp_path / "txt"),
            "--records-per-shard",
            "4",
        ]
    )
    lat, txt = Artifact.open(tmp_path / "lat"), Artifact.open(tmp_path / "txt")
    good = ["000000100", "000000103", "000000105", "000000200"]
    assert list(lat.index()) == list(txt.index()) == good
    skipped = lat.manifest["skipped"]
    assert skipped == txt.manifest["skipped"]  # the two stages skip the same records, for the same reasons
    a, b, c = tars
    got = [(s["key"], s["source"], s["reason"].split(":")[0]) for s in skipped]
    assert got == [
        ("000000101", f"{a}:000000101", "corrupt image"),
        ("000000102", f"{a}:000000102", "missing caption"),
        (None, f"{a}@{g0}", f"corrupt tar header; bytes {g0}-{g1} unreadable"),
        ("000000104", f"{a}:000000104", "no image member (found"),
        ("000000201", f"{b}:000000201", "unreadable tar member 000000201.jpg"),
        (None, f"{b}@{b_end}", f"tar ends early (no member header at byte {b_end})"),
        (None, c, "unreadable tar"),
    ]
    assert lat.manifest["num_records"] == 4 and len(skipped) == 7


def _env(tmp_path: Path) -> dict[str, str]:
    # an empty HF cache: what a fresh offline machine has
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "FLUID_DEBUG": ""}


def test_resume_after_sigkill_gives_the_same_shards(tmp_path, tiny_vae_dir):
    tar = write_tar(tmp_path / "big.tar", wds_members(0, 24))
    args = [
        "tokenize",
        str(tar),
        "--tokenizer",
        str(tiny_vae_dir),
        "--resolution",
        "64",
        "--records-per-shard",
        "2",
    ]
    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluid_cli", *args, "--out", str(out)],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert not (out / "manifest.json").exists() and 1 <= len(done) < 12, done  # killed mid-run
    (out / "shard-00011.safetensors.tmp-99999").write_bytes(b"half a shard")  # as a killed writer leaves
    run_ok([*args, "--out", str(out)])
    assert not list(out.glob("*.tmp-*"))
    run_ok([*args, "--out", str(tmp_path / "straight")])
    files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    # shards (the killed subprocess's and the resumed run's alike), plan and manifest
    assert_same_artifact(out, tmp_path / "straight")


def test_split_across_processes_assembles_the_same_artifact(tmp_path, tiny_wds_tars, tiny_vae_dir, caplog):
    caplog.set_level("INFO")
    args = [
        "tokenize",
        *map(str, tiny_wds_tars),
        "--tokenizer",
        str(tiny_vae_dir),
        "--resolution",
        RES,
        "--records-per-shard",
        "3",
        "--out",
        str(tmp_path / "split"),
    ]
    run_ok([*args, "--num-shards", "2", "--shard-index", "1"])
    assert sorted(p.name for p in (tmp_path / "split").glob("shard-*")) == [
        "shard-00001.safetensors",
        "shard-00003.safetensors",
    ]
    assert (
        not (tmp_path / "split" / "manifest.json").exists()
        and "the run that completes the last one" in caplog.text
    )
    os.environ.update(RANK="0", WORLD_SIZE="2")  # torchrun's way of saying the same
    try:
        run_ok(args)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    run_ok([*args[:-1], str(tmp_path / "one")])
    assert_same_artifact(tmp_path / "split", tmp_path / "one")

    def outputs() -> dict:  # verified.json is the rerun's verification record, not an output
        return {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir() if p.name != "verified.json"}

    before = outputs()
    run_ok([*args[:-1], str(tmp_path / "one")])  # a rerun of the finished stage: the same bytes
    assert outputs() == before


def test_missing_model_offline_is_one_line(tmp_path, tiny_wds_tars):
    tar = str(tiny_wds_tars[0])
    cmds = {
        "missing dir": [
            "tokenize",
            tar,
            "--tokenizer",
            str(tmp_path / "no-such-vae"),
            "--out",
            str(tmp_path / "a"),
        ],
        "unknown hub id": [
            "encode-text",
            tar,
            "--encoder",
            "nobody/no-such-t5",
            "--out",
            str(tmp_path / "b"),
        ],
    }
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "fluid_cli", *c],
            env=_env(tmp_path),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k, c in cmds.items()
    }
    for what, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and out == "", what
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "a").exists()


def test_full_size_sd_vae_gives_paper_shapes():
    """The SD-VAE architecture (random weights, built from its published config): 256px -> 4x32x32,
    grouped 2x2 -> 256 tokens of 16 channels, the paper's continuous token sequence."""
    from diffusers import AutoencoderKL

    from fluid_cli.stages.image_tokenize import ImageTokenizerStage, center_crop_arr, open_rgb, to_model_input
    from fluid_cli.stages.pretrained import Pretrained

    torch.manual_seed(0)
    cfg = {
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    }
    vae = AutoencoderKL(**cfg).eval()
    stage = ImageTokenizerStage(
        Pretrained("sd-vae-random", None, "AutoencoderKL", dict(vae.config)),
        256,
        flip=False,
        batch_size=1,
        device="cpu",
        model=vae,
    )
    x = to_model_input([center_crop_arr(open_rgb(image_bytes(0, (320, 288))), 256)])
    assert x.shape == (1, 3, 256, 256) and -1 <= x.min() and x.max() <= 1
    out = stage.encode(x)
    assert set(out) == {"mean", "std"} and stage.fields["mean"].shape == [4, 32, 32]
    mean = out["mean"]
    assert mean.shape == (1, 4, 32, 32) and mean.dtype == torch.float16 and (out["std"] > 0).all()
    tokens = mean.reshape(1, 4, 16, 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 256, 16)
    assert tokens.shape == (1, 256, 16)
    assert torch.equal(
        tokens[0, 17], mean[0, :, 2:4, 2:4].reshape(16)
    )  # token (1, 1) = its 2x2 patch, channel-major


def test_train_runs_on_stage_outputs(wds_outputs, tmp_path):
    """`fluid train` reads the two artifacts as written (the issue's command, 3 steps)."""
    d, run = wds_outputs, tmp_path / "run"
    args = f"train --variant rand-cont --size tiny --image-tokens {d / 'lat'} --text {d / 'txt'} --out {run}"
    run_ok([*args.split(), "--steps", "3", "--batch-size", "4"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 3 for r in rows)


def test_repeated_captions_are_encoded_once_with_the_same_states(tiny_t5_dir):
    from fluid_cli.stages import pretrained as pt
    from fluid_cli.stages.text_encode import TextEncoderStage

    stage = TextEncoderStage(pt.resolve_text_encoder(str(tiny_t5_dir)), 16, 4, "cpu", check_images=False)
    captions = ["a red cube", "two cats on a sofa", "a red cube", "a dog", "a red cube"]
    calls = []
    forward = stage.encode.__func__

    def counting(self, caps):
        calls.append(list(caps))
        return forward(self, caps)

    stage.encode = counting.__get__(stage)
    states, counts = stage.encode(captions)
    assert calls[-1] == ["a red cube", "two cats on a sofa", "a dog"]  # the model saw each once
    assert torch.equal(states[0], states[2]) and torch.equal(states[0], states[4])
    assert states[0].data_ptr() != states[2].data_ptr()  # separate tensors: safe to store apart
    alone, _ = forward(stage, ["a dog"])
    assert torch.allclose(states[3].float(), alone[0].float(), atol=1e-2)  # bf16, another batch
    assert counts[0] == counts[2] == counts[4]
