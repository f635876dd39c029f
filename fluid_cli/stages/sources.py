"""Reading what users have into records: webdataset tars, an image folder plus a captions table, an
MS-COCO captions JSON, and (for `encode-text`) a plain prompts file. Used by `fluid tokenize` and
`fluid encode-text`, which see the same keys in the same order for the same sources.

A source yields every record slot in a fixed order, bad ones included (with `error` set), so that the
record -> shard assignment never depends on what could be decoded. Payloads (image bytes, caption)
are read only for the slots a caller asks for, so a resumed or rank-split run skips the I/O of shards
it does not write. Keys: webdataset `__key__` (same rule as webdataset's `base_plus_ext`), a folder
record's file stem, `coco-{image_id}`, `prompt-{line_no:06d}`.
"""

from __future__ import annotations

import csv
import glob
import json
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fluid_cli.errors import FluidError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "prompt")
FILE_KEYS = ("file_name", "filename", "file", "image", "path", "image_path")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


@dataclass
class Record:
    """One record slot. `key` is None only for a slot that names no record (a corrupt tar header)."""

    key: str | None
    source: str
    image: bytes | None = None
    caption: str | None = None
    error: str | None = None

    def skipped(self, reason: str | None = None) -> dict:
        return {"key": self.key, "source": self.source, "reason": reason or self.error}


Loader = Callable[[], tuple[bytes | None, str | None, str | None]]  # -> (image, caption, error)


@dataclass(frozen=True)
class SourceFile:
    kind: str  # "webdataset" | "table" | "coco" | "prompts"
    path: str  # "-" = stdin (prompts only)


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand  # a webdataset dependency: `data/{00000..00099}.tar`

    out: list[str] = []
    for p in braceexpand(pattern):
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise FluidError(f"source pattern {p!r} matches no file")
            out.extend(hits)
        elif not Path(p).exists():
            raise FluidError(f"source {p} does not exist")
        else:
            out.append(p)
    return out


def _kind(path: str) -> str:
    name = path.lower()
    if path == "-" or name.endswith(".txt"):
        return "prompts"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith((".jsonl", ".csv")):
        return "table"
    if name.endswith(".json"):
        return "coco"
    raise FluidError(
        f"source {path}: unknown kind; give webdataset .tar shards, a captions .jsonl/.csv (with "
        "--images-dir), a COCO captions .json, or (encode-text only) a prompts .txt or -"
    )


def expand_sources(patterns: list[str], allow_prompts: bool) -> list[SourceFile]:
    """Paths, globs and brace patterns -> source files in the given order (glob hits sorted)."""
    files: list[SourceFile] = []
    for pattern in patterns:
        for path in ["-"] if pattern == "-" else _expand(pattern):
            kind = _kind(path)
            if kind == "prompts" and not allow_prompts:
                raise FluidError(
                    f"source {path} is a prompts file: it has no images (use it with encode-text)"
                )
            files.append(SourceFile(kind, path))
    if not files:
        raise FluidError("no sources given")
    if len({f.kind == "prompts" for f in files}) > 1:
        raise FluidError(
            "prompts files and image sources cannot be mixed; run encode-text on each separately"
        )
    return files


def _clean_caption(text: object) -> str | None:
    return (text.strip() or None) if isinstance(text, str) else None


def problem(rec: Record, need_image: bool, need_caption: bool = True) -> str | None:
    """Why a loaded record cannot be used by a stage (None: it can)."""
    if rec.error:
        return rec.error
    if need_caption and rec.caption is None:
        return "missing caption"
    if need_image and rec.image is None:
        return "missing image"
    return None


def _json_caption(raw: bytes) -> tuple[str | None, str | None]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"invalid caption json: {e}"
    if isinstance(obj, dict):
        obj = next((obj[k] for k in CAPTION_KEYS if isinstance(obj.get(k), str)), None)
    return _clean_caption(obj), None


# ---- webdataset tars --------------------------------------------------------------------------------


def _zeros(f, start: int, end: int) -> bool:
    f.seek(start)
    while start < end:
        block = f.read(min(1 << 20, end - start))
        if not block or block.count(0) != len(block):
            return not block
        start += len(block)
    return True


