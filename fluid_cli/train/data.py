"""Training data: image-token and text-embedding artifacts joined by record key, in a resumable order.

The order is a pure function of (seed, global sample position): position p falls in epoch p // N and
takes record perm_epoch[p % N], with perm_epoch = randperm(N) seeded by (seed, epoch). Rank r of W
takes positions [r*B/W, (r+1)*B/W) of each global batch of B, so no sample is seen twice in an epoch,
and resuming at step s needs only s. Each sample's random key is hash(seed, position), so masks and
noise do not depend on the batch split or the number of processes. Used by `fluid train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fluid_cli.artifact import Artifact
from fluid_cli.errors import FluidError
from fluid_cli.models import keyed_random as kr

log = logging.getLogger(__name__)
IMAGE_KINDS = ("image-latents", "image-codes")


@dataclass(frozen=True)
class DataShapes:
    """What the model needs to know about the data (read from the manifests)."""

    tokens: str  # "continuous" | "discrete"
    token_grid: tuple[int, int]
    latent_channels: int
    vocab_size: int
    text_dim: int
    text_len: int


class PairedRecords(torch.utils.data.Dataset):
    """Records present in both artifacts, in the image artifact's order."""

    def __init__(
        self, image_dir: str, text_dir: str, what: str = "training", max_bad_records: int | None = None
    ):
        self.images = Artifact.open(image_dir, IMAGE_KINDS, what=f"{what} image tokens")
        self.text = Artifact.open(text_dir, "text-embeddings", what=f"{what} text embeddings")
        self.skipped: list[dict] = []  # {"artifact", "shard", "key"?, "records", "reason"}
        image_index = self._usable_index(self.images)
        text_index = self._usable_index(self.text)
        self.pairs: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
        missing = 0
        for key, loc in image_index.items():
            t = text_index.get(key)
            if t is None:
                missing += 1
                continue
            self.pairs.append((key, loc, t))
        bad = sum(s["records"] for s in self.skipped)
        if max_bad_records is not None and bad > max_bad_records:
            raise FluidError(
                f"{bad} records are unreadable or malformed (more than data.max_bad_records={max_bad_records}); "
                f"first: {self.skipped[0]['artifact']} {self.skipped[0]['shard']}: {self.skipped[0]['reason']}. "
                "Re-run the stage that wrote them, or raise the threshold"
            )
        if not self.pairs and self.skipped:
            s = self.skipped[0]
            raise FluidError(
                f"no usable records: {len(self.skipped)} shard(s) were skipped as unreadable or malformed, "
                f"first {s['artifact']}/{s['shard']}: {s['reason']}; re-run the stage that wrote it with the same --out "
                "(it redoes just the damaged shards)"
            )
        if not self.pairs:
            raise FluidError(
                f"no record key of {image_dir} is in {text_dir}: the two artifacts do not describe the same "
                "records (make both from the same source with `fluid tokenize` and `fluid encode-text`)"
            )
        if missing:
            log.warning("%d image records have no text embedding and are not used", missing)
        self.shapes = self._shapes()
        self.flip = bool(self.images.attrs.get("flip", False))

    def _usable_index(self, art: Artifact) -> dict[str, tuple[int, int]]:
        """key -> (shard, row) over the shards that pass `check_shard`; the others are logged and
        skipped whole (deterministically: the same shards are skipped on every run and process)."""
        index: dict[str, tuple[int, int]] = {}
        unreadable: set[int] = set()
        for i, name in enumerate(art.shard_files):
            reason = art.check_shard(i)
            if reason is not None:
                n = int(art.manifest["shards"][i]["records"])
                self.skipped.append(
                    {"artifact": str(art.root), "shard": name, "records": n, "reason": reason}
                )
                log.warning("skipping %s/%s (%d records): %s", art.root, name, n, reason)
                unreadable.add(i)
                continue
            for row, key in enumerate(art.shard_keys(i)):
                index[key] = (i, row)
        verify_artifact(art, skip=unreadable)
        return index

    def _shapes(self) -> DataShapes:
        a, t = self.images.attrs, self.text.attrs
        if self.images.kind == "image-latents":
            H, W = a["latent_size"]
            patch = 2
            if H % patch or W % patch:
                raise FluidError(
                    f"latents of {H}x{W} cannot be grouped 2x2 into tokens; use an even latent size"
                )
            return DataShapes(
                "continuous",
                (H // patch, W // patch),
                int(a["latent_channels"]),
                0,
                int(t["text_dim"]),
                int(t["max_length"]),
            )
        h, w = a["codes_shape"]
        return DataShapes(
            "discrete", (h, w), 0, int(a["vocab_size"]), int(t["text_dim"]), int(t["max_length"])
        )

    def latent_abs_max(self, records: int = 1024) -> float | None:
        """max |mean| + 3 std over (up to) the first `records` latents: the range the sampler may
        clamp predicted tokens to (`fluid sample --clip-x0`). None for VQ codes."""
        if self.images.kind != "image-latents":
            return None
        hi = 0.0
        for _, (shard, row), _ in self.pairs[:records]:
            r = self.images.get(shard, row)
            hi = max(hi, float((r["mean"].float().abs() + 3 * r["std"].float()).max()))
        return round(hi, 4)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        key, (ishard, irow), (tshard, trow) = self.pairs[i]
        rec = self.images.get(ishard, irow)
        rec["hidden"] = self.text.get(tshard, trow)["hidden"]
        return rec


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(kr.make_keys(seed, epoch)))
    return torch.randperm(n, generator=g)


