"""GenEval's models as plug-ins of the pure scorer: a Mask2Former detector and a CLIP colour classifier.

Owns loading (hub id or local dir, offline-first: a missing weight is one line naming the hub id and
the option that takes a local dir), the Mask2Former instance post-processing that the benchmark's
rules expect (every query x class, no threshold, no NMS; boxes are the tight boxes of the masks) and
zero-shot colour classification over the benchmark's 10 colours x 3 templates, and the plug-in
factories behind --detector / --clip (a hub id, a local dir, or `py:MODULE:FUNCTION`). torch and
transformers are imported inside the classes. Exercised by `fluid eval-geneval` (--detector, --clip).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from fluid_cli.errors import FluidError
from fluid_cli.eval.geneval_rules import COLOURS, TEMPLATES, ColourClassifier, Detection
from fluid_cli.settings import GenevalSettings

DETECTOR_ID = GenevalSettings.detector  # Swin-S Mask2Former, COCO instance segmentation
CLIP_ID = GenevalSettings.clip  # CLIP ViT-L/14, OpenAI weights


def _resolve(what: str, name: str, option: str) -> tuple[str, str]:
    """(what from_pretrained loads, an identity for the result) without touching the network when the
    weights are local or cached; a missing model is one FluidError line, never a hub retry loop."""
    from huggingface_hub import constants, hf_hub_download

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FluidError(
                f"{what} directory {name} has no config.json: pass a dir saved with save_pretrained"
            )
        return str(local), str(local.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FluidError(f"{what} directory {name} does not exist; pass {option} DIR or a hub id")
    try:
        cfg = Path(hf_hub_download(name, "config.json", local_files_only=True))
        return str(cfg.parent), f"{name}@{cfg.parent.name}"  # the snapshot dir name is the commit
    except Exception:  # not cached (or not a valid id): fall through to the one-line message
        pass
    if constants.HF_HUB_OFFLINE:
        raise FluidError(
            f"{what} weights {name!r} are not available offline: run `huggingface-cli download {name}` "
            f"where the hub is reachable and copy ~/.cache/huggingface here, or pass {option} DIR (a local "
            "dir saved with save_pretrained)"
        )
    return name, name  # online: from_pretrained downloads it


def _device(name: str):
    """The device choice of every stage (backend.resolve_device)."""
    import os

    from fluid_cli.backend import resolve_device

    return resolve_device(name, int(os.environ.get("LOCAL_RANK", "0")))


def _load(what: str, loader, path: str):
    try:
        return loader(path)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FluidError(f"could not load the {what} from {path}: {first}") from None


class Mask2FormerDetector:
    """`detector(image) -> list[Detection]`: every (query, class) pair Mask2Former proposes, scored as
    class probability x mean mask probability inside the mask; classes named by `classes` (label id
    order, the benchmark's object_names.txt)."""

    def __init__(self, name: str = DETECTOR_ID, classes: list[str] | None = None, device: str = "auto"):
        path, ident = _resolve("detector", name, "--detector")  # before the slow transformers import
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from fluid_cli.eval.geneval_rules import coco_classes

        self.processor = _load("detector's image processor", AutoImageProcessor.from_pretrained, path)
        model = _load("detector", Mask2FormerForUniversalSegmentation.from_pretrained, path)
        self.device = _device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.classes = list(classes or coco_classes())
        if self.model.config.num_labels != len(self.classes):
            raise FluidError(
                f"detector {name} has {self.model.config.num_labels} classes, the class list {len(self.classes)}"
            )
        self.identity = {"id": name, "resolved": ident, "model": "Mask2FormerForUniversalSegmentation"}

    def __call__(self, image: Image.Image) -> list[Detection]:
        import torch

        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_mask = inputs.get("pixel_mask")
        with torch.no_grad():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        return self._instances(
            out, inputs["pixel_values"].shape[-2:], pixel_mask, (image.height, image.width)
        )

    def _instances(self, out, in_size, pixel_mask, size: tuple[int, int]) -> list[Detection]:
        import torch
        import torch.nn.functional as F

        scores = out.class_queries_logits[0].float().softmax(-1)[:, :-1]  # drop the no-object class
        Q, C = scores.shape
        top, idx = scores.flatten().topk(Q)  # as mmdet: the num_queries best (query, class) pairs
        labels, queries = idx % C, idx // C
        logits = out.masks_queries_logits[0, queries].float()[None]
        logits = F.interpolate(logits, size=tuple(in_size), mode="bilinear", align_corners=False)[0]
        if pixel_mask is not None:  # drop the processor's padding before scaling to the image
            valid = pixel_mask[0].bool()
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
            logits = logits[:, :h, :w]
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        masks = logits > 0
        mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        final = (top * mask_score).tolist()
        dets = []
        for k in range(Q):
            m = masks[k]
            ys, xs = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
            box = (0.0, 0.0, 0.0, 0.0)  # empty mask: a zero box, as mmdet's mask2bbox
            if len(xs) and len(ys):
                box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
            dets.append(Detection(self.classes[int(labels[k])], final[k], box, m.cpu().numpy()))
        return dets


class ClipColourClassifier:
    """`classify_colour(crops, cls) -> colours`: zero-shot CLIP over COLOURS; each colour's text
    embedding is the normalised mean of its three templates (as open_clip's zero-shot classifier)."""

    def __init__(self, name: str = CLIP_ID, device: str = "auto"):
        path, ident = _resolve("CLIP", name, "--clip")
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.tokenizer = _load("CLIP tokenizer", AutoTokenizer.from_pretrained, path)
        self.image_processor = _load("CLIP image processor", CLIPImageProcessor.from_pretrained, path)
        self.device = _device(device)
        self.model = (
            _load("CLIP", CLIPModel.from_pretrained, path).eval().requires_grad_(False).to(self.device)
        )
        self.identity = {"id": name, "resolved": ident, "model": "CLIPModel"}
        self._weights: dict[str, object] = {}  # class name -> (10, D) text classifier

    @staticmethod
    def _features(out):
        import torch.nn.functional as F

        feats = out if hasattr(out, "norm") else out.pooler_output  # transformers 5 returns an output
        return F.normalize(feats.float(), dim=-1)

    def _text_weights(self, cls: str):
        import torch
        import torch.nn.functional as F

        if cls not in self._weights:
            texts = [t.format(c=c, cls=cls) for c in COLOURS for t in TEMPLATES]
            tok = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = self._features(self.model.get_text_features(**tok))
            self._weights[cls] = F.normalize(emb.view(len(COLOURS), len(TEMPLATES), -1).mean(1), dim=-1)
        return self._weights[cls]

    def __call__(self, crops: list[Image.Image], cls: str) -> list[str]:
        import torch

        if not crops:
            return []
        px = self.image_processor(images=[c.convert("RGB") for c in crops], return_tensors="pt")[
            "pixel_values"
        ]
        with torch.no_grad():
            feats = self._features(self.model.get_image_features(pixel_values=px.to(self.device)))
        best = (feats @ self._text_weights(cls).T).argmax(-1).tolist()
        return [COLOURS[i] for i in best]


# ---- plug-ins: `--detector` / `--clip` take a hub id, a local dir, or py:MODULE:FUNCTION --------------


def load_plugin(spec: str, what: str):
    """`py:MODULE:FUNCTION` -> the factory; the injection point for custom detectors/classifiers."""
    try:
        _, module, func = spec.split(":", 2)
        return getattr(importlib.import_module(module), func)
    except (ValueError, ImportError, AttributeError) as e:
        raise FluidError(
            f"{what} plug-in {spec!r} cannot be loaded ({e}); use py:MODULE:FUNCTION with MODULE importable"
        ) from None


def make_detector(spec: str, classes: list[str], device: str) -> tuple[Callable, dict]:
    """(detector, identity): `py:MODULE:FUNCTION` calls FUNCTION(classes); else Mask2Former from spec."""
    if spec.startswith("py:"):
        det = load_plugin(spec, "detector")(classes)
        return det, getattr(det, "identity", {"id": spec})
    det = Mask2FormerDetector(spec, classes, device)
    return det, det.identity


def make_classifier(spec: str, device: str) -> tuple[ColourClassifier, dict]:
    """(classify_colour, identity): `py:MODULE:FUNCTION` calls FUNCTION(); else CLIP from spec."""
    if spec.startswith("py:"):
        clf = load_plugin(spec, "colour classifier")()
        return clf, getattr(clf, "identity", {"id": spec})
    clf = ClipColourClassifier(spec, device)
    return clf, clf.identity
