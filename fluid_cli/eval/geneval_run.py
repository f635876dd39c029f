"""The `fluid eval-geneval` stage: the benchmark's folder layout, generation through the sampler,
completeness checks, scoring a folder with any detector, and the result files.

    <root>/<00000>/metadata.jsonl          the prompt's JSON object (benchmark layout)
    <root>/<00000>/samples/<0000>.png      4 images per prompt
    <root>/.fluid-samples/                 `fluid sample` output the layout is linked from (resumable)
    <root>/geneval-results.jsonl           one line per image: correct, reason, kept detections
    <root>/geneval.json                    per-tag scores, overall, versions; also RUN/eval/geneval-step<N>.json
Detectors and colour classifiers are plug-ins (geneval_models.py): a hub id / local dir (Mask2Former,
CLIP) or `py:MODULE:FUNCTION`, a factory called as FUNCTION(classes) -> detector / FUNCTION() -> classifier.
Exercised by `fluid eval-geneval` and tests/test_geneval.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from fluid_cli.errors import FluidError
from fluid_cli.eval.geneval_rules import TAGS, ColourClassifier, Detection, keep_detections, score_image
from fluid_cli.settings import GenevalSettings, SampleRunSettings

log = logging.getLogger(__name__)
IMAGES_PER_PROMPT = 4
STAGE = ".fluid-samples"
RESULTS, SUMMARY = "geneval-results.jsonl", "geneval.json"
Detector = Callable[[Image.Image], list[Detection]]


@dataclass
class PromptDir:
    index: int
    folder: Path
    metadata: dict
    images: list[Path]


def check_metadata(meta: object, where: str) -> dict:
    """A GenEval metadata object: `include` (and `exclude`) are lists of objects naming a class;
    anything else is refused here, with its place, instead of failing inside the scorer."""
    if not isinstance(meta, dict):
        raise FluidError(f"{where} is not a JSON object; one GenEval metadata object a line")
    for key in ("include", "exclude"):
        reqs = meta.get(key, [])
        if not isinstance(reqs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("class"), str) for r in reqs
        ):
            raise FluidError(
                f"{where}: `{key}` must be a list of objects with a `class` (e.g. "
                '[{"class": "dog", "count": 1}]), got ' + json.dumps(reqs)[:80]
            )
        for r in reqs:
            if "count" in r and (
                not isinstance(r["count"], int) or isinstance(r["count"], bool) or r["count"] < 1
            ):
                raise FluidError(f"{where}: `{key}` count must be a positive integer, got {r['count']!r}")
    return meta


def scan_folder(root: Path) -> list[PromptDir]:
    """The prompt folders (5-digit names) of a GenEval layout, in index order."""
    root = Path(root)
    if not root.is_dir():
        raise FluidError(f"{root} is not a directory; pass a GenEval layout (<root>/00000/metadata.jsonl)")
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = d / "metadata.jsonl"
        if not meta.is_file():
            raise FluidError(f"{d} has no metadata.jsonl: not a GenEval prompt folder")
        try:
            metadata = json.loads(meta.read_text(encoding="utf-8").strip().splitlines()[0])
        except (ValueError, IndexError) as e:
            raise FluidError(f"{meta} is not one JSON object: {e}") from None
        check_metadata(metadata, str(meta))
        images = sorted((d / "samples").glob("*.png")) if (d / "samples").is_dir() else []
        items.append(PromptDir(int(d.name), d, metadata, images))
    if not items:
        raise FluidError(f"{root} holds no GenEval prompt folders (<root>/00000/metadata.jsonl)")
    return items


def check_items(items: list[PromptDir], benchmark: list[dict] | None, classes: Sequence[str],
                allow_incomplete: bool) -> dict:  # fmt: skip
    """Refuse unknown classes, folders that are not the benchmark's prompts, and (unless
    allow_incomplete) a set with fewer than len(benchmark) x 4 images; returns the completeness."""
    known = set(classes)
    for it in items:
        for req in it.metadata.get("include", []) + it.metadata.get("exclude", []):
            if req.get("class") not in known:
                raise FluidError(
                    f"{it.folder}/metadata.jsonl names class {req.get('class')!r}, which the detector's class list lacks"
                )
        if benchmark is not None and (it.index >= len(benchmark) or benchmark[it.index] != it.metadata):
            raise FluidError(
                f"{it.folder}/metadata.jsonl is not the benchmark's prompt {it.index}; use the benchmark's numbering"
            )
    if benchmark is None:
        return {"images": sum(len(it.images) for it in items), "expected_images": None, "complete": True}
    have = {it.index: len(it.images) for it in items}
    short = [i for i in range(len(benchmark)) if have.get(i, 0) < IMAGES_PER_PROMPT]
    n, expected = sum(have.values()), len(benchmark) * IMAGES_PER_PROMPT
    info = {"images": n, "expected_images": expected, "complete": not short, "short_prompts": len(short)}
    if short and not allow_incomplete:
        raise FluidError(
            f"incomplete GenEval set: {n} images, {len(short)} of {len(benchmark)} prompts have fewer than "
            f"{IMAGES_PER_PROMPT} (first: {short[0]:05d}); expected {expected}; generate the rest or pass "
            "--allow-incomplete to score it anyway (flagged in the result)"
        )
    return info


def score_items(items: list[PromptDir], detector: Detector, classify_colour: ColourClassifier,
                progress: Callable[[], None] | None = None) -> list[dict]:  # fmt: skip
    """One result row per image."""
    rows = []
    for it in items:
        for path in it.images:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated or not an image
                raise FluidError(f"{path} is not a readable image ({e}); remove or regenerate it") from None
            dets = detector(image)
            correct, reason = score_image(it.metadata, dets, image, classify_colour)
            kept = {c: len(v) for c, v in keep_detections(dets, it.metadata.get("tag", "")).items()}
            rows.append({"folder": it.folder.name, "image": f"samples/{path.name}", "tag": it.metadata.get("tag"),
                         "prompt": it.metadata.get("prompt"), "correct": correct, "reason": reason, "kept": kept})  # fmt: skip
            if progress:
                progress()
    return rows


def score_folder(root: Path, detector: Detector, classify_colour: ColourClassifier,
                 classes: Sequence[str] | None = None) -> list[dict]:  # fmt: skip
    """Score every image of a GenEval layout (any prompt set, no completeness check): result rows."""
    from fluid_cli.eval.geneval_rules import coco_classes

    items = scan_folder(root)
    check_items(items, None, classes or coco_classes(), allow_incomplete=True)
    return score_items(items, detector, classify_colour)


def summarize(rows: list[dict]) -> dict:
    """Per-tag fraction correct and the overall score (mean of the tag scores present)."""
    counts: dict[str, list[int]] = {}
    for r in rows:
        c = counts.setdefault(r["tag"], [0, 0])
        c[0] += bool(r["correct"])
        c[1] += 1
    tags = {t: counts[t][0] / counts[t][1] for t in TAGS if t in counts}
    tags.update({t: c[0] / c[1] for t, c in counts.items() if t not in tags})
    overall = sum(tags.values()) / len(tags) if tags else None
    return {"overall": overall, "tags": tags, "counts": {t: {"correct": c[0], "images": c[1]} for t, c in counts.items()},
            "all_tags": all(t in tags for t in TAGS)}  # fmt: skip


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # no second copy of 2212 PNGs; the stage keeps its own for resume
    except OSError:
        shutil.copy2(src, dst)


def write_layout(root: Path, benchmark: list[dict], stage: Path) -> int | None:
    """Link the sampler's images into <root>/<00000>/samples/<0000>.png; returns the checkpoint step."""
    rows = [
        json.loads(ln)
        for ln in (stage / "samples.jsonl").read_text(encoding="utf-8").splitlines()
        if ln.strip()
    ]
    for i, meta in enumerate(benchmark):
        d = root / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    steps = set()
    for r in rows:
        _link(
            stage / r["file"],
            root / f"{int(r['prompt_index']):05d}" / "samples" / f"{int(r['image_index']):04d}.png",
        )
        steps.add(r.get("step"))
    return steps.pop() if len(steps) == 1 else None


