"""The shapes world's drawing rules: palette, shape masks, rendering and GenEval's position rule.

One renderer serves both sides: the generator (`fluid shapes-data`) draws with it, and the detector
(`fluid_cli/shapes/detector.py`) matches components against the same masks, so on ground-truth
images detection is exact. Shapes are drawn with hard edges (no anti-aliasing): every pixel is
either the background grey or one palette colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fluid_cli.eval.geneval_rules import position_offsets, relations_of_offsets

# GenEval's 10 colour names, with RGB values chosen far apart (min pairwise distance ~100) and far
# from the grey background, so nearest-colour classification survives a blurry decoder.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (255, 130, 0),
    "yellow": (250, 235, 20),
    "green": (20, 170, 40),
    "blue": (20, 60, 235),
    "purple": (135, 30, 190),
    "pink": (255, 125, 205),
    "brown": (115, 65, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND = (128, 128, 128)  # neutral grey: both black and white objects stand out
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS = {s: s + "es" if s.endswith(("s", "x")) else s + "s" for s in SHAPES}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, ends exclusive


@dataclass(frozen=True)
class Obj:
    """One drawn object: a shape name, a palette colour name and its box."""

    shape: str
    colour: str
    box: Box

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": list(self.box)}


def _star_polygon(points: int = 5, inner: float = 0.5) -> np.ndarray:
    """A point-up star, stretched to fill the unit square (an inner radius of 0.5 keeps it fat
    enough to stay a star at 8 px)."""
    k = np.arange(2 * points)
    radius = np.where(k % 2 == 0, 1.0, inner)
    angle = -np.pi / 2 + k * np.pi / points
    xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return (xy - xy.min(0)) / (xy.max(0) - xy.min(0))


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for points (u, v) against a closed polygon (N, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


@lru_cache(maxsize=4096)
def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """The boolean (h, w) mask of `shape` filling an h x w box, tested at pixel centres. Read-only:
    it is cached, since the detector asks for the same few box sizes again and again."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    if shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        m = np.ones((h, w), dtype=bool)
    elif shape == "triangle":  # apex up, base on the bottom edge
        m = np.abs(u - 0.5) <= v / 2
    elif shape == "star":
        m = _inside_polygon(u, v, _STAR)
    elif shape == "cross":  # a plus sign, arms a third of the box wide (0.4 made an 8-11 px cross
        # a near-twin of the circle: template IoU 0.92 at 8 px; now at most 0.8 from 9 px up)
        m = (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    m.setflags(write=False)
    return m


def render(objects: list[Obj], size: int) -> np.ndarray:
    """uint8 (size, size, 3) image: the objects on the grey background."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        x0, y0, x1, y1 = o.box
        img[y0:y1, x0:x1][shape_mask(o.shape, y1 - y0, x1 - x0)] = PALETTE[o.colour]
    return img


def mask_box(mask: np.ndarray, x0: int = 0, y0: int = 0) -> Box:
    """The tight box of a boolean mask's pixels (offset by x0, y0)."""
    ys, xs = np.nonzero(mask)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


def relation_offsets(a: Box, b: Box) -> tuple[float, float]:
    """GenEval's position rule (the scorer's own function, so generator and scorer cannot drift)."""
    return position_offsets(a, b)


def relations(a: Box, b: Box) -> set[str]:
    """The relations of A to B that GenEval's rule finds (image y grows downwards)."""
    return relations_of_offsets(*position_offsets(a, b))
