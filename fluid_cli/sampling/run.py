"""`fluid sample`: a checkpoint + prompts -> PNGs, a JSONL manifest, and optionally a contact sheet.

    OUT/p{prompt:06d}_i{image:03d}.png   one per (prompt index, image index)
    OUT/samples.jsonl                    one line per image: prompt, indices, seed, settings, checkpoint, step
    OUT/grid.png                         --grid: the first prompts x images as one sheet
Work item i = (prompt, image) goes to rank i % world under torchrun. A PNG is written under a temp
name and renamed, and its manifest line is appended after, so a killed run leaves no half image; a
rerun skips the images its manifest lists and makes the same images for the rest (every draw is keyed
by (seed, prompt index, image index); bit for bit at the same batch size, else up to float
rounding). Samples made with other settings in the same OUT are refused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fluid_cli import backend
from fluid_cli.errors import FluidError
from fluid_cli.models import keyed_random as kr
from fluid_cli.models.config import ModelConfig
from fluid_cli.models.fluid_model import FluidModel
from fluid_cli.sampling import SampleSettings, generate, num_steps
from fluid_cli.sampling.decode import ImageDecoder, embed_from_artifact, embed_live, text_batch
from fluid_cli.sampling.prompts import read_prompts
from fluid_cli.sampling.schedule import mask_schedule
from fluid_cli.settings import SampleRunSettings
from fluid_cli.train import checkpoint as ckpt

log = logging.getLogger(__name__)
MANIFEST = "samples.jsonl"
GRID = "grid.png"
GRID_PROMPTS, GRID_IMAGES = 16, 8  # the sheet shows at most this many prompts x images


def image_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:06d}_i{image_index:03d}.png"


def check_settings(s: SampleSettings, mcfg: ModelConfig, batch_size: int, images_per_prompt: int) -> None:
    problems = []
    if s.steps < 1 or batch_size < 1 or images_per_prompt < 1:
        problems.append("--steps, --batch-size and --images-per-prompt must be at least 1")
    if not 1 <= s.diffusion_steps <= mcfg.diffusion_steps:
        problems.append(f"--diffusion-steps must be in 1..{mcfg.diffusion_steps} (the training schedule)")
    if s.cfg < 0 or s.temperature < 0 or s.top_k < 0:
        problems.append("--cfg, --temperature and --top-k must not be negative")
    if problems:
        raise FluidError("; ".join(problems))


def steps_used(mcfg: ModelConfig, s: SampleSettings) -> int:
    """Backbone passes per image: the random-order steps that predict at least one token (K > L
    leaves some empty), or one per token for raster. Recorded as `steps_used` in samples.jsonl."""
    if not mcfg.random_order:
        return mcfg.num_tokens
    counts = mask_schedule(mcfg.num_tokens, s.steps)
    return sum(1 for a, b in zip(counts[:-1], counts[1:], strict=True) if a > b)


def load_model(checkpoint: str | Path, weights: str, device: torch.device) -> tuple[FluidModel, dict]:
    """The model of a run dir or checkpoint with its EMA (or raw) weights, in eval mode on `device`,
    and the checkpoint's config."""
    if weights not in ("ema", "model"):
        raise FluidError(f"--weights {weights!r} is not one of ema, model")
    ckpt_dir = ckpt.resolve(checkpoint)
    config = ckpt.load_config(ckpt_dir)
    mcfg = ModelConfig.from_dict(config["model"])
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = FluidModel(mcfg)
    state = ckpt.load_weights(ckpt_dir, weights)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise FluidError(
            f"checkpoint {ckpt_dir} does not match its config.json: {str(e).splitlines()[0]}"
        ) from None
    return model.to(device).eval().requires_grad_(False), config


def read_manifest(out: Path, identity: dict) -> set[tuple[int, int]]:
    """(prompt, image) pairs already done (listed and on disk); refuses samples of other settings."""
    path = out / MANIFEST
    done: set[tuple[int, int]] = set()
    if not path.is_file():
        return done
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: its image is simply made again
            log.warning("%s:%d: unreadable line ignored", path, no)
            continue
        diff = [k for k, v in identity.items() if row.get(k) != v]
        if diff:
            raise FluidError(
                f"{out} already holds samples made with other {', '.join(diff)} ({path}:{no}); "
                "use a new --out, or the same settings to continue"
            )
        if _intact(out / row["file"]):
            done.add((int(row["prompt_index"]), int(row["image_index"])))
        elif (out / row["file"]).is_file():
            log.warning("%s is damaged (truncated or changed); it is made again", out / row["file"])
    return done


