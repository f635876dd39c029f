"""Bad inputs across every command, as a new user would type them (issue #15).

Each case runs the real entry point (`cli.main`, in-process) and asserts: the exit code, exactly one
`error:` line that says what is wrong, no traceback, and that every file that existed before the
command (the shared artifacts, run and samples, and the case's own inputs) is byte-identical after.
The cases are cheap: every one of them must be refused before any model is trained or sampled.
Below the table: the repairs a rerun makes (damaged shards, damaged PNGs), the verification record,
the safety net and Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_train_args, train_tiny

from fluid_cli.cli import main
from fluid_cli.synthetic import write_synthetic

PROMPTS = ["a red square", "a blue circle"]


@dataclass
class Ctx:
    root: Path  # shared, read-only for the cases
    tmp: Path  # the case's own folder

    @property
    def synth(self) -> Path:
        return self.root / "synth"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def file(self, name: str = "afile", data: bytes = b"not a folder\n") -> Path:
        p = self.tmp / name
        p.write_bytes(data)
        return p

    def copy(self, src: Path, name: str | None = None) -> Path:
        dst = self.tmp / (name or src.name)
        shutil.copytree(src, dst)
        return dst

    def train(self, *extra: str, latents: Path | None = None, text: Path | None = None) -> list[str]:
        return tiny_train_args(self.synth, self.tmp / "newrun", "--steps", "2", "--val-every", "0", *extra,
                               image_tokens=latents, text=text)  # fmt: skip

    def sample(
        self, *extra: str, ckpt: Path | None = None, out: Path | None = None, text: Path | None = None
    ):
        return ["sample", str(ckpt or self.run), "--prompt", PROMPTS[0], "--out", str(out or self.tmp / "samples"),
                "--text-embeddings", str(text or self.synth / "text"), "--steps", "2", "--diffusion-steps", "2",
                "--device", "cpu", *extra]  # fmt: skip

    def checkpoint_copy(self) -> Path:
        from fluid_cli.train import checkpoint as ckpt

        return self.copy(ckpt.latest(self.run), "ckpt")


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def png(path: Path, size: int = 16, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Three-shard synthetic artifacts (verified once) and a tiny run with a committed checkpoint."""
    root = tmp_path_factory.mktemp("shared")
    write_synthetic(root / "synth", records=48, seed=0, per_shard=16)
    train_tiny(root / "synth", root / "run", steps=2)
    return root


def snapshot(*dirs: Path) -> dict[str, str]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")) if d.is_dir() else []:
            if p.is_file() and p.name != "verified.json":  # the verification record, a cache
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`fluid ARGV` through the console-script entry point, in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    env = os.environ.pop("FLUID_DEBUG", None)
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if env is not None:
            os.environ["FLUID_DEBUG"] = env
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, expect: str, exit_code: int = 1) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == exit_code, err
    assert len(errors) == 1, err
    assert expect in errors[0], errors[0]
    assert "allow_pickle" not in err
    return errors[0]


def _manifest_500(c: Ctx) -> list[str]:
    art = c.copy(c.synth / "latents")
    m = json.loads((art / "manifest.json").read_text())
    m["num_records"] = 500
    (art / "manifest.json").write_text(json.dumps(m))
    return c.train(latents=art)


def _flipped(c: Ctx) -> list[str]:
    art = c.copy(c.synth / "latents")
    flip_byte(art / "shard-00001.safetensors")
    return c.train(latents=art)


def _all_truncated(c: Ctx) -> list[str]:
    art = c.copy(c.synth / "latents")
    for p in art.glob("shard-*.safetensors"):
        truncate(p)
    return c.train(latents=art)


def _no_manifest(c: Ctx) -> list[str]:
    art = c.copy(c.synth / "latents")
    (art / "manifest.json").unlink()
    return c.train(latents=art)


def _ckpt_truncated(c: Ctx) -> list[str]:
    ck = c.checkpoint_copy()
    truncate(ck / "model.safetensors")
    return c.sample(ckpt=ck)


def _ckpt_junk(c: Ctx) -> list[str]:
    ck = c.checkpoint_copy()
    (ck / "ema.safetensors").write_bytes(b"this is not safetensors at all")
    return c.sample(ckpt=ck)


