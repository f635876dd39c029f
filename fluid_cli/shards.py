"""Sharded safetensors artifacts: the hand-off format between `tokenize`, `encode-text` and `train`.

An artifact is a directory:
    manifest.json                 written last: its presence means the artifact is complete
    shard-00000.safetensors       one tensor per field, records stacked on dim 0; ragged fields are
                                  packed along dim 0 with a `<field>.lengths` tensor beside them
    shard-00000.jsonl             optional, one JSON row per record (e.g. the caption text)
    <extras>                      named side files (e.g. the empty caption's embedding)
Each shard's safetensors metadata holds its record keys and the records it skipped, so a re-run can
skip complete shards and rebuild the manifest without redoing them. Every file is written to a temp
name and renamed. See docs/data-format.md for the full specification.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fluid_cli import __version__
from fluid_cli.errors import FluidError

FORMAT = "fluid-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # shards whose sha256 matched the manifest, with the size and mtime then
KINDS = ("image-latents", "image-codes", "text-embeddings")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
}


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class FieldSpec:
    """One field of every record: dtype and per-record shape. Ragged: dim 0 varies (stored packed)."""

    dtype: str
    shape: list[int]
    ragged: bool = False


@dataclass
class ShardInfo:
    file: str
    records: int
    sha256: str
    bytes: int
    keys: list[str] = field(default_factory=list, repr=False)
    skipped: list[dict] = field(default_factory=list, repr=False)


@dataclass
class Manifest:
    kind: str
    fields: dict[str, FieldSpec]
    attrs: dict[str, Any]
    shards: list[ShardInfo]
    producer: dict[str, Any]
    skipped: list[dict] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_records(self) -> int:
        return sum(s.records for s in self.shards)

    def to_json(self) -> dict:
        shards = [{k: v for k, v in asdict(s).items() if k not in ("keys", "skipped")} for s in self.shards]
        return {
            "format": self.format,
            "format_version": self.format_version,
            "kind": self.kind,
            "num_records": self.num_records,
            "fields": {k: asdict(v) for k, v in self.fields.items()},
            "attrs": self.attrs,
            "shards": shards,
            "producer": {"fluid_version": __version__, **self.producer},
            "skipped": self.skipped,
            "extras": self.extras,
        }


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to `path.tmp-<pid>`, fsync, rename: a reader never sees a half-written file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pack(
    name: str, spec: FieldSpec, values: torch.Tensor | Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    dtype = _DTYPES[spec.dtype]
    if spec.ragged:
        lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.int64)
        packed = torch.cat([v.to(dtype) for v in values]) if len(values) else torch.zeros(0, *spec.shape[1:])
        return {name: packed.to(dtype).contiguous(), f"{name}.lengths": lengths}
    t = values if isinstance(values, torch.Tensor) else torch.stack(list(values))
    if list(t.shape[1:]) != list(spec.shape):
        raise ValueError(f"field {name}: records of shape {list(t.shape[1:])}, spec says {spec.shape}")
    return {name: t.to(dtype).contiguous()}


def _canonical_header(data: bytes) -> bytes:
    """safetensors writes its metadata map in a random order per process; sort it, so the same
    records always give the same bytes (and checksums: a resumed run equals an uninterrupted one)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def write_shard(
    out_dir: Path,
    index: int,
    keys: list[str],
    values: dict[str, torch.Tensor | Sequence[torch.Tensor]],
    fields: dict[str, FieldSpec],
    rows: list[dict] | None = None,
    skipped: list[dict] | None = None,
) -> ShardInfo:
    """Write one complete shard (jsonl first, safetensors last, each atomically) and return its info."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in fields.items():
        tensors.update(_pack(name, spec, values[name]))
    path = out_dir / shard_name(index)
    if rows is not None:
        lines = "".join(
            json.dumps({"key": k, **r}, ensure_ascii=False) + "\n" for k, r in zip(keys, rows, strict=True)
        )
        atomic_write_bytes(path.with_suffix(".jsonl"), lines.encode())
    meta = {"keys": json.dumps(keys), "skipped": json.dumps(skipped or []), "format": FORMAT}
    atomic_write_bytes(path, _canonical_header(save(tensors, metadata=meta)))
    return ShardInfo(
        path.name, len(keys), _sha256(path), path.stat().st_size, list(keys), list(skipped or [])
    )


def read_shard_info(path: Path, with_checksum: bool = True) -> ShardInfo:
    """Info of a complete shard on disk (used to resume: complete shards are not redone)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    keys = json.loads(meta.get("keys", "[]"))
    skipped = json.loads(meta.get("skipped", "[]"))
    sha = _sha256(path) if with_checksum else ""
    return ShardInfo(path.name, len(keys), sha, path.stat().st_size, keys, skipped)


