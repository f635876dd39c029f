"""The `fluid eval-fid` stage: generated images vs reference statistics, with the paper's COCO-30K
protocol checked end to end (count, one resolution, captions = the reference list, same extractor).

Inputs: a folder of images or a `fluid sample` dir (its manifest lists the files, the checkpoint step
and the prompts); a reference: a stats .npz, a folder of real images, or --make-ref (stats of
--ref-images, restricted to --ref-list, cached). Outputs: the result JSON (--out, default
<images>/fid.json) and with --run, RUN/eval/fid-step<N>.json for `fluid fit-scaling`.
Example: fluid eval-fid samples/ --make-ref --ref-images train2014/ --ref-list coco30k.jsonl
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fluid_cli.errors import FluidError
from fluid_cli.eval import fid as F
from fluid_cli.eval.coco_prompts import read_list, sibling
from fluid_cli.settings import EvalFidSettings

log = logging.getLogger(__name__)
MANIFESTS = ("manifest.jsonl", "samples.jsonl")  # a samples dir's manifest: one JSON line per image


@dataclass
class Generated:
    folder: Path
    files: list[Path]
    rows: list[dict] | None  # manifest lines, when the folder has a manifest
    size: tuple[int, int]
    step: int | None
    checkpoint: str | None


def _manifest_rows(path: Path) -> list[dict]:
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a killed sampler: its image is not listed
            log.warning("%s:%d: unreadable line ignored", path, no)
    return [r for r in rows if isinstance(r, dict) and "file" in r]


def read_generated(folder: Path) -> Generated:
    """The generated images (from the manifest if any, else *.png/*.jpg), all of one size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FluidError(f"{folder} is not a directory of generated images")
    manifest = next((folder / m for m in MANIFESTS if (folder / m).is_file()), None)
    rows = _manifest_rows(manifest) if manifest else None
    files = [folder / r["file"] for r in rows] if rows is not None else F.list_images(folder)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FluidError(
            f"{manifest} lists {len(missing)} missing images (first: {missing[0].name}); rerun `fluid sample` to finish them"
        )
    if not files:
        raise FluidError(f"{folder} holds no .png/.jpg images")
    sizes = F.image_sizes(files)
    if len(sizes) > 1:
        seen = ", ".join(f"{n} at {w}x{h}" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        raise FluidError(
            f"mixed image sizes in {folder} ({seen}); FID compares one resolution: regenerate them at one size"
        )
    steps = {r.get("step") for r in rows or []}
    ckpts = {r.get("checkpoint") for r in rows or []}
    if len(steps) > 1 or len(ckpts) > 1:
        raise FluidError(
            f"{manifest} mixes images of several checkpoints or steps; score one checkpoint per folder"
        )
    return Generated(
        folder, files, rows, next(iter(sizes)), steps.pop() if steps else None, ckpts.pop() if ckpts else None
    )


def check_captions(gen: Generated, rows: list[dict], list_path: Path) -> bool:
    """Every image's prompt is the list's caption at its prompt index (False: nothing to check)."""
    if not gen.rows or not all("prompt" in r and "prompt_index" in r for r in gen.rows):
        return False
    for r in gen.rows:
        i = int(r["prompt_index"])
        if i >= len(rows) or rows[i]["caption"] != r["prompt"]:
            raise FluidError(
                f"{gen.folder}/{r['file']} was made from prompt {i} {r['prompt'][:60]!r}, which is not caption {i} of "
                f"{list_path}; generate with `fluid sample --prompts {sibling(Path(list_path), '.txt')}`"
            )
    return True


def _source(ref_images: Path, list_path: Path | None) -> tuple[list[Path], dict]:
    """The real images of --make-ref and their identity (the list's sha256, or the folder's names)."""
    if list_path is not None:
        rows, sha = read_list(list_path)
        files = [Path(ref_images) / r["file_name"] for r in rows]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FluidError(
                f"{len(missing)} images of {list_path} are not in {ref_images} (first: {missing[0].name}); pass the COCO train2014 folder"
            )
        return files, {"kind": "list", "path": str(list_path), "sha256": sha, "count": len(rows)}
    if not Path(ref_images).is_dir():
        raise FluidError(f"--ref-images {ref_images} is not a directory of real images")
    files = F.list_images(Path(ref_images))
    names = hashlib.sha256("\n".join(f.name for f in files).encode()).hexdigest()
    return files, {"kind": "folder", "path": str(ref_images), "names_sha256": names, "count": len(files)}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "fluid" / "fid-ref"


def _check_meta(meta: dict, mode: str, fe_ident: dict, where: Path) -> None:
    """A stats file of another mode or feature extractor would give a meaningless FID: refuse."""
    if meta.get("mode") not in (None, mode):
        raise FluidError(
            f"{where} was computed with --mode {meta['mode']}, this run uses {mode}; use the same mode"
        )
    theirs = meta.get("feature_extractor") or {}
    for k in ("name", "sha256"):
        if theirs.get(k) is not None and fe_ident.get(k) is not None and theirs[k] != fe_ident[k]:
            raise FluidError(
                f"{where} was computed with another feature extractor ({theirs.get('name')}); remake it with --make-ref"
            )


def make_reference(ref_images: Path, list_path: Path | None, stats_path: Path | None, mode: str, fe, fe_ident: dict,
                   feats_kw: dict) -> tuple[object, object, dict]:  # fmt: skip
    """Stats of the real images, reused from the cache file when its identity matches."""
    files, source = _source(ref_images, list_path)
    key = hashlib.sha256(json.dumps([source, mode, fe_ident], sort_keys=True).encode()).hexdigest()
    path = Path(stats_path) if stats_path else _cache_dir() / f"{key[:20]}.npz"
    if path.is_file():
        mu, sigma, meta = F.load_stats(path)
        if meta.get("key") == key:
            log.info("reference stats: reusing %s", path)
            return (
                mu,
                sigma,
                {"kind": "stats", "path": str(path), "sha256": F.sha256_file(path), **_src(meta)},
            )
    log.info("reference stats: %d real images from %s", len(files), ref_images)
    mu, sigma = F.feature_stats(F.image_features(files, fe, mode, desc="reference", **feats_kw))
    meta = {"key": key, "mode": mode, "feature_extractor": fe_ident, "source": source, "count": len(files)}
    F.save_stats(path, mu, sigma, meta)
    return mu, sigma, {"kind": "stats", "path": str(path), "sha256": F.sha256_file(path), **_src(meta)}


def _src(meta: dict) -> dict:
    return {"count": meta.get("count"), "source": meta.get("source")}


def _expected(expect_count: int | None, list_rows: list | None, ref_meta: dict) -> int | None:
    if expect_count is not None:
        return expect_count
    if list_rows is not None:
        return len(list_rows)
    src = ref_meta.get("source") or {}
    return src.get("count") if src.get("kind") == "list" else None


def _check_ref_args(ref: Path | None, ref_images: Path | None, make_ref: bool) -> None:
    """Reference options that cannot work, refused before any image or model is touched."""
    if make_ref:
        if ref_images is None:
            raise FluidError("--make-ref needs --ref-images DIR (the real images, e.g. COCO train2014/)")
        if ref is not None and Path(ref).suffix != ".npz":
            raise FluidError(f"with --make-ref, --ref {ref} is the stats file to write: give it a .npz name")
    elif ref is None:
        raise FluidError(
            "no reference: pass --ref STATS.npz or --ref DIR, or --make-ref --ref-images DIR [--ref-list LIST]"
        )
    elif not Path(ref).exists():
        raise FluidError(f"--ref {ref} does not exist; pass a stats .npz or a folder of real images")


def _reference(a: dict, mode: str, fe, fe_ident: dict, feats_kw: dict, list_info: dict | None):
    """(mu, sigma, identity) of the reference named by --ref / --make-ref."""
    if a["make_ref"]:
        return make_reference(a["ref_images"], a["ref_list"], a["ref"], mode, fe, fe_ident, feats_kw)
    ref = Path(a["ref"])
    if ref.is_dir():
        files, source = _source(ref, None)
        mu, sigma = F.feature_stats(F.image_features(files, fe, mode, desc="reference", **feats_kw))
        return mu, sigma, {"kind": "folder", **source}
    mu, sigma, meta = F.load_stats(ref)
    _check_meta(meta, mode, fe_ident, ref)
    src = meta.get("source") or {}
    if list_info and src.get("sha256") not in (None, list_info["sha256"]):
        raise FluidError(
            f"{ref} was made from another list than {list_info['path']} (sha256 differs); remake it with --make-ref"
        )
    return mu, sigma, {"kind": "stats", "path": str(ref), "sha256": F.sha256_file(ref), **_src(meta)}


def run_eval_fid(settings: EvalFidSettings, feature_extractor=None, extractor_name: str = "custom") -> dict:
    """The stage behind `fluid eval-fid`. `feature_extractor` replaces Inception (tests, research)."""
    images, ref, ref_images, ref_list = settings.images, settings.ref, settings.ref_images, settings.ref_list
    make_ref, out, run_dir, mode = settings.make_ref, settings.out, settings.run_dir, settings.mode
    inception, expect_count, step, device = (
        settings.inception,
        settings.expect_count,
        settings.step,
        settings.device,
    )
    batch_size, workers = settings.batch_size, settings.workers
    t0 = time.perf_counter()
    list_rows, list_info = None, None
    if ref_list is not None:
        list_rows, sha = read_list(ref_list)
        list_info = {"path": str(ref_list), "sha256": sha, "count": len(list_rows)}
    _check_ref_args(ref, ref_images, make_ref)
    gen = read_generated(images) if images is not None else None
    ref_meta = F.load_stats(ref)[2] if ref is not None and Path(ref).is_file() and not make_ref else {}
    expected = _expected(expect_count, list_rows, ref_meta)
    if gen is not None and expected is not None and len(gen.files) != expected:
        why = "--expect-count" if expect_count is not None else "the reference list"
        raise FluidError(
            f"{gen.folder} holds {len(gen.files)} images, {why} expects {expected}; generate exactly one image per caption"
        )
    captions_checked = bool(gen and list_rows and check_captions(gen, list_rows, ref_list))
    if feature_extractor is None:  # checks the weights file before torch or clean-fid is imported
        F.inception_path(mode, inception)
        dev = F.resolve_device(device)
        feature_extractor, fe_ident = F.inception_extractor(mode, inception, dev)
    else:
        dev, fe_ident = F.resolve_device(device), {"name": extractor_name}
    kw = {"device": dev, "batch_size": batch_size, "workers": workers}
    a = {"make_ref": make_ref, "ref": ref, "ref_images": ref_images, "ref_list": ref_list}
    mu_r, sigma_r, ref_ident = _reference(a, mode, feature_extractor, fe_ident, kw, list_info)
    if gen is None:
        return {
            "metric": "fid-reference",
            "reference": ref_ident,
            "mode": mode,
            "feature_extractor": fe_ident,
        }
    mu, sigma = F.feature_stats(F.image_features(gen.files, feature_extractor, mode, desc="generated", **kw))
    result = {"metric": "fid", "fid": F.frechet_distance(mu, sigma, mu_r, sigma_r),
              "step": step if step is not None else gen.step, "count": len(gen.files),
              "resolution": f"{gen.size[0]}x{gen.size[1]}", "mode": mode, "feature_extractor": fe_ident,
              "reference": ref_ident, "reference_list": list_info, "captions_checked": captions_checked,
              "images": str(gen.folder), "checkpoint": gen.checkpoint, "versions": _versions(),
              "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    result["path"] = str(write_result(result, Path(out) if out else gen.folder / "fid.json", run_dir))
    return result


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fluid-cli", "clean-fid", "torch", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_result(result: dict, out: Path, run_dir: Path | None) -> Path:
    """The result JSON at `out`, and RUN/eval/fid-step<N>.json (fid.json when the step is unknown)."""
    targets = [out]
    if run_dir is not None:
        name = f"fid-step{result['step']}.json" if result.get("step") is not None else "fid.json"
        targets.append(Path(run_dir) / "eval" / name)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return out