def _tar_loader(tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> Loader:
    def load():
        img_ext = next((e for e in IMAGE_EXTS if e in members), None)
        cap_ext = next((e for e in ("txt", "json") if e in members), None)
        if img_ext is None:
            return None, None, f"no image member (found: {', '.join(sorted(members)) or 'nothing'})"
        data: dict[str, bytes] = {}
        for ext in filter(None, (img_ext, cap_ext)):
            try:
                data[ext] = tf.extractfile(members[ext]).read()
            except (tarfile.TarError, OSError) as e:
                return None, None, f"unreadable tar member {members[ext].name}: {e}"
        if cap_ext == "json":
            return (data[img_ext], *_json_caption(data["json"]))
        caption = _clean_caption(data["txt"].decode("utf-8", "replace")) if cap_ext else None
        return data[img_ext], caption, None

    return load


def _tar_entries(path: str) -> Iterator[tuple[str | None, str, Loader]]:
    def fail(msg: str) -> Loader:
        return lambda: (None, None, msg)

    try:
        tf = tarfile.open(path, "r:*", ignore_zeros=True)  # ignore_zeros: step over a corrupt header
    except tarfile.ReadError:
        yield None, path, fail("unreadable tar: not a tar archive (plain, gz, bz2 or xz)")
        return
    except (tarfile.TarError, OSError) as e:
        yield None, path, fail(f"unreadable tar: {e}")
        return
    with tf:
        key, members, expected = None, {}, 0
        while True:
            try:
                ti = tf.next()
            except (tarfile.TarError, OSError) as e:
                if key is not None:
                    yield key, f"{path}:{key}", _tar_loader(tf, members)
                yield (
                    None,
                    f"{path}@{tf.offset}",
                    fail(f"tar ends early (no member header at byte {tf.offset}): {e}"),
                )
                return
            if ti is None:
                break
            if ti.offset != expected and not _zeros(tf.fileobj, expected, ti.offset):
                # tarfile skipped blocks it could not parse: a member was lost; say where
                if key is not None:
                    yield key, f"{path}:{key}", _tar_loader(tf, members)
                key, members = None, {}
                yield (
                    None,
                    f"{path}@{expected}",
                    fail(f"corrupt tar header; bytes {expected}-{ti.offset} unreadable"),
                )
            expected = tf.offset
            name = ti.name
            if not ti.isreg() or _META_RE.match(name) or ("/" not in name and name.startswith("__")):
                continue
            m = _KEY_RE.match(name)
            if not m:
                continue
            prefix, suffix = m.group(1), m.group(2).lower()
            if prefix != key:
                if key is not None:
                    yield key, f"{path}:{key}", _tar_loader(tf, members)
                key, members = prefix, {}
            members[suffix] = ti
        if key is not None:
            yield key, f"{path}:{key}", _tar_loader(tf, members)
        if not path.lower().endswith(("gz", "tgz")) and not _zeros(
            tf.fileobj, expected, Path(path).stat().st_size
        ):
            yield None, f"{path}@{expected}", fail(f"corrupt tar data after byte {expected}")


# ---- image folder + captions table, COCO, prompts ---------------------------------------------------


def _file_loader(image_path: Path | None, caption: str | None, error: str | None = None) -> Loader:
    def load():
        if error:
            return None, caption, error
        try:
            image = image_path.read_bytes() if image_path is not None else None
        except OSError as e:
            return None, caption, f"missing image file: {e.strerror}: {image_path}"
        return image, caption, None

    return load


def _table_rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, newline="", encoding="utf-8") as f:
        if path.lower().endswith(".csv"):
            for i, row in enumerate(csv.DictReader(f), start=2):
                yield i, row, None
            return
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    yield (
                        i,
                        row if isinstance(row, dict) else None,
                        None if isinstance(row, dict) else "not an object",
                    )
                except json.JSONDecodeError as e:
                    yield i, None, f"invalid JSON: {e}"


