"""Reading and verifying an artifact (the format: shards.py): `Artifact` gives random access to its
records and checks shards against the manifest (sha256 recorded in verified.json); `verify_paths`
is `fluid verify`. Used by `fluid train`, `fluid sample --text-embeddings` and the data stages' reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fluid_cli.errors import FluidError
from fluid_cli.shards import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SAFETENSORS_DTYPES,
    VERIFIED,
    FieldSpec,
    atomic_write_bytes,
    sha256_of,
)


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
                if DTYPES[spec.dtype] != SAFETENSORS_DTYPES.get(dtype):
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
            if st.st_size != s["bytes"] or sha256_of(path) != s["sha256"]:
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