class PositionSampler:
    """Yields, for each step from `start_step`, this rank's list of (record index, global position)."""

    def __init__(
        self, indices: list[int], batch_size: int, rank: int, world: int, seed: int, start_step: int = 0
    ):
        if batch_size % world:
            raise FluidError(f"global batch {batch_size} is not divisible by the {world} processes")
        self.indices, self.B, self.rank, self.world = indices, batch_size, rank, world
        self.seed, self.step = seed, start_step
        self._perm: tuple[int, torch.Tensor] | None = None
        self._index = torch.tensor(indices, dtype=torch.int64)

    def records_at(self, first: int, count: int) -> torch.Tensor:
        """Record indices (count,) int64 at positions [first, first + count): one slice of each
        epoch's permutation (a batch may straddle two epochs), no per-position Python work."""
        n, out, pos, end = len(self.indices), [], first, first + count
        while pos < end:
            epoch = pos // n
            stop = min(end, (epoch + 1) * n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, epoch_permutation(n, self.seed, epoch))
            out.append(self._index[self._perm[1][pos % n : pos % n + (stop - pos)]])
            pos = stop
        return torch.cat(out)

    def record_at(self, pos: int) -> int:
        return int(self.records_at(pos, 1)[0])

    def positions(self, step: int) -> list[int]:
        per = self.B // self.world
        first = step * self.B + self.rank * per
        return list(range(first, first + per))

    def __iter__(self):
        while True:
            pos = self.positions(self.step)
            yield list(zip(self.records_at(pos[0], len(pos)).tolist(), pos, strict=True))
            self.step += 1


def collate(records: list[dict[str, torch.Tensor]], text_len: int) -> dict[str, torch.Tensor]:
    """Stack image fields; pad text states to the static length `text_len` with a mask."""
    out = {k: torch.stack([r[k] for r in records]) for k in records[0] if k != "hidden"}
    D = records[0]["hidden"].shape[-1]
    text = torch.zeros(len(records), text_len, D, dtype=torch.float32)
    mask = torch.zeros(len(records), text_len, dtype=torch.bool)
    for i, r in enumerate(records):
        n = min(r["hidden"].shape[0], text_len)
        text[i, :n] = r["hidden"][:n].float()
        mask[i, :n] = True
    out["text"], out["text_mask"] = text, mask
    return out


class IndexedBatches(torch.utils.data.Dataset):
    """Wraps the records so a DataLoader can fetch one whole batch per item (workers prefetch)."""

    def __init__(self, records: PairedRecords, text_len: int):
        self.records, self.text_len = records, text_len

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, batch: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        out = collate([self.records[i] for i, _ in batch], self.text_len)
        out["positions"] = torch.tensor([p for _, p in batch], dtype=torch.int64)
        return out


def verify_artifact(art: Artifact, skip: set[int] | frozenset = frozenset()) -> None:
    """sha256 of the shards against the manifest, the first time they are used (recorded in the
    artifact, see Artifact.verify). A shard that reads but whose bytes changed would train silently on
    wrong data: it is refused, by name and record range, before any step."""
    import time

    t0 = time.perf_counter()
    bad, hashed = art.verify(skip=skip)
    if hashed:
        secs = time.perf_counter() - t0
        log.info("checked sha256 of %.1f MB of %s in %.1f s (recorded: not repeated while the shards are unchanged)",
                 hashed / 1e6, art.root, secs)  # fmt: skip
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise FluidError(
            f"{art.describe_shard(bad[0])}{more} does not match the sha256 in its manifest: its bytes changed "
            "after it was written, so its records cannot be trusted; re-run the stage that wrote it with the "
            f"same --out (it redoes just the damaged shards), then `fluid verify {art.root}`"
        )