def _table_entries(path: str, images_dir: Path | None, need_images: bool):
    root = images_dir or Path(path).parent
    for line, row, err in _table_rows(path):
        where = f"{path}:{line}"
        if row is None:
            yield None, where, _file_loader(None, None, f"line {line}: {err}")
            continue
        fkey = next((k for k in FILE_KEYS if row.get(k)), None)
        if fkey is None:
            raise FluidError(
                f"{where}: no file name column (one of {', '.join(FILE_KEYS)}); found {', '.join(row)}"
            )
        name = str(row[fkey])
        caption = next((_clean_caption(row[k]) for k in CAPTION_KEYS if k in row), None)
        yield Path(name).stem, str(root / name), _file_loader(root / name if need_images else None, caption)


def _coco_entries(path: str, images_dir: Path | None, need_images: bool, caption_index: int):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FluidError(
            f"{path} is not a COCO captions JSON (needs 'images' and 'annotations'): {e}"
        ) from None
    if need_images and images_dir is None:
        raise FluidError(
            f"COCO source {path} needs --images-dir (the folder of its images; encode-text: or --no-check-images)"
        )
    captions: dict[int, list[str]] = {}
    for ann in annotations:  # annotation order decides which caption is "first"
        captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    for im in images:
        caps = captions.get(im["id"], [])
        caption = _clean_caption(caps[caption_index]) if caption_index < len(caps) else None
        file = images_dir / im["file_name"] if images_dir is not None else Path(im["file_name"])
        yield f"coco-{im['id']}", str(file), _file_loader(file if need_images else None, caption)


def _prompt_lines(path: str) -> list[str | None]:
    """The lines of a prompts file; a line that is not UTF-8 is None (a skipped record, as
    `fluid sample` skips it) instead of failing the whole file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        pass
    out: list[str | None] = []
    for raw in data.removeprefix(b"\xef\xbb\xbf").splitlines():
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def _prompt_entries(path: str, lines: list[str | None]):
    for no, line in enumerate(lines, start=1):
        if line is None:
            yield (
                f"prompt-{no:06d}",
                f"{path}:{no}",
                _file_loader(None, None, "not valid UTF-8 (save the file as UTF-8)"),
            )
        elif line.strip():  # blank lines are layout, not records; keys keep true line numbers
            yield f"prompt-{no:06d}", f"{path}:{no}", _file_loader(None, line.strip())


class RecordSource:
    """The records of some source files, in order; iterate twice (count, then work) at no extra cost."""

    def __init__(
        self, files: list[SourceFile], images_dir: Path | None, need_images: bool, coco_caption: int = 0
    ):
        self.files, self.images_dir = files, images_dir
        self.need_images, self.coco_caption = need_images, coco_caption
        if images_dir is not None and need_images and not images_dir.is_dir():
            raise FluidError(f"--images-dir {images_dir} is not a directory")
        # stdin can be read once only: keep its lines
        self._stdin = sys.stdin.read().splitlines() if any(f.path == "-" for f in files) else []

    def _entries(self) -> Iterator[tuple[str | None, str, Loader]]:
        for f in self.files:
            try:
                if f.kind == "webdataset":
                    yield from _tar_entries(f.path)
                elif f.kind == "table":
                    yield from _table_entries(f.path, self.images_dir, self.need_images)
                elif f.kind == "coco":
                    yield from _coco_entries(f.path, self.images_dir, self.need_images, self.coco_caption)
                else:
                    lines = self._stdin if f.path == "-" else _prompt_lines(f.path)
                    yield from _prompt_entries("stdin" if f.path == "-" else f.path, lines)
            except UnicodeDecodeError as e:
                raise FluidError(
                    f"{f.path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 and rerun"
                ) from None

    def count(self) -> int:
        return sum(1 for _ in self._entries())

    def records(self, want: Callable[[int], bool]) -> Iterator[tuple[int, Record]]:
        """(slot, record) for every slot; payloads are loaded only where `want(slot)`."""
        seen: set[str] = set()
        for i, (key, source, load) in enumerate(self._entries()):
            dup = key is not None and key in seen
            if key is not None:
                seen.add(key)
            if not want(i):
                yield i, Record(key, source)
            elif dup:
                yield i, Record(key, source, error="duplicate key (an earlier record has it)")
            else:
                image, caption, error = load()  # now: a tar loader needs its tar still open
                yield i, Record(key, source, image, caption, error)