def clean_temp_files(out_dir: Path) -> int:
    """Remove temp files left by a killed writer; returns how many."""
    n = 0
    for p in Path(out_dir).glob("*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = Path(out_dir) / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())
    return path


class Artifact:
    """A complete artifact opened for reading: the manifest plus lazy, random access to records."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.attrs: dict[str, Any] = manifest["attrs"]
        self.fields = {k: FieldSpec(**v) for k, v in manifest["fields"].items()}
        self.shard_files: list[str] = [s["file"] for s in manifest["shards"]]
        self._handles: dict[int, Any] = {}
        self._offsets: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def open(
        cls, root: str | Path, expect_kind: str | tuple[str, ...] | None = None, what: str = "artifact"
    ) -> Artifact:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise FluidError(
                f"{what} {root} is a file; pass the artifact's folder (the one holding {MANIFEST})"
            )
        if not root.is_dir():
            raise FluidError(f"{what} {root} does not exist; make it with the stage that writes it")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise FluidError(
                f"{what} {root} is incomplete: no {MANIFEST} (the stage that writes it did not finish); "
                "re-run that stage to complete it"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise FluidError(f"{mpath} is not valid JSON ({e}); re-run the stage that wrote it") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise FluidError(
                f"{mpath} is not a {FORMAT} v{FORMAT_VERSION} manifest "
                f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
            )
        kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
        if kinds and manifest["kind"] not in kinds:
            raise FluidError(f"{what} {root} holds {manifest['kind']}, expected {' or '.join(kinds)}")
        for s in manifest["shards"]:
            if not (root / s["file"]).is_file():
                raise FluidError(f"{what} {root}: shard {s['file']} listed in the manifest is missing")
        listed = sum(int(s["records"]) for s in manifest["shards"])
        if int(manifest.get("num_records", listed)) != listed:
            raise FluidError(
                f"{mpath} says {manifest['num_records']} records but its shards list {listed}: the manifest "
                "was edited or damaged; re-run the stage that wrote it with the same --out"
            )
        return cls(root, manifest)

    @property
    def num_records(self) -> int:
        return int(self.manifest["num_records"])

    def extra_path(self, name: str) -> Path | None:
        rel = self.manifest.get("extras", {}).get(name)
        return self.root / rel if rel else None

    def shard_keys(self, shard: int) -> list[str]:
        return json.loads(self._handle(shard).metadata()["keys"])

    def index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row), read from shard metadata only (no tensor data is loaded)."""
        out: dict[str, tuple[int, int]] = {}
        for i in range(len(self.shard_files)):
            for row, key in enumerate(self.shard_keys(i)):
                out[key] = (i, row)
        return out

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(str(self.root / self.shard_files[shard]), framework="pt")
            self._handles[shard] = h
        return h

    def get(self, shard: int, row: int) -> dict[str, torch.Tensor]:
        """One record's fields, read by slicing the memory-mapped shard (ragged: only its rows)."""
        h = self._handle(shard)
        out: dict[str, torch.Tensor] = {}
        for name, spec in self.fields.items():
            if spec.ragged:
                offs = self._offsets.get((shard, name))
                if offs is None:
                    lengths = h.get_tensor(f"{name}.lengths")
                    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
                    self._offsets[(shard, name)] = offs
                a, b = int(offs[row]), int(offs[row + 1])
                out[name] = h.get_slice(name)[a:b]
            else:
                out[name] = h.get_slice(name)[row : row + 1][0]
        return out

    def check_shard(self, shard: int) -> str | None:
        """Why shard `shard` cannot be read as the manifest describes it, or None when it can.

        Catches truncated or corrupt files (the header does not parse or points past the end) and
        tensors of the wrong shape or dtype (e.g. a shard made by another tokenizer)."""
        info = self.manifest["shards"][shard]
        try:
            h = self._handle(shard)
            n = len(self.shard_keys(shard))
            for name, spec in self.fields.items():
                shape = h.get_slice(name).get_shape()
                if spec.ragged:
                    lengths = h.get_tensor(f"{name}.lengths")
                    if (
                        len(lengths) != n
                        or int(lengths.sum()) != shape[0]
                        or list(shape[1:]) != list(spec.shape[1:])
                    ):
                        return f"field {name}: packed shape {shape} does not match {n} records of [-1, {spec.shape[1:]}]"
                elif list(shape) != [n, *spec.shape]:
                    return f"field {name}: shape {shape}, expected [{n}, {', '.join(map(str, spec.shape))}]"
                dtype = h.get_slice(name).get_dtype()
                if _DTYPES[spec.dtype] != _SAFETENSORS_DTYPES.get(dtype):
                    return f"field {name}: dtype {dtype}, expected {spec.dtype}"
            # a truncated file: its header may parse, but the last tensor's bytes are missing
            first = next(iter(self.fields))
            h.get_slice(first)[-1:] if n else None
        except Exception as e:  # safetensors raises its own error types for damaged files
            self._handles.pop(shard, None)
            return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        if n != info["records"]:
            return f"holds {n} records, the manifest says {info['records']}"
        size = (self.root / info["file"]).stat().st_size
        if size != info["bytes"]:
            return f"is {size} bytes, the manifest says {info['bytes']}"
        return None

    def describe_shard(self, shard: int) -> str:
        """'ROOT/shard-00003.safetensors (records 48-63 of 96, keys a..b)' for messages."""
        counts = [int(s["records"]) for s in self.manifest["shards"]]
        first = sum(counts[:shard])
        where = f"records {first}-{first + counts[shard] - 1} of {sum(counts)}"
        try:
            keys = self.shard_keys(shard)
            if keys:
                where += f", keys {keys[0]}..{keys[-1]}"
        except Exception:  # an unreadable header: the record numbers must do
            self._handles.pop(shard, None)
        return f"{self.root / self.shard_files[shard]} ({where})"

    def rows(self, shard: int) -> list[dict]:
        """The shard's JSONL rows (e.g. captions), or [] when the stage wrote none."""
        p = (self.root / self.shard_files[shard]).with_suffix(".jsonl")
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # ---- sha256 verification, recorded so it runs once per shard version -----------------------

    def _record_paths(self) -> list[Path]:
        """Where the verification record lives: in the artifact, or (read-only artifact) in the cache."""
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluid" / "verified"
        return [self.root / VERIFIED, cache / f"{key}.json"]

    def _read_record(self) -> dict[str, dict]:
        for path in self._record_paths():
            try:
                return dict(json.loads(path.read_text())["shards"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return {}

    def _write_record(self, record: dict[str, dict]) -> None:
        data = (
            json.dumps({"format": "fluid-verified", "shards": record}, indent=1, sort_keys=True) + "\n"
        ).encode()
        for path in self._record_paths():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
                return
            except OSError:
                continue  # a read-only artifact: the cache; neither: verified again next time

    def verify(self, force: bool = False, skip: set[int] | frozenset = frozenset()) -> tuple[list[int], int]:
        """sha256 of every shard (except `skip`) against the manifest: (indices of shards that differ,
        bytes hashed). A shard recorded as verified with the same manifest sha256, size and mtime is
        not hashed again unless `force` (`fluid verify`); matching shards are recorded."""
        record = self._read_record()
        bad, hashed, changed = [], 0, False
        for i, s in enumerate(self.manifest["shards"]):
            if i in skip:
                continue
            path = self.root / s["file"]
            st = path.stat()
            state = {"sha256": s["sha256"], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if not force and record.get(s["file"]) == state:
                continue
            hashed += st.st_size
            if st.st_size != s["bytes"] or _sha256(path) != s["sha256"]:
                bad.append(i)
                changed |= record.pop(s["file"], None) is not None
            else:
                changed |= record.get(s["file"]) != state
                record[s["file"]] = state
        if changed:
            self._write_record(record)
        return bad, hashed

    def problems(self, force: bool = False) -> tuple[dict[int, str], int]:
        """Every shard checked against the manifest: header, shapes, record count and size
        (`check_shard`), then sha256 (`verify`: recorded, or always with `force`). Returns
        ({shard index: why it is damaged}, bytes hashed)."""
        bad = {i: why for i in range(len(self.shard_files)) if (why := self.check_shard(i)) is not None}
        sha_bad, hashed = self.verify(force=force, skip=set(bad))
        for i in sha_bad:
            bad[i] = "its sha256 differs from the manifest (bytes changed after it was written)"
        return bad, hashed

    def __getstate__(self):  # DataLoader workers re-open the memory maps themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def verify_paths(paths: list[Path]) -> list[dict]:
    """`fluid verify`: every shard's header, size and sha256 (always recomputed) against the
    manifest; matching shards are recorded, so `fluid train` does not hash them again. A folder that
    holds artifacts (e.g. `fluid synth-data OUT`) stands for each of them. FluidError on any damage."""
    import time

    roots: list[Path] = []
    for p in map(Path, paths):
        inner = (
            sorted(d for d in p.iterdir() if (d / MANIFEST).is_file())
            if p.is_dir() and not (p / MANIFEST).exists()
            else []
        )
        roots += inner or [p]
    results, damaged = [], []
    for root in roots:
        art = Artifact.open(root)
        t0 = time.perf_counter()
        bad, hashed = art.problems(force=True)
        secs = time.perf_counter() - t0
        damaged += [f"{art.describe_shard(i)}: {why}" for i, why in sorted(bad.items())]
        results.append({"artifact": str(root), "kind": art.kind, "shards": len(art.shard_files),
                        "records": art.num_records, "bytes": hashed, "seconds": round(secs, 3),
                        "mb_per_s": round(hashed / 1e6 / secs, 1) if secs > 0 else None,
                        "damaged": len(bad)})  # fmt: skip
    if damaged:
        more = f" (and {len(damaged) - 1} more shard(s))" if len(damaged) > 1 else ""
        raise FluidError(
            f"{damaged[0]}{more}; re-run the stage that wrote it with the same --out: it redoes just the damaged shards"
        )
    return results
