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
import tarfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One intra-op thread, here and in every subprocess a test starts: tiny models run faster on one
# thread and a busy 2-core machine does not thrash. Not for exactness: floats computed in another
# process or at another batch shape are compared with tolerances (kernels may sum in another order
# on another CPU), bits only where the same computation runs twice in one process.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every test module starts on one intra-op thread, whatever an earlier module's command set
    (tiny models on a shared 2-core machine: ~50x faster than two contending threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