def _intact(path: Path) -> bool:
    """The PNG exists, is complete and every chunk's CRC matches (PIL's verify: catches a truncated
    file or any changed byte without inflating the pixels; 0.2 ms for 256 px here, 5 ms to decode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)  # never a half-written PNG under the final name


def append_line(path: Path, row: dict) -> None:
    # one O_APPEND write per line: lines of several processes do not interleave (local filesystems)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def write_grid(out: Path) -> Path | None:
    """A contact sheet of the manifest's images: a row per prompt (the first GRID_PROMPTS)."""
    from PIL import Image

    rows = [json.loads(ln) for ln in (out / MANIFEST).read_text(encoding="utf-8").splitlines() if ln.strip()]
    by_prompt: dict[int, dict[int, str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], {})[r["image_index"]] = r["file"]
    prompts = sorted(by_prompt)[:GRID_PROMPTS]
    if not prompts:
        return None
    cols = min(GRID_IMAGES, max(len(v) for v in by_prompt.values()))
    first = Image.open(out / next(iter(by_prompt[prompts[0]].values())))
    w, h, gap = first.width, first.height, 2
    sheet = Image.new("RGB", (cols * (w + gap) + gap, len(prompts) * (h + gap) + gap), (255, 255, 255))
    for y, p in enumerate(prompts):
        for x, i in enumerate(sorted(by_prompt[p])[:cols]):
            with Image.open(out / by_prompt[p][i]) as im:
                sheet.paste(im.convert("RGB"), (gap + x * (w + gap), gap + y * (h + gap)))
    path = out / GRID
    write_png(path, np.asarray(sheet))
    return path


class _Progress:
    """Images done and the steps of the batch in flight, on stderr (rank 0 only)."""

    def __init__(self, images: int, steps: int, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=Console(file=sys.stderr), disable=not enabled)  # fmt: skip
        self.images = self.p.add_task("images", total=images)
        self.steps = self.p.add_task("steps", total=steps)

    def step(self) -> None:
        self.p.advance(self.steps)

    def batch_start(self) -> None:  # reset here, not after a batch: the last batch ends at K/K
        self.p.reset(self.steps)

    def batch_done(self, n: int) -> None:
        self.p.advance(self.images, n)


def _check_text_artifact(path: str | Path) -> None:
    """The --text-embeddings artifact as the manifest describes it (sha256 on first use, recorded),
    checked before the checkpoint is loaded: a damaged shard is refused by name, not sampled from."""
    from fluid_cli.artifact import Artifact

    art = Artifact.open(path, "text-embeddings", what="--text-embeddings")
    bad = art.problems()[0]
    if bad:
        i, why = min(bad.items())
        raise FluidError(
            f"{art.describe_shard(i)}: {why}; re-run `fluid encode-text` with the same --out "
            "(it redoes just the damaged shards), then `fluid verify` it"
        )


def _embeddings(prompts, text_embeddings, config, mcfg, device):
    if text_embeddings:
        return embed_from_artifact(str(text_embeddings), prompts, mcfg)
    return embed_live(config["data"]["text"]["encoder"], prompts, mcfg, device)


@dataclass(frozen=True)
class _Loaded:
    """What every batch of a run needs, resolved once: the checkpoint, its config, the device, the
    process split and the manifest identity each image line repeats."""

    ckpt_dir: Path
    config: dict
    mcfg: ModelConfig
    device: torch.device
    dist: backend.Dist
    identity: dict


