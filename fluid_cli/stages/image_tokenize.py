"""`fluid tokenize`: images -> the tokens `fluid train` reads, as sharded safetensors.

A diffusers AutoencoderKL gives kind "image-latents": the posterior's mean and std (times the VAE's
scaling_factor, after subtracting its shift_factor from the mean), stored in float16, for the image
and its horizontal flip (as MAR caches both, so training can sample latents and augment). A
diffusers VQModel gives kind "image-codes": int32 code indices of shape (h, w), also flipped.
Images are center-cropped and resized as in ADM/MAR, then mapped to [-1, 1].
See docs/data-format.md for the fields and attrs.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fluid_cli.errors import FluidError
from fluid_cli.settings import TokenizeSettings
from fluid_cli.shards import FieldSpec, Manifest, ShardInfo
from fluid_cli.stages import pretrained as pt
from fluid_cli.stages.sharding import ShardOutput
from fluid_cli.stages.sources import Record, problem

log = logging.getLogger(__name__)


def open_rgb(data: bytes):
    """Decode image bytes fully (a truncated file fails here, not later) into an RGB PIL image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def check_image(data: bytes) -> str | None:
    """None if the bytes decode to an image, else a reason that is the same on every run."""
    try:
        open_rgb(data)
    except Exception as e:  # PIL raises many types for bad data
        return image_error(e)
    return None


def image_error(e: Exception) -> str:
    # drop object addresses so that the manifest of a re-run is byte-identical
    return "corrupt image: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(e) or type(e).__name__)


def center_crop_arr(img, size: int) -> np.ndarray:
    """ADM/MAR preprocessing: box-halve while >= 2x, bicubic-resize the short side, center crop."""
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


def _prepare(data: bytes, size: int) -> np.ndarray | str:
    try:
        return center_crop_arr(open_rgb(data), size)
    except Exception as e:  # PIL raises many types for bad data: the record is skipped, not the run
        return image_error(e)


