"""An exact rule-based detector for the shapes world: pixels -> (shape, colour, box, mask, score).

Foreground is every pixel far from the grey background; each 8-connected component large enough
to be an object is one detection. Its class is the shape whose mask, drawn by the generator's own
renderer in the component's box, overlaps it best (IoU); its colour is the palette colour nearest
to the mean of its most saturated half of pixels (so a decoder's blurry rim, half grey, does not
pull it off). On the generator's images both are exact. The score says how unmistakable the
shape is (`classify_shape`): ~1 for a crisp shape, under GenEval's 0.3 for a formless blob, and in
between for a shape as much one class as another, which counts for ordinary tags but not under
the 0.9 threshold of `counting`. Used by shapes-GenEval (`fluid_cli/shapes/geneval.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fluid_cli.shapes.render import BACKGROUND, PALETTE, SHAPES, Box, mask_box, shape_mask

_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_PALETTE_NAMES = tuple(PALETTE)
# half the smallest palette-to-background distance (purple, ~116): a blurred edge pixel counts as
# the object's only if it is nearer the object's colour than the background
FOREGROUND_DISTANCE = 0.5 * float(np.linalg.norm(_PALETTE_RGB - np.array(BACKGROUND), axis=1).min())


@dataclass(frozen=True)
class Found:
    """One detected object. `mask` is a bool (H, W) array at the image's size."""

    shape: str
    colour: str
    box: Box
    mask: np.ndarray
    score: float
    iou: float


def _background_distance(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)


def nearest_colour(pixels: np.ndarray) -> str:
    """The palette name nearest to the mean of the more saturated half of `pixels` (N, 3)."""
    pixels = pixels.reshape(-1, 3).astype(np.float32)
    dist = _background_distance(pixels)
    core = pixels[dist >= np.median(dist)]
    mean = core.mean(axis=0)
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_RGB - mean, axis=1)))]


@lru_cache(maxsize=4096)
def templates(h: int, w: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Per shape, the renderer's masks whose tight box is h x w. The generator draws in an s x s
    box and a shape's first row may stay empty (a triangle's apex at even s), so drawing sizes
    s = max(h, w) .. +2 are tried; a box no drawing size gives (a blurry, stretched object) gets
    the mask drawn straight into h x w."""
    out = []
    for shape in SHAPES:
        found = False
        for s in range(max(h, w), max(h, w) + 3):
            m = shape_mask(shape, s, s)
            if not m.any():  # a star 1-2 px wide has no pixel centre inside
                continue
            x0, y0, x1, y1 = mask_box(m)
            if (y1 - y0, x1 - x0) == (h, w):
                out.append((shape, m[y0:y1, x0:x1]))
                found = True
        if not found:
            out.append((shape, shape_mask(shape, h, w)))
    return tuple(out)


def classify_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """(shape, IoU, confidence) of the best template for a component cropped to its tight box.

    Confidence = the best IoU's lead over the runner-up shape, / 0.1, capped at 1, faded out as
    the best IoU falls from 0.6 to 0.4 (a formless blob is nothing). On the generator's images
    the lead is at least 0.15 (a 9 px circle vs square), so every object scores 1. On a
    tokenizer's reconstructions this score kept 80% of rightly classified objects above GenEval's
    0.9 counting threshold and 8% of wrongly classified ones; IoU alone kept both alike, since a
    blurred star that became a blob fits the circle template well."""
    best: dict[str, float] = {}
    for shape, t in templates(*mask.shape):
        iou = float((t & mask).sum()) / float((t | mask).sum())
        best[shape] = max(best.get(shape, 0.0), iou)
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    (shape, iou), (_, runner_up) = ranked[0], ranked[1]
    confidence = min(1.0, (iou - runner_up) / 0.1) * float(np.clip((iou - 0.4) / 0.2, 0.0, 1.0))
    return shape, iou, confidence


MAX_SIDE = 0.6  # of the image side; the generator's objects span at most 0.42
MAX_ASPECT = 1.5  # every shape is drawn in a square box (tight boxes differ by a row at most)


def detect(image: np.ndarray, min_area: int | None = None) -> list[Found]:
    """All objects in a uint8 (H, W, 3) image, most confident first. Components smaller than
    `min_area` pixels (default (side/16)^2, at least 4: 4 px at 32 px) are specks, components
    wider or taller than MAX_SIDE of the image are backgrounds (an all-black image is no square),
    and components more than MAX_ASPECT times longer than wide are streaks."""
    from scipy import ndimage

    image = np.asarray(image)[..., :3]
    fg = _background_distance(image) > FOREGROUND_DISTANCE
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    min_area = min_area if min_area is not None else max(4, (image.shape[0] // 16) ** 2)
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == k
        h, w = crop.shape
        if crop.sum() < min_area or max(h / fg.shape[0], w / fg.shape[1]) > MAX_SIDE:
            continue
        if max(h, w) > MAX_ASPECT * min(h, w):  # a streak, not a shape (all are drawn in squares)
            continue
        shape, iou, score = classify_shape(crop)
        mask = np.zeros(fg.shape, dtype=bool)
        mask[sl] = crop
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        found.append(Found(shape, nearest_colour(image[sl][crop]), box, mask, score, iou))
    return sorted(found, key=lambda f: -f.score)
