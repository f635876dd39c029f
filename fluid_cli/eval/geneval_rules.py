"""GenEval's scoring rules as one pure function of detections: no torch, no model, no file layout.

Owns the benchmark's constants (thresholds, the 16-per-class cap, colours, templates, the position
margin), the `Detection` record a detector returns, the colour crop (box + mask on grey #999), the
relative-position rule and `score_image`. Detectors and colour classifiers are plugged in as data
and callables, so Mask2Former + CLIP (geneval_models.py) and an exact rule-based detector for
synthetic images score by the same rules. Exercised by `fluid eval-geneval` and tests/test_geneval.py.
The rules are restated in fluid_cli/data/geneval/README.md and docs/evaluation.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

THRESHOLD = 0.3  # keep detections with score > 0.3 ...
COUNTING_THRESHOLD = 0.9  # ... and > 0.9 for the `counting` tag (fewer false positives when counting)
MAX_OBJECTS = 16  # per class, highest score first; no NMS
POSITION_MARGIN = 0.1  # each axis offset shrinks by 0.1 x (size of A + size of B)
NO_RELATION_EPS = 1e-3  # a shrunk offset below this on both axes means "no relation"
GREY = "#999999"  # background of a colour crop outside the object's mask
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# classify_colour(crops, class name) -> one colour name (from COLOURS) per crop
ColourClassifier = Callable[[list[Image.Image], str], list[str]]


@dataclass(frozen=True, eq=False)  # eq=False: masks are arrays; detections compare by identity
class Detection:
    """One detected instance: class name, confidence, box in pixels (x0, y0, x1, y1), optional mask."""

    cls: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None  # bool (H, W) at the image's size


def _data_text(name: str) -> str:
    return resources.files("fluid_cli").joinpath("data", "geneval", name).read_text(encoding="utf-8")


def coco_classes() -> list[str]:
    """The 80 COCO class names of the benchmark's detector, in detector (label id) order."""
    return [ln.strip() for ln in _data_text("object_names.txt").splitlines() if ln.strip()]


def load_metadata() -> list[dict]:
    """The benchmark's 553 prompts (package data: fluid_cli/data/geneval/evaluation_metadata.jsonl)."""
    return [json.loads(ln) for ln in _data_text("evaluation_metadata.jsonl").splitlines() if ln.strip()]


def keep_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """Per class: score > threshold (0.9 for counting), highest score first, at most MAX_OBJECTS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if float(d.score) > threshold:  # strictly above: a score exactly at the threshold is dropped
            by_class.setdefault(d.cls, []).append(d)
    # stable sort: equal scores keep the detector's order
    return {c: sorted(ds, key=lambda d: -float(d.score))[:MAX_OBJECTS] for c, ds in by_class.items()}


def position_offsets(a: tuple, b: tuple) -> tuple[float, float]:
    """GenEval's position rule on boxes (x0, y0, x1, y1): A's centre minus B's, each axis shrunk by
    POSITION_MARGIN x (A's + B's size on it) and clamped at 0 (so touching or overlapping objects
    are not "left of" each other), divided by the raw offset's norm. (0, 0): no relation."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    offset = np.array([(ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2])
    dims = np.array([abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0)])
    shrunk = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < NO_RELATION_EPS):
        return 0.0, 0.0
    dx, dy = shrunk / np.linalg.norm(offset)  # normalised by the raw offset: diagonal pairs get both
    return float(dx), float(dy)


def relations_of_offsets(dx: float, dy: float) -> set[str]:
    """ "left of" / "right of" / "above" / "below" (image y grows downwards) for offsets past 0.5."""
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"; image y grows downwards)."""
    return relations_of_offsets(*position_offsets(a.box, b.box))


def colour_crop(image: Image.Image, det: Detection) -> Image.Image:
    """The object's box, with pixels outside its mask painted grey #999 (so CLIP sees one object)."""
    rgb = image.convert("RGB")
    if det.mask is not None:
        mask = np.asarray(det.mask, dtype=bool)
        if mask.shape != (rgb.height, rgb.width):
            raise ValueError(f"mask shape {mask.shape} is not the image's {(rgb.height, rgb.width)}")
        blank = Image.new("RGB", rgb.size, GREY)
        rgb = Image.composite(rgb, blank, Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    return rgb.crop(tuple(float(v) for v in det.box))


def _colour_clause(image, found, cls, want, count, classify_colour) -> str | None:
    colours = list(classify_colour([colour_crop(image, d) for d in found], cls))
    hits = colours.count(want)
    if hits >= count:
        return None
    seen = ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours)
    return f"expected {count} {want} {cls}, found {hits} {want} (colours: {seen})"


def _position_clause(found, cls, relation, targets) -> str | None:
    if targets is None:
        return f"no target for {cls} to be {relation}"
    for obj in found:
        for target in targets:
            rels = relative_position(obj, target)
            if relation not in rels:
                return f"expected {cls} {relation} {target.cls}, found {' and '.join(sorted(rels)) or 'no relation'}"
    return None


def score_image(
    metadata: dict,
    detections: Sequence[Detection],
    image: Image.Image,
    classify_colour: ColourClassifier,
) -> tuple[bool, str]:
    """(correct, reason) of one image under its prompt's clauses. `detections` are unfiltered: the
    benchmark's thresholds, ordering and cap are applied here. Reasons are joined with "; "."""
    kept = keep_detections(detections, metadata.get("tag", ""))
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []  # per include clause: its checked objects, or None
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = kept.get(cls, [])[:count]  # the `count` most confident are the ones checked
        why = None
        if len(found) < count:
            why = f"expected {count} {cls}, found {len(kept.get(cls, []))}"
        if why is None and "color" in req:
            why = _colour_clause(image, found, cls, req["color"], count, classify_colour)
        if why is None and "position" in req:
            relation, target = req["position"]
            why = _position_clause(found, cls, relation, matched[int(target)])
        if why:
            reasons.append(why)
        matched.append(None if why else found)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        n = len(kept.get(cls, []))
        if n >= count:
            reasons.append(f"expected fewer than {count} {cls}, found {n}")
    return not reasons, "; ".join(reasons)