def to_model_input(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def latent_grid(config: dict, resolution: int) -> tuple[int, int]:
    """The encoder halves the size in every down block but the last."""
    factor = 2 ** (len(config.get("down_block_types") or config.get("block_out_channels")) - 1)
    if resolution % factor:
        raise FluidError(
            f"--resolution {resolution} is not a multiple of the tokenizer's downsampling {factor}"
        )
    return resolution // factor, resolution // factor


class ImageTokenizerStage:
    """Encodes shards of image records with one pretrained tokenizer (loaded on first use)."""

    def __init__(
        self, p: pt.Pretrained, resolution: int, flip: bool, batch_size: int, device: str, model=None
    ):
        self.p, self.resolution, self.flip, self.batch_size = p, resolution, flip, max(1, batch_size)
        self.device_name, self._model = device, model
        h, w = latent_grid(p.config, resolution)
        cfg = p.config
        names = ["mean", "std"] if p.class_name == "AutoencoderKL" else ["codes"]
        names += [f"{n}_flip" for n in names] if flip else []
        if p.patch and resolution % p.patch:
            raise FluidError(
                f"--resolution {resolution} is not a multiple of the tokenizer's cell size {p.patch} "
                "(it encodes each cell alone); pass a multiple of it"
            )
        common = {"resolution": resolution, "flip": flip, "tokenizer": p.id, "tokenizer_class": p.class_name}
        if p.patch:
            common["tokenizer_patch"] = p.patch
        if p.class_name == "AutoencoderKL":
            self.kind = "image-latents"
            c = int(cfg.get("latent_channels", 4))
            self.fields = {n: FieldSpec("float16", [c, h, w]) for n in names}
            self.scaling = float(cfg.get("scaling_factor") or 1.0)
            self.shift = cfg.get("shift_factor")
            self.attrs = {
                "latent_channels": c,
                "latent_size": [h, w],
                "scaling_factor": self.scaling,
                "shift_factor": self.shift,
                **common,
            }
        else:
            self.kind = "image-codes"
            self.fields = {n: FieldSpec("int32", [h, w]) for n in names}
            self.attrs = {"vocab_size": int(cfg["num_vq_embeddings"]), "codes_shape": [h, w], **common}
        self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def prepare(self) -> None:
        self.model  # noqa: B018 (loads it)

    @property
    def model(self):
        if self._model is None:
            self.device = pt.pick_device(self.device_name)
            self._model = pt.load_image_tokenizer(self.p).to(self.device)
            log.info("loaded %s %s on %s", self.p.class_name, self.p.id, self.device)
        return self._model

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> the record fields, batched, on the CPU."""
        model = self.model
        dev = next(model.parameters()).device
        b = x.shape[0]
        xs = torch.cat([x, x.flip(-1)]) if self.flip else x
        xs = xs.to(dev)
        if self.kind == "image-latents":
            post = model.encode(xs).latent_dist
            mean = post.mean - self.shift if self.shift is not None else post.mean
            parts = {"mean": mean * self.scaling, "std": post.std * self.scaling}
        else:
            h = model.encode(xs).latents
            _, _, (_, _, idx) = model.quantize(
                h
            )  # diffusers 0.42: (z_q, loss, (perplexity, encodings, indices))
            parts = {"codes": idx.reshape(xs.shape[0], *self.attrs["codes_shape"]).to(torch.int32)}
        out: dict[str, torch.Tensor] = {}
        for name, t in parts.items():
            t = t.to("cpu", _DTYPE[self.fields[name].dtype])
            out[name] = t[:b]
            if self.flip:
                out[f"{name}_flip"] = t[b:]
        return out

    def _decoded(
        self, items: list[tuple[int, Record]]
    ) -> Iterator[list[tuple[int, Record, np.ndarray | str]]]:
        """Batches of (slot, record, pixels or reason); decoding runs up to two batches ahead in threads."""
        queue: deque[list[tuple[int, Record, Future]]] = deque()
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            queue.append([(i, r, self._pool.submit(_prepare, r.image, self.resolution)) for i, r in chunk])
            if len(queue) > 2:
                yield [(i, r, f.result()) for i, r, f in queue.popleft()]
        while queue:
            yield [(i, r, f.result()) for i, r, f in queue.popleft()]

    def encode_shard(self, records: list[Record], advance: Callable[[int], None]) -> ShardOutput:
        good: list[tuple[int, Record]] = []
        skipped: list[tuple[int, dict]] = []
        for i, r in enumerate(records):
            why = problem(r, need_image=True)
            if why:
                skipped.append((i, r.skipped(why)))
            else:
                good.append((i, r))
        advance(len(skipped))
        keys: list[str] = []
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.fields}
        for batch in self._decoded(good):
            ok = [(r, a) for _, r, a in batch if not isinstance(a, str)]
            skipped += [(i, r.skipped(a)) for i, r, a in batch if isinstance(a, str)]
            if ok:
                for name, t in self.encode(to_model_input([a for _, a in ok])).items():
                    parts[name].append(t)
                keys += [r.key for r, _ in ok]
            advance(len(batch))
        values = {n: torch.cat(ts) if ts else self._empty(n) for n, ts in parts.items()}
        return ShardOutput(keys, values, [s for _, s in sorted(skipped, key=lambda t: t[0])])

    def _empty(self, name: str) -> torch.Tensor:
        spec = self.fields[name]
        return torch.zeros(0, *spec.shape, dtype=_DTYPE[spec.dtype])

    def manifest(
        self, shards: list[ShardInfo], skipped: list[dict], out_dir: Path, producer: dict
    ) -> Manifest:
        return Manifest(self.kind, self.fields, self.attrs, shards, producer, skipped)


_DTYPE = {"float16": torch.float16, "int32": torch.int32}


def run_tokenize(settings: TokenizeSettings) -> bool:
    """The `fluid tokenize` stage. True when the artifact is complete (manifest written)."""
    from fluid_cli.stages.sharding import resolve_split, run_sharded
    from fluid_cli.stages.sources import RecordSource, expand_sources

    t, split = settings, settings.sharding
    rank, world = resolve_split(split.num_shards, split.shard_index)
    files = expand_sources(list(t.sources), allow_prompts=False)
    p = pt.resolve_image_tokenizer(t.tokenizer)
    stage = ImageTokenizerStage(p, t.resolution, t.flip, t.batch_size, t.device)
    recorded = {
        "stage": "tokenize",
        "model_id": t.tokenizer,
        "subfolder": p.subfolder,
        "tokenizer_class": p.class_name,
        "resolution": t.resolution,
        "flip": t.flip,
        "sources": [os.path.abspath(f.path) for f in files],
        "images_dir": os.path.abspath(t.images_dir) if t.images_dir else None,
    }
    source = RecordSource(files, t.images_dir, need_images=True)
    return run_sharded(Path(t.out), source, stage, recorded, split.records_per_shard, rank, world, "images")
