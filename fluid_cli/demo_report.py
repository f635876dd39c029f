"""The `fluid demo` report: report.md with the shapes-GenEval scores next to the tokenizer's
ceiling, an image grid per tag, the loss curve and the time each stage took (matplotlib Agg, no
display needed); report.json holds the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

GOALS = {"single_object": 0.9, "overall": 0.5}  # the demo's goals for rand-cont in its 15-minute budget


def _grid(paths: list[list[Path]], scale: int = 0, pad: int = 2) -> Image.Image:
    """Rows = prompts, columns = that prompt's images, upscaled with nearest to ~128 px (0: auto)."""
    first = Image.open(paths[0][0])
    scale = scale or max(1, 128 // first.size[0])
    w, h = first.size[0] * scale, first.size[1] * scale
    cols = max(len(r) for r in paths)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, len(paths) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(paths):
        for j, p in enumerate(row):
            img = Image.open(p).convert("RGB").resize((w, h), Image.NEAREST)
            sheet.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
    return sheet


def _loss_plot(run: Path, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(6, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=0.8, alpha=0.6, label="train loss")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", lw=1.5, label="validation loss (fixed keys)")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_title("rand-cont on shapes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _tag_grids(result: dict, root: Path, img_dir: Path, per_tag: int = 6) -> dict[str, tuple[str, list[str]]]:
    by_tag: dict[str, dict[str, list[Path]]] = {}
    for r in result["rows"]:
        prompts = by_tag.setdefault(r["tag"], {})
        if len(prompts) < per_tag or r["prompt"] in prompts:
            prompts.setdefault(r["prompt"], []).append(root / r["folder"] / r["image"])
    out = {}
    for tag, prompts in sorted(by_tag.items()):
        name = f"grid-{tag}.png"
        _grid(list(prompts.values())).save(img_dir / name)
        out[tag] = (name, list(prompts))
    return out


def write_report(
    out: Path, run: Path, data: Path, result: dict, ceiling: dict, timings: dict, total_s: float
) -> Path:
    """report.md and report.json in `out`; `ceiling` is the tokenizer ceiling (same shape as the
    scores: shapes/quality.tokenizer_ceiling)."""
    img_dir = out / "report"
    img_dir.mkdir(exist_ok=True)
    _loss_plot(run, img_dir / "loss.png")
    grids = _tag_grids(result, out / "geneval", img_dir)
    tok = json.loads((out / "tokenizers" / "vae" / "fluid-tokenizer.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    lines = [
        "# fluid demo: rand-cont on the shapes benchmark",
        "",
        f"Model: {cfg['variant']} {cfg['size']}, {cfg['params'] / 1e6:.2f}M parameters; "
        f"{cfg['model']['num_tokens'] if 'num_tokens' in cfg['model'] else cfg['model']['token_grid'][0] * cfg['model']['token_grid'][1]} "
        f"tokens per image. VAE reconstruction PSNR {tok['psnr_db']:.2f} dB. Total {total_s / 60:.1f} min.",
        "",
        f"## shapes-GenEval ({result['images']} images of the evaluation prompts)",
        "",
        "Tokenizer ceiling: what the detector scores on the tokenizer's reconstructions of "
        f"{ceiling['images']} training images, the best any generator could reach through it.",
        "",
        "| tag | images | score | tokenizer ceiling | goal |",
        "|---|---|---|---|---|",
    ]
    counts, ceil_tags = result.get("counts", {}), {**ceiling["tags"], "overall": ceiling["overall"]}
    for tag, score in {**result["tags"], "overall": result["overall"]}.items():
        goal = GOALS.get(tag)
        mark = "" if goal is None else f">= {goal} {'(met)' if score >= goal else '(not met)'}"
        n = counts.get(tag, {}).get("images", result["images"])
        top = ceil_tags.get(tag)
        lines.append(f"| {tag} | {n} | {score:.3f} | {'' if top is None else f'{top:.3f}'} | {mark} |")
    objects = result.get("objects")
    if objects:  # GenEval passes crowded images on most tags: say how many objects were drawn
        lines += [
            "",
            f"Objects per image: {objects['drawn_mean']:.2f} drawn, {objects['asked_mean']:.2f} asked; "
            f"{objects['exact']:.0%} of the images hold exactly the asked number "
            "(GenEval's rules pass extra objects on every tag but counting).",
        ]
    lines += ["", "## Loss", "", "![loss](report/loss.png)", "", "## Samples per tag", ""]
    for tag, (name, prompts) in grids.items():
        lines += [
            f"### {tag}",
            "",
            f"![{tag}](report/{name})",
            "",
            "Rows, top to bottom: " + "; ".join(f'"{p}"' for p in prompts),
            "",
        ]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "scores": {k: v for k, v in result.items() if k != "rows"},
                "tokenizer_ceiling": ceiling,
                "timings": timings,
                "total_s": total_s,
            },
            indent=1,
        )
        + "\n"
    )
    return path
