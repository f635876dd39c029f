"""Shared test fixtures: tiny pretrained models saved with save_pretrained, and tiny webdataset tars.

Nothing is downloaded: every model is built from a config with random weights (seeded), and the T5
tokenizer is a SentencePiece unigram model trained on the fixture captions (by the same code as
`fluid train-tokenizer t5`). The hub is off for
the whole session (HF_HUB_OFFLINE=1), so a test can never wait on the network.

- tiny_vae_dir: AutoencoderKL, 3 down blocks (4x downsampling): 32px -> 4x8x8 latents
- tiny_vq_dir:  VQModel, 4 down blocks (8x): 32px -> 4x4 codes, vocabulary 64
- tiny_t5_dir:  T5EncoderModel (d_model 32) + T5Tokenizer, as AutoTokenizer loads it (shapes' builder)
- tiny_wds_tars: two webdataset tars of 6 image + caption records each (jpg/png/webp, txt/json)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One intra-op thread, here and in every subprocess a test starts: tiny models run faster on one
# thread and a busy 2-core machine does not thrash. Not for exactness: floats computed in another
# process or at another batch shape are compared with tolerances (kernels may sum in another order
# on another CPU), bits only where the same computation runs twice in one process.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside, the caller's count restored after (tiny models on a shared 2-core
    machine: ~50x faster than two contending threads). Session fixtures that train use it: they are
    set up before the module-scoped `_one_thread` below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every test module starts on one intra-op thread, whatever an earlier module's command set."""
    with one_thread():
        yield


def run_fluid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m fluid_cli ARGS` in a subprocess from the repository root, as a user runs it: this
    session's environment (hub off, one thread) plus `env`, without FLUID_DEBUG (so errors are one
    line, not a traceback)."""
    full = {**os.environ, **(env or {})}
    full.pop("FLUID_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "fluid_cli", *args], capture_output=True, text=True, env=full, cwd=ROOT
    )


# ---- synthetic artifacts and tiny training runs --------------------------------------------------
@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """`fluid synth-data` artifacts (latents, codes, text) of 96 records, seed 0, in shards of 16:
    shared by every test that trains; tests that damage them copy them first."""
    from fluid_cli.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, records=96, seed=0, per_shard=16)
    return out


# a metrics row every step and a 2-step warmup, for runs of a few steps
SHORT_RUN = ("--set", "train.log_every=1", "--set", "train.warmup_steps=2")


def tiny_train_args(
    synth: Path,
    out: Path,
    *extra: str,
    variant: str | None = None,
    image_tokens: Path | None = None,
    text: Path | None = None,
) -> list[str]:
    """The `fluid train` command line for the tiny model on CPU at batch 8, on `synth`'s latents and
    text unless told otherwise, then `extra` (which may override any of it)."""
    return [
        "train",
        *(["--variant", variant] if variant else []),
        "--size",
        "tiny",
        "--image-tokens",
        str(image_tokens or synth / "latents"),
        "--text",
        str(text or synth / "text"),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--set",
        'runtime.device="cpu"',
        *extra,
    ]


def train_tiny(synth: Path, out: Path, variant: str = "rand-cont", **train) -> Path:
    """A tiny run trained in-process on CPU at batch 8, without validation, checkpointed at its last
    step; `train` sets [train] keys (steps among them). Returns the run folder."""
    from fluid_cli.config import resolve
    from fluid_cli.train import loop, state

    tokens = synth / ("latents" if variant.endswith("cont") else "codes")
    flags = {
        "model": {"variant": variant, "size": "tiny"},
        "data": {"image_tokens": str(tokens), "text": str(synth / "text"), "val_records": 0},
        "train": {"batch_size": 8, "val_every": 0, "ckpt_every": train["steps"], **train},
        "runtime": {"device": "cpu"},
    }
    with one_thread():
        return loop.run(state.build(resolve(None, flags, []), out, False))


TINY_RESOLUTION = 32  # the resolution the tiny image tokenizers are meant for

CAPTIONS = [
    "a red cube on a wooden table",
    "two cats sleeping on a blue sofa",
    "a photo of a dog running in the park",
    "an astronaut riding a horse on the moon",
    "a bowl of fresh fruit on a kitchen counter",
    "a green tree under a clear blue sky",
    "a small boat on a calm lake at sunset",
    "three yellow flowers in a glass vase",
    "a city street at night with bright lights",
    "a plate of pasta with tomato sauce",
    "a snowy mountain behind a quiet village",
    "a black and white photo of an old car",
]


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> bytes:
    """A deterministic smooth random RGB image (width, height) encoded as `fmt`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0  # reproducible bytes
            tf.addfile(ti, io.BytesIO(data))
    return path


def wds_members(start: int, n: int) -> list[tuple[str, bytes]]:
    """n webdataset samples: keys 000000000..., image formats and caption kinds rotate."""
    out = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][i % 3]
        out.append((f"{key}.{ext}", image_bytes(i, fmt=fmt)))
        caption = CAPTIONS[i % len(CAPTIONS)]
        if i % 2:
            out.append((f"{key}.json", json.dumps({"caption": caption, "url": "x"}).encode()))
        else:
            out.append((f"{key}.txt", caption.encode()))
    return out


@pytest.fixture(scope="session")
def tiny_wds_tars(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("wds")
    return [write_tar(d / f"{t:05d}.tar", wds_members(t * 6, 6)) for t in range(2)]


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    d = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vq_dir(tmp_path_factory) -> Path:
    import torch
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = VQModel(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=64,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    d = tmp_path_factory.mktemp("tiny-vq")
    vq.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """`fluid train-tokenizer t5`'s builder at d_model 32, its tokenizer trained on CAPTIONS. A
    vocabulary of 64 leaves most captions in pieces of a few letters (10 to 29 tokens), so an
    encode-text at --max-length 20 truncates some captions and not others."""
    from fluid_cli.shapes.text_encoder import build_text_encoder

    d = tmp_path_factory.mktemp("tiny-t5")
    build_text_encoder(d, width=32, layers=2, heads=2, seed=0, vocab_size=64, captions=CAPTIONS)
    return d