def generate(root: Path, benchmark: list[dict], run: SampleRunSettings) -> int | None:
    """Generate run.images_per_prompt (GenEval: 4) images per benchmark prompt with the sampler
    (resumable; `run`'s out and prompts are set here) and lay them out; returns the step."""
    try:
        from fluid_cli.sampling.run import run_sample
    except ImportError as e:
        raise FluidError(
            f"the sampler is not available ({e}); generate with `fluid sample` and pass --images"
        ) from None
    stage = Path(root) / STAGE
    stage.mkdir(parents=True, exist_ok=True)
    prompts = stage / "prompts.txt"  # line n-1 = benchmark prompt n-1, so prompt_index = folder index
    prompts.write_text("".join(m["prompt"] + "\n" for m in benchmark), encoding="utf-8")
    run_sample(replace(run, out=stage, prompts_file=str(prompts), prompts=()))
    return write_layout(Path(root), benchmark, stage)


def stage_step(root: Path) -> int | None:
    """The checkpoint step recorded by the sampler in <root>/.fluid-samples, if any."""
    path = Path(root) / STAGE / "samples.jsonl"
    if not path.is_file():
        return None
    steps = {json.loads(ln).get("step") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}
    return steps.pop() if len(steps) == 1 else None


def write_results(root: Path, rows: list[dict], result: dict, run_dir: Path | None) -> Path:
    root = Path(root)
    tmp = root / f".{RESULTS}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, root / RESULTS)
    _write_json(root / SUMMARY, result)
    if run_dir is not None:
        name = f"geneval-step{result['step']}.json" if result.get("step") is not None else "geneval.json"
        _write_json(Path(run_dir) / "eval" / name, result)
    return root / SUMMARY


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def print_table(result: dict) -> None:
    """A short table on stderr (stdout carries only the result path or JSON)."""
    lines = [f"{'tag':<14}{'score':>8}{'images':>8}"]
    for tag, score in result["tags"].items():
        lines.append(f"{tag:<14}{score:>8.3f}{result['counts'][tag]['images']:>8}")
    lines.append(f"{'overall':<14}{result['overall'] or 0:>8.3f}{result['images']:>8}")
    if not result["complete"]:
        lines.append(f"INCOMPLETE: {result['images']} of {result['expected_images']} images")
    print("\n".join(lines), file=sys.stderr)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fluid-cli", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


