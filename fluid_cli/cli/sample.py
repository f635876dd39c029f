"""`fluid sample`: a checkpoint and prompts -> PNGs and a manifest.

Every option's default is read from SampleSettings (what changes the images) or SampleRunSettings
(the rest), in fluid_cli/settings.py: a new sampling option is a field there and an option here.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, existing, finite, need, one_of, writable_dir
from fluid_cli.config import CfgSchedule, Device, DiscreteOrder, HeadTokens, Sampler, Weights
from fluid_cli.settings import SampleRunSettings, SampleSettings

S, R = SampleSettings, SampleRunSettings  # the defaults below


@app.command("sample")
def sample_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="A run dir (its latest committed checkpoint) or a checkpoint dir."
    ),
    prompts: str | None = typer.Option(
        None, "--prompts", help="Prompts file, one per line (- = stdin). Prompt index = line number - 1."
    ),
    prompt: list[str] | None = typer.Option(
        None, "--prompt", help="A prompt (repeatable); instead of --prompts."
    ),
    out: Path = typer.Option(..., "--out", help="Output dir: PNGs, samples.jsonl, grid.png."),
    seed: int = typer.Option(
        R.seed,
        help="Seed; image (prompt p, image i) is keyed by (seed, p, i), whatever the batch or process.",
    ),
    batch_size: int = typer.Option(
        R.batch_size,
        "--batch-size",
        help="Images per forward. Speed only: images are identical at any batch size.",
    ),
    images_per_prompt: int = typer.Option(
        R.images_per_prompt, "--images-per-prompt", help="Images per prompt."
    ),
    steps: int = typer.Option(
        S.steps,
        "--steps",
        help="K, random-order steps (the paper: 64). Cost is linear in K. Ignored for raster variants, which take one step per token (L).",
    ),
    diffusion_steps: int = typer.Option(
        S.diffusion_steps,
        "--diffusion-steps",
        help="S, diffusion steps per continuous token (the paper: 100, respaced from 1000). Head cost is linear in S.",
    ),
    cfg: float = typer.Option(
        S.cfg,
        "--cfg",
        help="Classifier-free guidance scale; 1 = off. Guidance doubles the backbone and head batch.",
    ),
    cfg_schedule: str = typer.Option(
        S.cfg_schedule,
        "--cfg-schedule",
        help=f"{one_of(CfgSchedule)} (MAR: 1 + (cfg-1) x fraction generated).",
    ),
    temperature: float = typer.Option(
        S.temperature, help="Continuous: scale of the diffusion noise; discrete: logits / T (0 = argmax)."
    ),
    top_k: int = typer.Option(
        S.top_k, "--top-k", help="Discrete: sample among the k most likely codes (0 = all)."
    ),
    sampler: str = typer.Option(
        S.sampler,
        help=f"Per-token diffusion sampler: {one_of(Sampler)} (ddim: eta 0, ignores --temperature).",
    ),
    discrete_order: str = typer.Option(
        S.discrete_order,
        "--discrete-order",
        help=f"rand-disc: {one_of(DiscreteOrder)}. random: the paper; confidence: MaskGIT, keep the most confident draws.",
    ),
    head_tokens: str = typer.Option(
        S.head_tokens,
        "--head-tokens",
        help=f"{one_of(HeadTokens)}. chosen: the head samples only each step's new tokens (S x L per image); all: every token each step (one static shape for XLA, K times the head cost). Same images.",
    ),
    clip_x0: float | None = typer.Option(
        S.clip_x0,
        "--clip-x0",
        help="Continuous: clamp each diffusion step's predicted token to +-VALUE. Default: the training data's latent range (recorded by `fluid train`); 0 = off (MAR's sampler). Keeps short-trained heads from blowing up at t=999.",
    ),
    text_embeddings: Path | None = typer.Option(
        None,
        "--text-embeddings",
        help="A `fluid encode-text` artifact to take the prompts' states from (matched by caption) instead of running the T5 encoder; required for synthetic runs.",
    ),
    grid: bool = typer.Option(
        R.grid, "--grid", help="Also write grid.png, a contact sheet (first 16 prompts x 8 images)."
    ),
    device: str = typer.Option(
        R.device, help=f"{one_of(Device)}. bf16 autocast on accelerators, fp32 on cpu."
    ),
    weights: str = typer.Option(
        R.weights, help=f"{one_of(Weights)}. ema: the paper; model: the raw weights."
    ),
    compile: bool = typer.Option(
        R.compile,
        "--compile",
        help="torch.compile the backbone step (first call compiles for ~30 s; pays on GPUs).",
    ),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Make at most this many new images, then stop (rerun to continue)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the output dir."),
) -> None:
    """Generate images from a checkpoint. Prints the output dir.

    Cost per image (guidance doubles each term; the paper's L = 256 tokens):
    random order ~ K x backbone(L tokens) + S x head(L tokens);
    with --head-tokens all: K x backbone(L tokens) + K x S x head(L tokens);
    raster ~ L x backbone(1 token, KV cache) + L x S x head(1 token).

    Speed knobs: --steps K, --diffusion-steps S, --cfg 1 (no guidance: half
    the work), --batch-size (images do not change), --compile.
    Benchmarks: docs/benchmarks.md. Details: docs/sampling.md.

    A rerun with the same settings skips the images already in samples.jsonl.
    Under torchrun each process takes every world-th image.

    Example: fluid sample runs/fluid-1.1b --prompts prompts.txt --out samples/
    """
    at_least(1, batch_size=batch_size, images_per_prompt=images_per_prompt, steps=steps,
             diffusion_steps=diffusion_steps, max_images=max_images)  # fmt: skip
    at_least(0, top_k=top_k)
    finite(0.0, cfg=cfg, temperature=temperature, clip_x0=clip_x0)
    need(prompts is not None or prompt, "give --prompts FILE or at least one --prompt")
    sampling = SampleSettings(
        steps=steps, diffusion_steps=diffusion_steps, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
        top_k=top_k, sampler=sampler, discrete_order=discrete_order, head_tokens=head_tokens, clip_x0=clip_x0,
    )  # fmt: skip
    run = SampleRunSettings(
        checkpoint=checkpoint, out=out, prompts_file=prompts, prompts=tuple(prompt or ()), sampling=sampling,
        seed=seed, batch_size=batch_size, images_per_prompt=images_per_prompt, text_embeddings=text_embeddings,
        grid=grid, device=device, weights=weights, compile=compile, max_images=max_images,
    )  # fmt: skip
    existing(prompts, "--prompts", folder=False)
    existing(text_embeddings, "--text-embeddings", folder=True)
    writable_dir(out)
    import json

    from fluid_cli.sampling.run import run_sample

    summary = run_sample(run)
    if summary["rank"] == 0:  # under torchrun, one line for the pipeline
        typer.echo(json.dumps(summary) if json_out else summary["out"])