def run_sample(run: SampleRunSettings) -> dict:
    """The stage behind `fluid sample`; returns a summary (printed with --json)."""
    t0 = time.perf_counter()
    ckpt_dir = ckpt.resolve(run.checkpoint).resolve()
    config = ckpt.load_config(ckpt_dir)
    mcfg = ModelConfig.from_dict(config["model"])
    settings = run.sampling
    if settings.clip_x0 is None:  # the data's latent range, recorded by `fluid train` (0: none recorded)
        settings = replace(settings, clip_x0=float(config["data"].get("latent_abs_max") or 0.0))
    run = replace(run, sampling=settings)
    check_settings(settings, mcfg, run.batch_size, run.images_per_prompt)
    ckpt.check_weights(ckpt_dir, run.weights)  # a damaged checkpoint is named now, not after text encoding
    if run.text_embeddings:
        _check_text_artifact(run.text_embeddings)
    prompts, bad = read_prompts(run.prompts_file, list(run.prompts))
    dist = backend.init_distributed(run.device)
    dev = backend.resolve_device(run.device, dist.local_rank)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"seed": run.seed, "settings": settings.to_dict(), "checkpoint": str(ckpt_dir),
                "step": config.get("step"), "weights": run.weights}  # fmt: skip
    done = read_manifest(out, identity)
    items = [(p, i) for p in prompts for i in range(run.images_per_prompt)]
    mine = [it for n, it in enumerate(items) if n % dist.world == dist.rank]
    todo = [(p, i) for p, i in mine if (p.index, i) not in done]
    pending = todo[: run.max_images]  # --max-images: a time-boxed job; a rerun continues
    written = 0
    if pending:
        written = _generate(pending, run, _Loaded(ckpt_dir, config, mcfg, dev, dist, identity))
    backend.barrier(dist)
    grid_path = write_grid(out) if run.grid and dist.main and (out / MANIFEST).is_file() else None
    secs = time.perf_counter() - t0
    return {
        "out": str(out),
        "manifest": str(out / MANIFEST),
        "written": written,
        "already_done": len(mine) - len(todo),
        "left": len(todo) - len(pending),
        "skipped_prompt_lines": bad,
        "grid": str(grid_path) if grid_path else None,
        "seconds": round(secs, 3),
        "images_per_s": round(written / secs, 4) if written else 0.0,
        "rank": dist.rank,
        "world": dist.world,
    }


def _generate(pending: list, run: SampleRunSettings, at: _Loaded) -> int:
    """Generate and write the pending (prompt, image) items in batches; returns images written."""
    settings, mcfg, dev, out = run.sampling, at.mcfg, at.device, Path(run.out)
    uniq = list({p.index: p for p, _ in pending}.values())
    states = _embeddings(uniq, run.text_embeddings, at.config, mcfg, dev)
    pending = [(p, i) for p, i in pending if p.index in states]  # prompts missing in an artifact: warned
    model, _ = load_model(at.ckpt_dir, run.weights, dev)
    if run.compile and model.cfg.random_order:  # every step's backbone call; the first compiles (~30 s)
        model.backbone = torch.compile(model.backbone)
    elif run.compile:
        log.warning("--compile: raster sampling runs eagerly (its KV-cache step changes shape every token)")
    decoder = ImageDecoder(at.config["data"]["image_tokens"], mcfg, dev)
    amp = backend.autocast_dtype(dev)
    progress = _Progress(len(pending), num_steps(model, settings), at.dist.main)
    used = steps_used(mcfg, settings)
    if mcfg.random_order and settings.steps > used:
        log.warning("--steps %d: the model has %d tokens, so %d steps predict tokens (the rest change nothing)",
                    settings.steps, mcfg.num_tokens, used)  # fmt: skip
    written = 0
    with progress.p:
        for a in range(0, len(pending), run.batch_size):
            chunk = pending[a : a + run.batch_size]
            text, mask = text_batch([states[p.index] for p, _ in chunk], mcfg.text_len, dev)
            idx = torch.tensor([[p.index, i] for p, i in chunk], dtype=torch.int64)
            keys = kr.make_keys(run.seed, idx[:, 0], idx[:, 1]).to(dev)
            progress.batch_start()
            with backend.autocast(dev, amp):
                tokens = generate(model, text, mask, keys, settings, on_step=progress.step)
            images = decoder(tokens)
            for (p, i), image in zip(chunk, images, strict=True):
                name = image_name(p.index, i)
                write_png(out / name, image)
                append_line(out / MANIFEST, {"file": name, "prompt": p.text, "prompt_index": p.index,
                                             "image_index": i, **at.identity, "steps_used": used})  # fmt: skip
            written += len(chunk)
            progress.batch_done(len(chunk))
    return written
