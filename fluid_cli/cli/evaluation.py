"""Evaluation commands: `fluid coco-30k`, `fluid eval-fid`, `fluid eval-geneval` (docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, existing, finite, one_of, writable_dir, writable_file
from fluid_cli.config import CfgSchedule, Device, FidMode, Weights
from fluid_cli.settings import EvalFidSettings, GenevalSettings, SampleSettings

F, G, S = EvalFidSettings, GenevalSettings, SampleSettings  # the defaults below
_STEP_HELP = "Checkpoint step to record (default: from the samples manifest)."


@app.command("coco-30k")
def coco_30k_cmd(
    captions: Path = typer.Argument(
        ..., help="COCO captions JSON, e.g. annotations/captions_train2014.json."
    ),
    out: Path = typer.Option(
        ..., "--out", help="The list (.jsonl); .txt, .coco.json and .meta.json are written beside it."
    ),
    count: int = typer.Option(30000, "--count", help="Images (one caption each); the paper: 30000."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the draw (a sha256 rule: the same list on any machine)."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the meta record (count, seed, sha256s) as JSON."
    ),
) -> None:
    """Draw the FID-30K caption list from COCO 2014 train: one seeded caption per image. Prints the list path.

    Then: fluid sample CKPT --prompts OUT.txt --out samples/ ; fluid eval-fid samples/ --make-ref
    --ref-images train2014/ --ref-list OUT.jsonl. Protocol: docs/evaluation.md.
    """
    at_least(1, count=count)
    existing(captions, "CAPTIONS", folder=False)
    writable_file(out)
    import json

    from fluid_cli.eval.coco_prompts import write_coco_prompts

    meta = write_coco_prompts(captions, out, count, seed)
    typer.echo(json.dumps(meta) if json_out else str(out))


@app.command("eval-fid")
def eval_fid_cmd(
    images: Path | None = typer.Argument(
        None,
        help="Generated images: a folder, or a `fluid sample` dir (its manifest lists the files, step and prompts).",
    ),
    ref: Path | None = typer.Option(
        None,
        "--ref",
        help="Reference: a stats .npz (mu, sigma) or a folder of real images. With --make-ref: where to write the stats (default: ~/.cache/fluid/fid-ref/).",
    ),
    make_ref: bool = typer.Option(
        F.make_ref,
        "--make-ref",
        help="Compute (or reuse the cached) reference stats of --ref-images [--ref-list].",
    ),
    ref_images: Path | None = typer.Option(
        None, "--ref-images", help="Folder of real images for --make-ref (COCO train2014/)."
    ),
    ref_list: Path | None = typer.Option(
        None,
        "--ref-list",
        help="The `fluid coco-30k` list: the reference is its images; generated prompts are checked against it.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Result JSON (default: IMAGES/fid.json)."),
    run: Path | None = typer.Option(
        None, "--run", help="Also write RUN/eval/fid-step<N>.json (read by `fluid fit-scaling`)."
    ),
    mode: str = typer.Option(F.mode, "--mode", help=f"{one_of(FidMode)} (clean-fid's resize modes)."),
    inception: Path | None = typer.Option(
        None,
        "--inception",
        help="Inception weights file (or dir holding it); default: clean-fid's cache (/tmp/inception-2015-12-05.pt). Never downloaded.",
    ),
    expect_count: int | None = typer.Option(
        None,
        "--expect-count",
        help="Refuse unless there are exactly this many images (default: the reference list's count).",
    ),
    step: int | None = typer.Option(None, "--step", help=_STEP_HELP),
    batch_size: int = typer.Option(F.batch_size, "--batch-size", help="Images per feature batch."),
    workers: int = typer.Option(
        F.workers, "--workers", help="DataLoader workers that decode and resize (0: in process)."
    ),
    device: str = typer.Option(F.device, help=f"{one_of(Device)}."),
    json_out: bool = typer.Option(False, "--json", help="Print the result JSON instead of its path."),
) -> None:
    """FID of generated images against reference statistics (clean-fid). Prints the result path.

    Example (the paper's FID-30K): fluid eval-fid samples/ --make-ref --ref-images train2014/
    --ref-list coco30k.jsonl --run runs/fluid-1.1b
    """
    at_least(1, batch_size=batch_size, expect_count=expect_count)
    at_least(0, workers=workers, step=step)
    existing(images, "IMAGES", folder=True)
    existing(ref_images, "--ref-images", folder=True)
    existing(ref_list, "--ref-list", folder=False)
    writable_dir(run, "--run")
    if not make_ref:
        existing(ref, "--ref")
    writable_file(out)
    settings = EvalFidSettings(
        images=images, ref=ref, ref_images=ref_images, ref_list=ref_list, make_ref=make_ref, out=out, run_dir=run,
        mode=mode, inception=inception, expect_count=expect_count, step=step, batch_size=batch_size,
        device=device, workers=workers,
    )  # fmt: skip
    import json

    from fluid_cli.eval.fid_run import run_eval_fid

    r = run_eval_fid(settings)
    typer.echo(json.dumps(r) if json_out else r.get("path") or r["reference"]["path"])


@app.command("eval-geneval")
def eval_geneval_cmd(
    checkpoint: Path | None = typer.Argument(
        None, help="A run dir or checkpoint dir to generate 4 images per prompt with (or use --images)."
    ),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Score an existing GenEval folder (<DIR>/00000/metadata.jsonl, samples/0000.png) from any generator.",
    ),
    out: Path | None = typer.Option(None, "--out", help="With CHECKPOINT: the GenEval folder to write."),
    run: Path | None = typer.Option(
        None, "--run", help="Also write RUN/eval/geneval-step<N>.json (read by `fluid fit-scaling`)."
    ),
    detector: str = typer.Option(
        G.detector,
        "--detector",
        help="Mask2Former hub id or local dir; py:MODULE:FUNCTION, a factory FUNCTION(classes) -> detector(image) -> [Detection]; or `shapes` (the shapes world's exact detector and pixel colours: shapes-GenEval).",
    ),
    clip: str = typer.Option(
        G.clip,
        "--clip",
        help="CLIP hub id or local dir; or py:MODULE:FUNCTION, a factory FUNCTION() -> classify(crops, class) -> colours.",
    ),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="A GenEval-schema metadata .jsonl to use instead of the 553 GenEval prompts (e.g. shapes-data's heldout.jsonl).",
    ),
    allow_incomplete: bool = typer.Option(
        G.allow_incomplete,
        "--allow-incomplete",
        help="Score a set with fewer than 553 x 4 images (flagged in the result).",
    ),
    step: int | None = typer.Option(None, "--step", help=_STEP_HELP),
    seed: int = typer.Option(G.seed, help="Sampling seed."),
    batch_size: int = typer.Option(G.batch_size, "--batch-size", help="Sampling batch size."),
    steps: int = typer.Option(S.steps, "--steps", help="Random-order steps K."),
    diffusion_steps: int = typer.Option(
        S.diffusion_steps, "--diffusion-steps", help="Diffusion steps S per token."
    ),
    cfg: float = typer.Option(S.cfg, "--cfg", help="Classifier-free guidance scale."),
    cfg_schedule: str = typer.Option(S.cfg_schedule, "--cfg-schedule", help=f"{one_of(CfgSchedule)}."),
    temperature: float = typer.Option(S.temperature, help="Sampling temperature."),
    text_embeddings: Path | None = typer.Option(
        None,
        "--text-embeddings",
        help="A `fluid encode-text` artifact holding the 553 prompts (instead of running T5).",
    ),
    weights: str = typer.Option(G.weights, help=f"{one_of(Weights)}."),
    device: str = typer.Option(G.device, help=f"{one_of(Device)} (sampling, detector and CLIP)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the result JSON instead of the table and path."
    ),
) -> None:
    """GenEval: generate (or take) 4 images per prompt and score them with the benchmark's rules.

    Prints the result path (a per-tag table goes to stderr). Rules and weights: docs/evaluation.md.
    Example: fluid eval-geneval runs/fluid-1.1b --out geneval/ --run runs/fluid-1.1b
    """
    at_least(1, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps)
    at_least(0, step=step)
    finite(0.0, cfg=cfg, temperature=temperature)
    existing(images, "--images", folder=True)
    existing(prompts, "--prompts", folder=False)
    writable_dir(run, "--run")
    existing(text_embeddings, "--text-embeddings", folder=True)
    writable_dir(out)
    sampling = SampleSettings(steps=steps, diffusion_steps=diffusion_steps, cfg=cfg, cfg_schedule=cfg_schedule,
                              temperature=temperature)  # fmt: skip
    settings = GenevalSettings(
        checkpoint=checkpoint, images=images, out=out, run_dir=run, detector=detector, clip=clip, prompts=prompts,
        allow_incomplete=allow_incomplete, step=step, device=device, sampling=sampling, seed=seed,
        batch_size=batch_size, text_embeddings=text_embeddings, weights=weights,
    )  # fmt: skip
    import json

    from fluid_cli.eval.geneval_run import print_table, run_eval_geneval

    r = run_eval_geneval(settings)
    if json_out:
        typer.echo(json.dumps(r))
    else:
        print_table(r)
        typer.echo(r["path"])
