"""The paper's FID-30K caption set: N images of MS-COCO 2014 train, one caption each, drawn with a
seed by a rule that depends on nothing but the seed and the ids (no library RNG, no file order).

    fluid coco-30k captions_train2014.json --out coco30k.jsonl [--count 30000 --seed 0]
writes
    coco30k.jsonl       {"index", "image_id", "file_name", "caption"} per line (the reference list)
    coco30k.txt         the captions, one a line, same order (`fluid sample --prompts`)
    coco30k.coco.json   a COCO captions JSON of just these images and captions (`fluid tokenize` /
                        `fluid encode-text` -> validation shards keyed coco-{image_id})
    coco30k.meta.json   count, seed, rule and the sha256 of the source and of each file above
Rule (version "fluid-coco-v1"): images with a non-empty caption are ranked by
sha256(f"fluid-coco-v1:{seed}:{image_id}"), the first N are kept in that order; each image's caption
is number int(sha256(f"fluid-coco-v1:{seed}:{image_id}:caption")[:16], 16) % n_captions of its
captions sorted by annotation id. Captions are whitespace-normalised (one line each).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fluid_cli.errors import FluidError
from fluid_cli.eval.fid import sha256_file

RULE = "fluid-coco-v1"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_coco(path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(image id -> file name, image id -> non-empty captions in annotation-id order)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: int(a["id"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FluidError(
            f"{path} is not a COCO captions JSON (images with id/file_name, annotations with id/image_id/caption): {e}"
        ) from None
    captions: dict[int, list[str]] = {}
    for a in anns:
        text = " ".join(str(a.get("caption") or "").split())  # one line: prompts files are line based
        if text and int(a["image_id"]) in images:
            captions.setdefault(int(a["image_id"]), []).append(text)
    return images, captions


def draw(images: dict[int, str], captions: dict[int, list[str]], count: int, seed: int) -> list[dict]:
    """The seeded draw: `count` rows {"index", "image_id", "file_name", "caption"}, one per image."""
    if count < 1:
        raise FluidError(f"--count must be at least 1, got {count}")
    eligible = sorted(captions)
    if count > len(eligible):
        raise FluidError(
            f"--count {count} is more than the {len(eligible)} images with a caption; lower --count"
        )
    ranked = sorted(eligible, key=lambda i: (_digest(f"{RULE}:{seed}:{i}"), i))[:count]
    rows = []
    for index, image_id in enumerate(ranked):
        caps = captions[image_id]
        pick = int(_digest(f"{RULE}:{seed}:{image_id}:caption")[:16], 16) % len(caps)
        rows.append(
            {"index": index, "image_id": image_id, "file_name": images[image_id], "caption": caps[pick]}
        )
    return rows


def _write(path: Path, text: str) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return _digest(text)


def sibling(out: Path, suffix: str) -> Path:
    """coco30k.jsonl -> coco30k<suffix> (the other files of the set)."""
    out = Path(out)
    return out.with_name((out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name) + suffix)


def write_coco_prompts(captions_json: Path, out: Path, count: int = 30000, seed: int = 0) -> dict:
    """Draw and write the list and its companions; returns the meta record (also written)."""
    out = Path(out)
    if not out.name.endswith(".jsonl"):
        raise FluidError(
            f"--out {out} must end with .jsonl (the list; .txt, .coco.json and .meta.json go beside it)"
        )
    images, captions = read_coco(captions_json)
    rows = draw(images, captions, count, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    list_sha = _write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    txt_sha = _write(sibling(out, ".txt"), "".join(r["caption"] + "\n" for r in rows))
    subset = {  # a COCO captions JSON: `fluid tokenize` keys its records coco-{image_id}
        "images": [{"id": r["image_id"], "file_name": r["file_name"]} for r in rows],
        "annotations": [{"id": r["index"], "image_id": r["image_id"], "caption": r["caption"]} for r in rows],
    }
    coco_sha = _write(sibling(out, ".coco.json"), json.dumps(subset, ensure_ascii=False) + "\n")
    meta = {"rule": RULE, "count": count, "seed": seed, "source": str(captions_json),
            "source_sha256": sha256_file(Path(captions_json)), "list": str(out), "list_sha256": list_sha,
            "txt_sha256": txt_sha, "coco_json_sha256": coco_sha}  # fmt: skip
    _write(sibling(out, ".meta.json"), json.dumps(meta, indent=1) + "\n")
    return meta


def read_list(path: Path) -> tuple[list[dict], str]:
    """(rows in index order, sha256 of the file) of a list written by write_coco_prompts."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        ok = all({"index", "file_name", "caption"} <= set(r) for r in rows)
    except (OSError, ValueError, TypeError) as e:
        raise FluidError(f"{path} is not a reference list (JSONL from `fluid coco-30k`): {e}") from None
    if not rows or not ok or [r["index"] for r in rows] != list(range(len(rows))):
        raise FluidError(
            f"{path} is not a reference list: needs index 0..N-1, file_name and caption on every line"
        )
    return rows, _digest(text)
