"""`fluid shapes-data`: the embedded shapes dataset, drawn procedurally, no downloads.

Each record is a small RGB image of 1-4 coloured shapes on grey with a caption in one of GenEval's
six tags and that caption's GenEval metadata, so the demo runs the same stages as real data:
webdataset tars (`{key}.png`, `{key}.txt` caption, `{key}.json` metadata + ground-truth objects)
for `fluid tokenize` / `fluid encode-text`, and a held-out prompt set in GenEval's schema
(`heldout.jsonl`, and `heldout.txt` for `fluid sample`) whose captions never occur in training.

Record i of seed s is drawn from its own numpy Generator seeded with (s, i), so a record does not
depend on --records or on how the work is split, and the same seed gives identical bytes (tar
members carry fixed metadata, PNGs are encoded the same way).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from fluid_cli.errors import FluidError
from fluid_cli.shapes.prompts import TAGS, Spec, caption, heldout_specs, metadata, train_specs
from fluid_cli.shapes.render import COLOURS, Box, Obj, mask_box, relation_offsets, render, shape_mask

log = logging.getLogger(__name__)

SIZES = (32, 64)
LAYOUTS = ("grid", "free")
GRID = 4  # grid layout: the image is GRID x GRID cells, one per image token of the 16-token tokenizers
CELL_FILL = 0.75  # grid layout: an object spans 3/4 of its cell, centred (12 px of a 16 px cell)
RECORDS_PER_TAR = 1000
# position records keep the asked relation well past GenEval's 0.5 and the other axis well below
# it, so the relation stays unambiguous even if a decoder blurs a box edge by a pixel
POSITION_MARGIN = (0.65, 0.35)


def _gap(a: Box, b: Box) -> int:
    """Pixels of background between two boxes (Chebyshev): negative if they overlap."""
    return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])


def _size_range(n: int, px: int) -> tuple[int, int]:
    # objects of 30-42% of the image side alone or in pairs, 28-34% when 3-4 must fit (at 32 px:
    # 10-13 and 9-11 px; below 9 px a circle and a square differ in too few pixels)
    lo, hi = (0.30, 0.42) if n <= 2 else (0.28, 0.34)
    return round(lo * px), round(hi * px)


@lru_cache(maxsize=1024)
def _extent(shape: str, s: int) -> Box:
    return mask_box(shape_mask(shape, s, s))


def _clear_relation(a: Box, b: Box, relation: str) -> bool:
    dx, dy = relation_offsets(a, b)
    main, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[
        relation
    ]
    return main >= POSITION_MARGIN[0] and abs(other) <= POSITION_MARGIN[1]


def place(
    rng: np.random.Generator, shapes: list[str], px: int, relation: str | None = None
) -> list[tuple[Box, Box]]:
    """(drawing box, tight box) per shape: inside the image, at least px/12 pixels apart (so a
    blurry decoder does not merge them), and for position shapes[0] clearly `relation` of
    shapes[1]. The tight box (the mask's pixels; a triangle's apex row can be empty) is what a
    detector sees, so the position rule is checked on it."""
    lo, hi = _size_range(len(shapes), px)
    gap = max(2, round(px / 12))
    for _ in range(200):
        boxes: list[tuple[Box, Box]] = []
        for shape in shapes:
            for _ in range(50):
                s = int(rng.integers(lo, hi + 1))
                x0, y0 = (int(v) for v in rng.integers(1, px - s, size=2))
                ex = _extent(shape, s)
                tight = (x0 + ex[0], y0 + ex[1], x0 + ex[2], y0 + ex[3])
                if all(_gap(tight, t) >= gap for _, t in boxes):
                    boxes.append(((x0, y0, x0 + s, y0 + s), tight))
                    break
            else:
                break
        if len(boxes) == len(shapes) and (
            relation is None or _clear_relation(boxes[0][1], boxes[1][1], relation)
        ):
            return boxes
    raise RuntimeError(f"could not place {shapes} in {px}px")  # does not happen at 32 or 64 px


def place_grid(
    rng: np.random.Generator, shapes: list[str], px: int, relation: str | None = None
) -> list[tuple[Box, Box]]:
    """The grid layout: each shape alone in its own cell of a GRID x GRID grid, drawn CELL_FILL of
    the cell wide at its centre, cells drawn at random (for position: until shapes[0] is clearly
    `relation` of shapes[1]). Cells match the 16-token tokenizers' patches, so every image token is
    either plain background or one whole object, and takes one of few values (docs/shapes.md)."""
    cell = px // GRID
    s = round(CELL_FILL * cell)
    pad = (cell - s) // 2
    for _ in range(200):
        cells = rng.choice(GRID * GRID, size=len(shapes), replace=False)
        boxes = []
        for shape, c in zip(shapes, cells, strict=True):
            x0, y0 = int(c % GRID) * cell + pad, int(c // GRID) * cell + pad
            ex = _extent(shape, s)
            boxes.append(((x0, y0, x0 + s, y0 + s), (x0 + ex[0], y0 + ex[1], x0 + ex[2], y0 + ex[3])))
        if relation is None or _clear_relation(boxes[0][1], boxes[1][1], relation):
            return boxes
    raise RuntimeError(f"could not place {shapes} in {px}px")  # does not happen: 16 cells, <= 4 shapes


def draw(spec: Spec, rng: np.random.Generator, px: int, layout: str = "grid") -> tuple[np.ndarray, list[Obj]]:
    """An image that satisfies `spec` exactly: named colours as asked, the others at random.
    Returns the objects with their tight boxes."""
    shapes = list(spec.shapes) * spec.count if spec.tag == "counting" else list(spec.shapes)
    boxes = (place_grid if layout == "grid" else place)(rng, shapes, px, spec.relation)
    named = spec.colours or (None,) * len(shapes)
    colours = [c or COLOURS[int(rng.integers(len(COLOURS)))] for c in named]
    drawn = [Obj(sh, c, d) for sh, c, (d, _) in zip(shapes, colours, boxes, strict=True)]
    return render(drawn, px), [Obj(o.shape, o.colour, t) for o, (_, t) in zip(drawn, boxes, strict=True)]


def record(seed: int, index: int, px: int, layout: str = "grid") -> tuple[np.ndarray, str, dict]:
    """(image, caption, metadata with ground-truth objects) of record `index`."""
    rng = np.random.default_rng([seed, index])
    tag = TAGS[int(rng.integers(len(TAGS)))]
    options = train_specs(tag)
    spec = options[int(rng.integers(len(options)))]
    img, objects = draw(spec, rng, px, layout)
    meta = {**metadata(spec), "objects": [o.to_json() for o in objects], "size": px}
    return img, caption(spec), meta


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed mtime/owner: same records -> same tar bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, seed: int, indices: range, px: int, layout: str = "grid") -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in indices:
            img, cap, meta = record(seed, i, px, layout)
            key = f"shapes-{i:08d}"
            _add(tf, f"{key}.png", png_bytes(img))
            _add(tf, f"{key}.txt", cap.encode())
            _add(tf, f"{key}.json", json.dumps(meta).encode())
    tmp.replace(path)


def write_heldout(out: Path) -> None:
    """heldout.jsonl (GenEval metadata, one prompt a line) and heldout.txt (the prompts)."""
    specs = heldout_specs()
    lines = [json.dumps(metadata(s)) for s in specs]
    (out / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    (out / "heldout.txt").write_text("\n".join(caption(s) for s in specs) + "\n")


def check_world(size: int, layout: str) -> None:
    """FluidError unless (size, layout) is a shapes world that exists."""
    if size not in SIZES:
        raise FluidError(f"--size {size} is not supported; valid: {', '.join(map(str, SIZES))}")
    if layout not in LAYOUTS:
        raise FluidError(f"--layout {layout!r} is not supported; valid: {', '.join(LAYOUTS)}")
    if layout == "grid" and size < 64:
        raise FluidError(
            f"--layout grid needs --size 64 (at {size} px a cell of {size // GRID} px is too small to "
            "tell a circle from a square); use --size 64 or --layout free"
        )


def write_shapes(
    out: Path, records: int = 20000, seed: int = 0, size: int = 64, layout: str = "grid"
) -> Path:
    """The `fluid shapes-data` stage: OUT/train/shapes-NNNNN.tar, OUT/heldout.{jsonl,txt} and
    OUT/info.json (written last: its presence means the dataset is complete)."""
    check_world(size, layout)
    if records < 1:
        raise FluidError(f"--records must be at least 1 (got {records})")
    out = Path(out)
    info = {
        "kind": "shapes",
        "records": records,
        "seed": seed,
        "size": size,
        "layout": layout,
        "tags": list(TAGS),
    }
    info_path = out / "info.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if {k: old.get(k) for k in info} == info:
            log.info("shapes dataset %s is already complete", out)
            return out
        raise FluidError(f"{out} holds a shapes dataset made with other settings; use another dir")
    (out / "train").mkdir(parents=True, exist_ok=True)
    tars = []
    for n, start in enumerate(range(0, records, RECORDS_PER_TAR)):
        path = out / "train" / f"shapes-{n:05d}.tar"
        write_tar(path, seed, range(start, min(start + RECORDS_PER_TAR, records)), size, layout)
        tars.append(path.name)
        log.info("wrote %s", path)
    write_heldout(out)
    info["tars"] = tars
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return out


def contact_sheet(images: list[np.ndarray], cols: int = 8, scale: int = 2, pad: int = 2) -> np.ndarray:
    """A grid of equally sized uint8 images (upscaled by `scale`, white gaps), for looking at."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    sheet = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        sheet[y : y + h * scale, x : x + w * scale] = img.repeat(scale, 0).repeat(scale, 1)
    return sheet