SHAPES_DETECTOR = "shapes"  # `--detector shapes`: shapes-GenEval (fluid_cli/shapes/geneval.py)


def load_prompts(path: Path) -> list[dict]:
    """A GenEval-schema metadata file (one JSON object a line with `tag`, `prompt`, `include`)."""
    if not path.is_file():
        raise FluidError(
            f"--prompts {path} does not exist; give a GenEval-schema .jsonl (e.g. shapes-data's heldout.jsonl)"
        )
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise FluidError(
                f"{path}:{n} is not JSON ({e.msg}); one GenEval metadata object a line"
            ) from None
        if not isinstance(meta, dict) or not {"tag", "prompt", "include"} <= meta.keys():
            raise FluidError(f"{path}:{n} lacks GenEval's fields tag, prompt and include")
        check_metadata(meta, f"{path}:{n}")
        out.append(meta)
    if not out:
        raise FluidError(f"--prompts {path} holds no prompts")
    return out


def run_eval_geneval(g: GenevalSettings) -> dict:
    """The stage behind `fluid eval-geneval`: generate (or take --images), check, score, write.
    `g.prompts`: a GenEval-schema metadata file replacing the 553 prompts; `g.detector == "shapes"`:
    shapes-GenEval (the shapes world's detector and pixel colours, its five classes)."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    import fluid_cli.eval.geneval_rules as R
    from fluid_cli.eval.geneval_models import CLIP_ID, DETECTOR_ID, make_classifier, make_detector

    checkpoint, images, out, detector, clip, prompts = (
        g.checkpoint,
        g.images,
        g.out,
        g.detector,
        g.clip,
        g.prompts,
    )
    if (checkpoint is None) == (images is None):
        raise FluidError(
            "give a CHECKPOINT to generate images, or --images DIR to score a GenEval folder (not both)"
        )
    shapes = detector == SHAPES_DETECTOR
    benchmark = R.load_metadata() if prompts is None else load_prompts(Path(prompts))
    if shapes:
        from fluid_cli.shapes.render import SHAPES

        classes = list(SHAPES)
        detector, clip = (
            "py:fluid_cli.shapes.geneval:detector",
            "py:fluid_cli.shapes.geneval:colour_classifier",
        )
    else:
        classes = R.coco_classes()
    if checkpoint is not None:
        if out is None:
            raise FluidError(
                "generating needs --out DIR, the GenEval folder to write (<DIR>/00000/samples/0000.png)"
            )
        run = SampleRunSettings(checkpoint=Path(checkpoint), out=Path(out), sampling=g.sampling, seed=g.seed,
                                batch_size=g.batch_size, images_per_prompt=IMAGES_PER_PROMPT,
                                text_embeddings=g.text_embeddings, device=g.device, weights=g.weights)  # fmt: skip
        root, made_step = Path(out), generate(Path(out), benchmark, run)
    else:
        root, made_step = Path(images), stage_step(Path(images))
    items = scan_folder(root)
    info = check_items(items, benchmark, classes, g.allow_incomplete)  # refuse before loading models
    det, det_id = make_detector(detector or DETECTOR_ID, classes, g.device)
    clf, clf_id = make_classifier(clip or CLIP_ID, g.device)
    t0 = time.perf_counter()
    bar = Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr))
    with bar:
        task = bar.add_task("scoring", total=info["images"])
        rows = score_items(items, det, clf, lambda: bar.advance(task))
    secs = time.perf_counter() - t0
    result = {"metric": "geneval", "benchmark": "shapes-geneval" if shapes else "geneval",
              "prompts": str(prompts) if prompts is not None else "geneval-553", **summarize(rows), "step": g.step if g.step is not None else made_step,
              **info, "root": str(root), "detector": det_id, "clip": clf_id,
              "rules": {"threshold": R.THRESHOLD, "counting_threshold": R.COUNTING_THRESHOLD,
                        "max_per_class": R.MAX_OBJECTS, "position_margin": R.POSITION_MARGIN},
              "versions": _versions(), "seconds": round(secs, 3),
              "images_per_s": round(len(rows) / secs, 3) if secs > 0 else None}  # fmt: skip
    result["path"] = str(write_results(root, rows, result, g.run_dir))
    return result
