"""Sharded safetensors artifacts, the format: how `tokenize`, `encode-text` and `synth-data` write
the hand-off between stages (reading and verifying one: artifact.py).

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

FORMAT = "fluid-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = "verified.json"  # shards whose sha256 matched the manifest, with the size and mtime then
KINDS = ("image-latents", "image-codes", "text-embeddings")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
}


SAFETENSORS_DTYPES = {
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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _pack(
    name: str, spec: FieldSpec, values: torch.Tensor | Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    dtype = DTYPES[spec.dtype]
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
        path.name, len(keys), sha256_of(path), path.stat().st_size, list(keys), list(skipped or [])
    )


def read_shard_info(path: Path, with_checksum: bool = True) -> ShardInfo:
    """Info of a complete shard on disk (used to resume: complete shards are not redone)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    keys = json.loads(meta.get("keys", "[]"))
    skipped = json.loads(meta.get("skipped", "[]"))
    sha = sha256_of(path) if with_checksum else ""
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
