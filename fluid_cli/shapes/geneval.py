"""shapes-GenEval: GenEval's rules (fluid_cli/eval/geneval_rules.py) with the shapes detector.

The rule-based detector (`fluid_cli/shapes/detector.py`) stands in for Mask2Former and a pixel
colour classifier for CLIP: it receives GenEval's colour crops (box, pixels outside the mask
painted #999) and returns the palette colour of the unpainted pixels, the same colour the detector
measured. Both plug into the scorer as data, so shapes-GenEval and GenEval differ only in the
models. As `fluid eval-geneval` plug-ins: `--detector py:fluid_cli.shapes.geneval:detector` and
`--clip py:fluid_cli.shapes.geneval:colour_classifier`. For a held-out folder laid out as GenEval's
(<root>/00000/metadata.jsonl + samples/*.png), `score_shapes_folder(root)` gives the summary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fluid_cli.eval.geneval_rules import COUNTING_THRESHOLD, GREY, Detection, score_image
from fluid_cli.shapes.detector import detect, nearest_colour
from fluid_cli.shapes.render import SHAPES

_GREY_RGB = np.array(Image.new("RGB", (1, 1), GREY).getpixel((0, 0)), dtype=np.uint8)


class ShapesDetector:
    """GenEval detector interface: PIL image -> list of `Detection` (class = shape name)."""

    identity = {"id": "shapes-detector", "kind": "rule-based", "classes": list(SHAPES)}

    def __call__(self, image: Image.Image) -> list[Detection]:
        rgb = np.asarray(image.convert("RGB"))
        return [Detection(f.shape, f.score, tuple(float(v) for v in f.box), f.mask) for f in detect(rgb)]


class PixelColourClassifier:
    """GenEval colour classifier interface: (crops, class name) -> one colour name per crop."""

    identity = {"id": "shapes-pixel-colour", "kind": "nearest palette colour of the masked pixels"}

    def __call__(self, crops: list[Image.Image], cls: str) -> list[str]:
        out = []
        for crop in crops:
            px = np.asarray(crop.convert("RGB")).reshape(-1, 3)
            inside = ~(px == _GREY_RGB).all(axis=1)  # the scorer paints outside the mask #999
            out.append(nearest_colour(px[inside] if inside.any() else px))
        return out


def detector(classes: Sequence[str] | None = None) -> ShapesDetector:
    """Plug-in factory (`py:fluid_cli.shapes.geneval:detector`); the class list is always SHAPES."""
    return ShapesDetector()


def colour_classifier() -> PixelColourClassifier:
    """Plug-in factory (`py:fluid_cli.shapes.geneval:colour_classifier`)."""
    return PixelColourClassifier()


def score_images(items: Iterable[tuple[dict, Image.Image | np.ndarray]]) -> list[dict]:
    """Score (metadata, image) pairs in memory: one row per image (tag, prompt, correct, reason)."""
    det, clf = ShapesDetector(), PixelColourClassifier()
    rows = []
    for meta, image in items:
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        ok, reason = score_image(meta, det(img), img, clf)
        rows.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": ok, "reason": reason})
    return rows


def score_shapes_folder(root: Path) -> dict:
    """Per-tag scores and overall (GenEval's `summarize`) of a GenEval-layout folder of shapes
    prompts, plus the per-image rows."""
    from fluid_cli.eval.geneval_run import score_folder, summarize

    rows = score_folder(Path(root), ShapesDetector(), PixelColourClassifier(), classes=SHAPES)
    summary = {"metric": "shapes-geneval", **summarize(rows), "images": len(rows)}
    return {**summary, "objects": object_counts(root), "rows": rows}


def object_counts(root: Path) -> dict:
    """Objects drawn against objects asked, over a GenEval-layout folder of shapes prompts.

    GenEval's rules pass an image holding extra objects on most tags (single_object, two_object,
    colors and position ask for at least one of each), so a sampler that crowds its images scores
    well while drawing something else: a run measured here scored 0.42 with every image full of
    shapes (docs/demo.md). `exact` (the share of images with exactly the asked number of objects)
    and the mean counts expose that. Objects: detections above GenEval's counting threshold."""
    from fluid_cli.eval.geneval_run import scan_folder

    det = ShapesDetector()
    asked, drawn = [], []
    for item in scan_folder(Path(root)):
        want = sum(int(c.get("count", 1)) for c in item.metadata.get("include", []))
        for png in item.images:
            with Image.open(png) as img:
                found = [d for d in det(img) if d.score > COUNTING_THRESHOLD]
            asked.append(want)
            drawn.append(len(found))
    n = max(1, len(asked))
    return {
        "images": len(asked),
        "asked_mean": sum(asked) / n,
        "drawn_mean": sum(drawn) / n,
        "exact": sum(a == d for a, d in zip(asked, drawn, strict=True)) / n,
    }


def write_reference_layout(
    root: Path, images_per_prompt: int = 4, size: int = 64, seed: int = 0, layout: str = "grid"
) -> Path:
    """The held-out prompts in GenEval's layout with ground-truth renders as the samples
    (<root>/00000/metadata.jsonl, samples/0000.png ...): the reference a model is compared with
    (it scores 1.0), and a template of the layout that generated samples go into."""
    import json

    from fluid_cli.shapes.generator import draw, png_bytes
    from fluid_cli.shapes.prompts import heldout_specs, metadata

    root = Path(root)
    for p, spec in enumerate(heldout_specs()):
        folder = root / f"{p:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(metadata(spec)) + "\n")
        for i in range(images_per_prompt):
            img, _ = draw(spec, np.random.default_rng([seed, p, i]), size, layout)
            (folder / "samples" / f"{i:04d}.png").write_bytes(png_bytes(img))
    return root
