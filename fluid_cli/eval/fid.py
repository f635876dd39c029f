"""FID's parts: the Frechet distance, feature statistics and their .npz files, clean-fid's Inception
found on disk (never downloaded), and features of image files through clean-fid's resize.

The Frechet distance and the stats files need only numpy and scipy; torch and clean-fid are imported
when features are computed. Any `feature_extractor(batch) -> (B, D) tensor` can stand in for
Inception (batch: (B, 3, 299, 299) float in [0, 255] after clean-fid's resize; tests use a tiny one).
The stage that uses these is fid_run.py (`fluid eval-fid`); the protocol is in docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fluid_cli.config import FidMode, choices
from fluid_cli.errors import FluidError

MODES = choices(FidMode)
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's torchscript Inception (clean, legacy_tensorflow)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid weights (legacy_pytorch)
PT_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PT_INCEPTION_FILE
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FeatureExtractor = Callable[[object], object]  # (B, 3, 299, 299) float tensor in [0, 255] -> (B, D)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:  # fmt: skip
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as clean-fid computes it (scipy sqrtm; a tiny
    ridge when the product is singular; a negligible imaginary part is dropped)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FluidError(
            f"feature statistics differ in size ({mu1.shape[0]} vs {mu2.shape[0]}): use the same feature extractor"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FluidError(
                f"Frechet distance: sqrt(S1 S2) has a large imaginary part ({np.abs(covmean.imag).max():.3g})"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64, as clean-fid (np.cov, N - 1)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FluidError(f"FID needs at least 2 images, got {feats.shape[0] if feats.ndim else 0}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """mu, sigma and a JSON `meta` string (no pickled objects), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


def load_stats(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) of a stats .npz; meta is {} for files written elsewhere (mu/sigma only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError, EOFError) as e:
        # numpy's message for a non-archive suggests loading it with pickles: never pass that on
        why = (
            "not a numpy .npz archive"
            if "pickle" in str(e)
            else str(e).splitlines()[0]
            if str(e)
            else type(e).__name__
        )
        raise FluidError(
            f"{path} is not a stats file (.npz with mu and sigma): {why}; give a stats .npz written by "
            "`fluid eval-fid --make-ref` (or clean-fid), or a folder of real images"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FluidError(
            f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit; recompute it with --make-ref"
        )
    return mu, sigma, meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_images(folder: Path) -> list[Path]:
    """PNG/JPEG files directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_sizes(files: list[Path]) -> dict[tuple[int, int], int]:
    """(width, height) -> count. Every image is checked (PIL verify: a PNG's CRCs, ~0.2 ms for
    256 px): a truncated or changed file is named here, not deep inside the feature loader (which
    names the file itself for the damage verify cannot see, e.g. in a JPEG)."""
    from PIL import Image, UnidentifiedImageError

    sizes: dict[tuple[int, int], int] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                size = im.size
                im.verify()
            sizes[size] = sizes.get(size, 0) + 1
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise FluidError(f"{f} is not a readable image ({e}); remove or regenerate it") from None
    return sizes


def _torch_hub_dir() -> Path:
    # torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub"


def inception_path(mode: str, given: Path | None) -> Path:
    """The Inception weights file for `mode`: --inception (a file, or a dir holding the expected
    name), else clean-fid's own cache. Missing: one FluidError line saying where to put it."""
    if mode == "legacy_pytorch":
        name, url, cache = PT_INCEPTION_FILE, PT_INCEPTION_URL, _torch_hub_dir() / "checkpoints"
    else:
        name, url = INCEPTION_FILE, INCEPTION_URL
        cache = Path("./" if platform.system() == "Windows" else "/tmp")  # clean-fid's cache dir
    path = Path(given).expanduser() if given else cache / name
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FluidError(
            f"Inception weights for --mode {mode} not found at {path} (no download is tried): fetch {url} "
            f"where the network is reachable and put it at {cache / name} (clean-fid's cache) or pass --inception FILE"
        )
    return path


def inception_extractor(mode: str, given: Path | None, device) -> tuple[FeatureExtractor, dict]:
    """clean-fid's Inception for `mode`, loaded from a local file only, and its identity."""
    import torch

    path = inception_path(mode, given)
    if mode == "legacy_pytorch":
        from unittest import mock

        from cleanfid import inception_pytorch as ip

        def local(*_a, **_k):  # clean-fid would fetch the URL; hand it the local file instead
            return torch.load(path, map_location="cpu", weights_only=True)

        with mock.patch.object(ip, "load_state_dict_from_url", local):
            model = ip.InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()

        def fn(x):
            return model(x / 255)[0].squeeze(-1).squeeze(-1)
    else:
        import warnings

        with warnings.catch_warnings():  # torch 2.14 calls torchscript deprecated; clean-fid's file is one
            warnings.simplefilter("ignore", FutureWarning)
            base = torch.jit.load(str(path), map_location=device).eval()

        def fn(x):  # as cleanfid.inception_torchscript.InceptionV3W
            if mode == "legacy_tensorflow":  # resizes inside the network
                return base(x, return_features=True).view(x.shape[0], 2048)
            return base.layers.forward((x - 128) / 128).view(x.shape[0], 2048)

    ident = {"name": f"inception-v3 ({path.name})", "path": str(path), "sha256": sha256_file(path)}
    return torch.no_grad()(fn), ident


def resolve_device(name: str):
    """The device choice of every stage (backend.resolve_device: auto = xla, cuda, mps or cpu)."""
    import os

    from fluid_cli.backend import resolve_device as _resolve

    return _resolve(name, int(os.environ.get("LOCAL_RANK", "0")))


def image_features(files: list[Path], extractor: FeatureExtractor, mode: str, device, batch_size: int = 32,
                   workers: int = 0, desc: str = "") -> np.ndarray:  # fmt: skip
    """(N, D) features of `files` through clean-fid's loader and resize for `mode`."""
    import torch
    from cleanfid.fid import get_files_features

    def model(x):
        with torch.no_grad():
            return torch.as_tensor(extractor(x))

    try:
        return get_files_features([str(f) for f in files], model=model, num_workers=workers, batch_size=batch_size,
                                  device=device, mode=mode, description=desc, verbose=sys.stderr.isatty())  # fmt: skip
    except (OSError, SyntaxError, ValueError) as e:  # e.g. a truncated reference JPEG: name it
        bad = first_unreadable(files)
        if bad is None:
            raise
        raise FluidError(f"{bad} is not a readable image ({e}); remove or replace it and rerun") from None


def first_unreadable(files: list[Path]) -> Path | None:
    """The first file that does not decode (searched only after a failure: it decodes everything)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except (OSError, SyntaxError, ValueError):
            return Path(f)
    return None
