"""Evaluation: the paper's FID-30K on MS-COCO 2014 captions and GenEval (docs/evaluation.md).

    fid.py             Frechet distance, feature stats (.npz), clean-fid's Inception from disk
    fid_run.py         `fluid eval-fid`: checks (count, one size, captions), reference stats, results
    coco_prompts.py    `fluid coco-30k`: the seeded 30K caption list (+ prompts .txt, COCO subset JSON)
    geneval_rules.py   GenEval's rules as one pure scorer over `Detection`s (no torch)
    geneval_models.py  Mask2Former detector and CLIP colour classifier (transformers, lazy)
    geneval_run.py     `fluid eval-geneval`: folder layout, generation, completeness, result files
Nothing here imports torch at import time; the commands import what they need.
"""

from __future__ import annotations

from fluid_cli.eval.fid import feature_stats, frechet_distance, load_stats, save_stats
from fluid_cli.eval.geneval_rules import COLOURS, TAGS, Detection, coco_classes, load_metadata, score_image
from fluid_cli.eval.geneval_run import score_folder, summarize

__all__ = [
    "COLOURS",
    "TAGS",
    "Detection",
    "coco_classes",
    "feature_stats",
    "frechet_distance",
    "load_metadata",
    "load_stats",
    "save_stats",
    "score_folder",
    "score_image",
    "summarize",
]