def _sample_text_flipped(c: Ctx) -> list[str]:
    text = c.copy(c.synth / "text")
    flip_byte(text / "shard-00000.safetensors")
    return c.sample(text=text)


def _ckpt_config(c: Ctx) -> list[str]:
    ck = c.checkpoint_copy()
    (ck / "config.json").write_text('{"model": {"variant": ')
    return c.sample(ckpt=ck)


def _ckpt_pickle(c: Ctx) -> list[str]:
    import pickle

    ck = c.checkpoint_copy()
    (ck / "model.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    return c.sample(ckpt=ck)


def _scaling_table(c: Ctx, loss: str) -> list[str]:
    rows = "variant,size,params,val_loss\n" + "".join(
        f"rand-cont,s{i},{p},{v}\n" for i, (p, v) in enumerate([(1e8, 0.5), (3e8, 0.45), (1e9, loss)])
    )
    return ["fit-scaling", "--table", str(c.file("t.csv", rows.encode())), "--out", str(c.tmp / "fit")]


def _fid_truncated_png(c: Ctx) -> list[str]:
    import numpy as np

    from fluid_cli.eval import fid as F

    d = c.tmp / "gen"
    d.mkdir()
    for i in range(3):
        png(d / f"{i}.png", seed=i)
    truncate(d / "1.png", 0.6)
    F.save_stats(c.tmp / "ref.npz", np.zeros(4), np.eye(4), {"mode": "clean"})
    return ["eval-fid", str(d), "--ref", str(c.tmp / "ref.npz"), "--device", "cpu"]


def _fid_ref_not_npz(c: Ctx) -> list[str]:
    d = c.tmp / "gen"
    d.mkdir()
    png(d / "0.png")
    return ["eval-fid", str(d), "--ref", str(c.file("ref.npz", b"mu,sigma\n1,2\n"))]


def _geneval_prompts(c: Ctx, include: object) -> list[str]:
    meta = {"tag": "single_object", "prompt": "a photo of a dog", "include": include}
    p = c.file("prompts.jsonl", (json.dumps(meta) + "\n").encode())
    return ["eval-geneval", str(c.run), "--prompts", str(p), "--out", str(c.tmp / "gen"),
            "--detector", "shapes", "--device", "cpu"]  # fmt: skip


def _geneval_folder_truncated(c: Ctx) -> list[str]:
    from fluid_cli.shapes.prompts import heldout_specs, metadata

    meta = metadata(heldout_specs()[0])
    d = c.tmp / "gv" / "00000"
    (d / "samples").mkdir(parents=True)
    (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    png(d / "samples" / "0000.png", size=32)
    truncate(d / "samples" / "0000.png", 0.5)
    prompts = c.file("heldout.jsonl", (json.dumps(meta) + "\n").encode())
    return ["eval-geneval", "--images", str(c.tmp / "gv"), "--prompts", str(prompts), "--detector", "shapes",
            "--allow-incomplete"]  # fmt: skip


def _tokenize(c: Ctx, *extra: str) -> list[str]:
    return [
        "tokenize",
        str(c.file("a.tar", b"")),
        "--tokenizer",
        str(c.tmp / "vae"),
        "--out",
        str(c.tmp / "lat"),
        *extra,
    ]


def _encode(c: Ctx, *extra: str) -> list[str]:
    return ["encode-text", str(c.file("p.txt", b"a red square\n")), "--encoder", str(c.tmp / "t5"),
            "--out", str(c.tmp / "txt"), *extra]  # fmt: skip


# (id, argv builder, text the one error line must hold[, exit code])
CASES = [
    # train
    ("train-out-is-file", lambda c: c.train("--out", str(c.file())), "is a file, not a folder"),
    ("train-out-under-file", lambda c: c.train("--out", str(c.file() / "run")), "is a file, not a folder"),
    ("train-out-unwritable", lambda c: c.train("--out", "/sys/fluid-test-run"), "cannot write in /sys"),
    ("train-lr-nan", lambda c: c.train("--set", "train.lr=nan"), "train.lr must be a finite number"),
    ("train-lr-negative", lambda c: c.train("--set", "train.lr=-1"), "train.lr must be positive"),
    ("train-beta2-one", lambda c: c.train("--set", "train.beta2=1.0"), "train.beta2 must be below 1"),
    (
        "train-cfg-dropout-2",
        lambda c: c.train("--set", "train.cfg_dropout=2.0"),
        "train.cfg_dropout must be between",
    ),
    (
        "train-decay-fraction-1.5",
        lambda c: c.train("--set", "train.decay_fraction=1.5"),
        "train.decay_fraction must be between 0.0 and 1.0",
    ),
    ("train-batch-0", lambda c: c.train("--batch-size", "0"), "--batch-size must be at least 1"),
    ("train-steps-0", lambda c: c.train("--steps", "0"), "--steps must be at least 1"),
    (
        "train-log-every-0",
        lambda c: c.train("--set", "train.log_every=0"),
        "train.log_every must be at least 1",
    ),
    ("train-set-malformed", lambda c: c.train("--set", "lr"), "must look like section.key=value"),
    ("train-unknown-key", lambda c: c.train("--set", "train.lrr=1"), "unknown recipe key train.lrr"),
    ("train-recipe-missing", lambda c: c.train("--recipe", str(c.tmp / "no.toml")), "--recipe"),
    ("train-size-unknown", lambda c: c.train("--size", "huge"), "unknown size 'huge'"),
    ("train-data-missing", lambda c: c.train(latents=c.tmp / "nowhere"), "does not exist"),
    ("train-wrong-kind", lambda c: c.train(latents=c.synth / "text"), "holds text-embeddings"),
    ("train-no-manifest", _no_manifest, "incomplete: no manifest.json"),
    ("train-flipped-byte", _flipped, "shard-00001.safetensors (records 16-31 of 48"),
    ("train-manifest-500", _manifest_500, "says 500 records but its shards list 48"),
    ("train-all-truncated", _all_truncated, "no usable records: 3 shard(s) were skipped"),
    ("train-data-is-file", lambda c: c.train(latents=c.file()), "is a file; pass the artifact's folder"),
    # bench
    (
        "bench-train-batch-0",
        lambda c: ["bench", "train", "--size", "tiny", "--batch-size", "0"],
        "--batch-size must be at least 1",
    ),
    (
        "bench-train-steps-0",
        lambda c: ["bench", "train", "--size", "tiny", "--steps", "0"],
        "--steps must be at least 1",
    ),
    (
        "bench-sample-cfg-inf",
        lambda c: ["bench", "sample", "--size", "tiny", "--cfg", "inf"],
        "--cfg must be a finite number",
    ),
    ("bench-train-size", lambda c: ["bench", "train", "--size", "nope"], "unknown size 'nope'"),
    (
        "bench-sample-head-tokens",
        lambda c: ["bench", "sample", "--size", "tiny", "--head-tokens", "some"],
        "--head-tokens 'some' is not one of chosen, all",
    ),
    # sample
    ("sample-out-is-file", lambda c: c.sample(out=c.file()), "is a file, not a folder"),
    (
        "sample-out-unwritable",
        lambda c: c.sample(out=Path("/sys/fluid-test-samples")),
        "cannot write in /sys",
    ),
    ("sample-cfg-nan", lambda c: c.sample("--cfg", "nan"), "--cfg must be a finite number"),
    ("sample-steps-0", lambda c: c.sample("--steps", "0"), "--steps must be at least 1"),
    ("sample-weights", lambda c: c.sample("--weights", "best"), "--weights 'best' is not one of ema, model"),
    (
        "sample-prompts-missing",
        lambda c: ["sample", str(c.run), "--prompts", str(c.tmp / "p.txt"), "--out", str(c.tmp / "s")],
        "--prompts",
    ),
    (
        "sample-no-prompts",
        lambda c: ["sample", str(c.run), "--out", str(c.tmp / "s")],
        "give --prompts FILE or at least one --prompt",
    ),
    ("sample-not-a-run", lambda c: c.sample(ckpt=c.tmp), "neither a run directory nor a checkpoint"),
    ("sample-weights-truncated", _ckpt_truncated, "model.safetensors is damaged or not a safetensors file"),
    ("sample-weights-junk", _ckpt_junk, "ema.safetensors is damaged or not a safetensors file"),
    ("sample-weights-pickle", _ckpt_pickle, "model.safetensors is damaged or not a safetensors file"),
    ("sample-config-broken", _ckpt_config, "config.json is not valid JSON"),
    ("sample-text-embeddings-flipped", _sample_text_flipped, "shard-00000.safetensors (records 0-15 of 48"),
    # tokenize / encode-text
    (
        "tokenize-resolution-negative",
        lambda c: _tokenize(c, "--resolution", "-64"),
        "--resolution must be at least 8",
    ),
    ("tokenize-batch-0", lambda c: _tokenize(c, "--batch-size", "0"), "--batch-size must be at least 1"),
    (
        "tokenize-out-is-file",
        lambda c: ["tokenize", "x.tar", "--tokenizer", "t", "--out", str(c.file())],
        "is a file, not a folder",
    ),
    (
        "tokenize-images-dir-missing",
        lambda c: _tokenize(c, "--images-dir", str(c.tmp / "imgs")),
        "--images-dir",
    ),
    ("tokenize-tokenizer-missing", lambda c: _tokenize(c), "vae"),
    (
        "encode-text-max-length-0",
        lambda c: _encode(c, "--max-length", "0"),
        "--max-length must be at least 1",
    ),
    (
        "encode-text-records-per-shard-0",
        lambda c: _encode(c, "--records-per-shard", "0"),
        "--records-per-shard must be at least 1",
    ),
    ("encode-text-encoder-missing", lambda c: _encode(c), "t5"),
    # fit-scaling
    (
        "fit-scaling-inf-loss",
        lambda c: _scaling_table(c, "inf"),
        "column val_loss is 'inf', not a finite number",
    ),
    (
        "fit-scaling-ci",
        lambda c: ["fit-scaling", "--table", str(c.file("t.csv")), "--out", str(c.tmp / "f"), "--ci", "2"],
        "--ci must be between 0 and 1",
    ),
    (
        "fit-scaling-out-is-file",
        lambda c: _scaling_table(c, "0.4")[:3] + ["--out", str(c.file())],
        "is a file, not a folder",
    ),
    (
        "fit-scaling-table-missing",
        lambda c: ["fit-scaling", "--table", str(c.tmp / "t.csv"), "--out", str(c.tmp / "f")],
        "--table",
    ),
    (
        "fit-scaling-table-not-utf8",
        lambda c: [
            "fit-scaling",
            "--table",
            str(c.file("t.csv", b"variant,size,params,val_loss\n\xff,a,1e8,0.5\n")),
            "--out",
            str(c.tmp / "f"),
        ],  # fmt: skip
        "is not UTF-8 text",
    ),
    # eval-fid / eval-geneval / coco-30k
    (
        "eval-fid-batch-0",
        lambda c: ["eval-fid", str(c.tmp), "--batch-size", "0"],
        "--batch-size must be at least 1",
    ),
    ("eval-fid-ref-not-npz", _fid_ref_not_npz, "is not a stats file"),
    ("eval-fid-truncated-png", _fid_truncated_png, "1.png is not a readable image"),
    ("eval-fid-images-missing", lambda c: ["eval-fid", str(c.tmp / "none"), "--ref", "x.npz"], "IMAGES"),
    (
        "eval-fid-out-is-dir",
        lambda c: ["eval-fid", str(c.tmp), "--ref", str(c.file("r.npz")), "--out", str(c.tmp)],
        "is a folder; pass a file path",
    ),
    (
        "eval-geneval-include-string",
        lambda c: _geneval_prompts(c, "dog"),
        "`include` must be a list of objects",
    ),
    (
        "eval-geneval-include-numbers",
        lambda c: _geneval_prompts(c, [1, 2]),
        "`include` must be a list of objects",
    ),
    ("eval-geneval-truncated-png", _geneval_folder_truncated, "0000.png is not a readable image"),
    (
        "eval-geneval-cfg-nan",
        lambda c: ["eval-geneval", str(c.run), "--cfg", "nan"],
        "--cfg must be a finite number",
    ),
    (
        "coco-30k-count-0",
        lambda c: ["coco-30k", str(c.file("c.json", b"{}")), "--out", str(c.tmp / "l.jsonl"), "--count", "0"],
        "--count must be at least 1",
    ),
    (
        "coco-30k-out-is-dir",
        lambda c: ["coco-30k", str(c.file("c.json", b"{}")), "--out", str(c.tmp)],
        "is a folder",
    ),
    # demo / shapes-data / train-tokenizer / synth-data / verify
    ("demo-size", lambda c: ["demo", "--size", "nope", "--out", str(c.tmp / "demo")], "unknown size 'nope'"),
    (
        "demo-minutes-0",
        lambda c: ["demo", "--minutes", "0", "--out", str(c.tmp / "demo")],
        "--minutes must be positive",
    ),
    (
        "shapes-data-records-0",
        lambda c: ["shapes-data", str(c.tmp / "sd"), "--records", "0"],
        "--records must be at least 1",
    ),
    (
        "shapes-data-size",
        lambda c: ["shapes-data", str(c.tmp / "sd"), "--size", "48"],
        "--size 48 is not supported",
    ),
    (
        "train-tokenizer-kind",
        lambda c: ["train-tokenizer", "gan", "--out", str(c.tmp / "tok")],
        "unknown tokenizer kind 'gan'",
    ),
    (
        "train-tokenizer-lr-nan",
        lambda c: ["train-tokenizer", "vae", "--out", str(c.tmp / "tok"), "--lr", "nan"],
        "--lr must be a finite number",
    ),
    (
        "shapes-data-grid-at-32",
        lambda c: ["shapes-data", str(c.tmp / "sd"), "--size", "32"],
        "--layout grid needs --size 64",
    ),
    (
        "shapes-data-layout",
        lambda c: ["shapes-data", str(c.tmp / "sd"), "--layout", "spiral"],
        "--layout 'spiral' is not supported",
    ),
    (
        "train-tokenizer-patch-negative",
        lambda c: ["train-tokenizer", "vae", "--out", str(c.tmp / "tok"), "--patch", "-16"],
        "--patch must be at least 0",
    ),
    (
        "train-tokenizer-layout",
        lambda c: ["train-tokenizer", "vae", "--out", str(c.tmp / "tok"), "--layout", "spiral"],
        "--layout must be grid or free",
    ),
    ("synth-data-out-is-file", lambda c: ["synth-data", str(c.file())], "OUT"),
    (
        "verify-flipped-byte",
        lambda c: (
            flip_byte(c.copy(c.synth / "text") / "shard-00002.safetensors"),
            ["verify", str(c.tmp / "text")],
        )[1],
        "shard-00002.safetensors (records 32-47 of 48",
    ),
    ("verify-not-an-artifact", lambda c: ["verify", str(c.tmp)], "incomplete: no manifest.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(case, shared, tmp_path, capsys):
    _, build, expect, *code = case
    ctx = Ctx(shared, tmp_path)
    argv = build(ctx)
    before = snapshot(shared, tmp_path)
    exit_code, out, err = run_main(argv, capsys)
    assert_one_error_line(exit_code, err, expect, *code)
    after = snapshot(shared, tmp_path)
    assert {k: after.get(k) for k in before} == before  # earlier outputs untouched
    assert out == ""  # stdout carries data only


def test_the_table_covers_every_command():
    from fluid_cli.cli import app, bench_app

    names = {c.name for c in app.registered_commands} - {"models"}  # `models` takes no paths or numbers
    names |= {f"bench {c.name}" for c in bench_app.registered_commands}
    covered = {c[0] for c in CASES}
    missing = [n for n in names if not any(cid.startswith(n.replace(" ", "-")) for cid in covered)]
    assert not missing and len(CASES) >= 40, missing


# ---- what a rerun repairs, what is recorded, the safety net -----------------------------------------


def test_flipped_byte_is_refused_before_any_step_and_verification_is_recorded(
    shared, tmp_path, capsys, monkeypatch
):
    from fluid_cli import artifact, shards

    ctx = Ctx(shared, tmp_path)
    art = ctx.copy(shared / "synth" / "latents", "lat")
    (art / shards.VERIFIED).unlink(missing_ok=True)
    calls = []
    real = artifact.sha256_of
    monkeypatch.setattr(artifact, "sha256_of", lambda p: calls.append(p.name) or real(p))
    code, _, err = run_main(ctx.train("--steps", "1", latents=art), capsys)
    assert code == 0, err
    assert sorted(calls) == [f"shard-0000{i}.safetensors" for i in range(3)]  # hashed once each
    calls.clear()
    code, _, err = run_main(ctx.train("--steps", "1", latents=art) + ["--out", str(tmp_path / "r2")], capsys)
    assert code == 0 and calls == [], err  # recorded: not hashed again
    flip_byte(art / "shard-00002.safetensors")
    code, _, err = run_main(ctx.train("--steps", "1", latents=art) + ["--out", str(tmp_path / "r3")], capsys)
    line = assert_one_error_line(code, err, "shard-00002.safetensors (records 32-47 of 48")
    assert "re-run the stage that wrote it" in line
    assert not (tmp_path / "r3" / "metrics.jsonl").exists()  # refused before the first step


def test_tokenize_rerun_redoes_just_the_damaged_shards(tiny_wds_tars, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["tokenize", *map(str, tiny_wds_tars), "--tokenizer", str(tiny_vae_dir), "--out", str(out),
            "--resolution", "32", "--records-per-shard", "4", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert run_main(argv, capsys)[0] == 0
    files = sorted(out.glob("shard-*"))
    good = {p.name: p.read_bytes() for p in files}
    manifest = (out / "manifest.json").read_bytes()
    truncate(out / "shard-00000.safetensors")
    flip_byte(out / "shard-00002.safetensors")
    untouched = (out / "shard-00001.safetensors").stat().st_mtime_ns
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert "shard-00000.safetensors" in err and "shard-00002.safetensors" in err and "made again" in err
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))} == good
    assert (out / "manifest.json").read_bytes() == manifest
    assert (out / "shard-00001.safetensors").stat().st_mtime_ns == untouched  # not redone
    code, _, err = run_main(argv, capsys)
    assert code == 0 and "nothing to do" in err


def test_a_failed_start_does_not_block_the_corrected_rerun(tiny_wds_tars, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "lat"
    broken = tmp_path / "vae-broken"
    shutil.copytree(tiny_vae_dir, broken)
    for w in broken.glob("*.safetensors"):  # a tokenizer whose config reads but whose weights do not
        truncate(w)
    base = ["tokenize", *map(str, tiny_wds_tars), "--out", str(out), "--resolution", "32", "--device", "cpu"]
    code, _, err = run_main([*base, "--tokenizer", str(broken)], capsys)
    assert (
        code == 1
        and "Traceback" not in err
        and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    )
    assert not list(out.glob("shard-*"))
    code, _, err = run_main([*base, "--tokenizer", str(tiny_vae_dir)], capsys)
    assert code == 0, err


def test_encode_text_skips_non_utf8_prompt_lines_as_sample_does(tiny_t5_dir, tmp_path, capsys):
    from fluid_cli.artifact import Artifact

    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a red cube\n\xff\xfe broken \xe9\nthree yellow flowers\n")
    code, _, err = run_main(["encode-text", str(prompts), "--encoder", str(tiny_t5_dir), "--out",
                             str(tmp_path / "t"), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0 and "Traceback" not in err, err
    art = Artifact.open(tmp_path / "t")
    assert art.num_records == 2 and "UTF-8" in json.dumps(art.manifest["skipped"])


def test_sample_rerun_remakes_a_truncated_and_a_changed_png(shared, tmp_path, capsys):
    ctx = Ctx(shared, tmp_path)
    argv = ctx.sample("--prompt", PROMPTS[1])
    assert run_main(argv, capsys)[0] == 0
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    good = {p.name: p.read_bytes() for p in pngs}
    truncate(pngs[0])
    flip_byte(pngs[1], len(good[pngs[1].name]) // 2)  # inside the pixel data: its chunk CRC fails
    code, out, err = run_main([*argv, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["written"] == 2 and err.count("is damaged") == 2
    rows = [json.loads(x) for x in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert {r["steps_used"] for r in rows} == {2}
    assert {p.name: p.read_bytes() for p in pngs} == good


def test_fit_scaling_nan_row_is_named_and_json_is_strict(tmp_path, capsys):
    ctx = Ctx(tmp_path, tmp_path)
    rows = "variant,size,params,val_loss\n" + "".join(
        f"rand-cont,s{i},{p},{v}\n"
        for i, (p, v) in enumerate([(1e8, 0.5), (3e8, 0.45), (1e9, 0.41), (3e9, "nan")])
    )
    code, out, err = run_main(["fit-scaling", "--table", str(ctx.file("t.csv", rows.encode())), "--out",
                               str(tmp_path / "fit"), "--json", "--n-boot", "50"], capsys)  # fmt: skip
    assert code == 0, err
    assert "row 4: column val_loss is NaN" in err
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_the_safety_net_is_one_line_and_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    import fluid_cli.synthetic as synthetic

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(synthetic, "write_synthetic", boom)
    code, _, err = run_main(["synth-data", str(tmp_path / "s")], capsys)
    line = assert_one_error_line(code, err, "synth-data failed: RuntimeError: something unexpected")
    assert "FLUID_DEBUG=1" in line
    monkeypatch.setenv("FLUID_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["synth-data", str(tmp_path / "s")])


def test_permission_errors_name_the_path(tmp_path, capsys, monkeypatch):
    import fluid_cli.synthetic as synthetic

    def denied(out, **k):
        raise PermissionError(13, "Permission denied", str(out / "latents"))

    monkeypatch.setattr(synthetic, "write_synthetic", denied)
    code, _, err = run_main(["synth-data", str(tmp_path / "s")], capsys)
    assert_one_error_line(code, err, f"synth-data failed on {tmp_path / 's' / 'latents'}: Permission denied")


def test_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import signal

    import fluid_cli.synthetic as synthetic

    monkeypatch.setattr(synthetic, "write_synthetic", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run as a background job, as CI may be
    code, _, err = run_main(["synth-data", str(tmp_path / "s")], capsys)
    assert_one_error_line(code, err, "synth-data interrupted; rerun the same command", exit_code=130)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_steps_used_is_what_the_sampler_does():
    from types import SimpleNamespace

    from fluid_cli.sampling import SampleSettings
    from fluid_cli.sampling.run import steps_used

    rand = SimpleNamespace(random_order=True, num_tokens=16)
    assert steps_used(rand, SampleSettings(steps=99)) == 16  # K > L: the rest predict nothing
    assert steps_used(rand, SampleSettings(steps=8)) == 8
    assert steps_used(SimpleNamespace(random_order=False, num_tokens=16), SampleSettings(steps=99)) == 16


def test_a_truncated_reference_image_is_named(tmp_path):
    import numpy as np
    from PIL import Image

    from fluid_cli.errors import FluidError
    from fluid_cli.eval import fid as F

    files = []
    for i in range(3):
        p = tmp_path / f"{i:03d}.jpg"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(p, quality=95)
        files.append(p)
    truncate(files[1], 0.5)

    def stats(x):  # a tiny stand-in for Inception: per-channel means
        import torch

        return torch.as_tensor(x, dtype=torch.float32).mean(dim=(2, 3))

    with pytest.raises(FluidError, match="001.jpg is not a readable image"):
        F.image_features(files, stats, "clean", "cpu")


def test_a_read_only_artifact_keeps_its_verification_record_in_the_cache(shared, tmp_path, monkeypatch):
    from fluid_cli import shards
    from fluid_cli.artifact import Artifact

    art = Artifact.open(Ctx(shared, tmp_path).copy(shared / "synth" / "codes"))
    (art.root / shards.VERIFIED).unlink(missing_ok=True)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the record's folder would go\n")
    cache = tmp_path / "cache" / "rec.json"
    monkeypatch.setattr(Artifact, "_record_paths", lambda self: [blocked / "verified.json", cache])
    assert art.verify() == ([], sum(s["bytes"] for s in art.manifest["shards"]))
    assert cache.is_file() and art.verify() == ([], 0)  # recorded in the cache: not hashed again
