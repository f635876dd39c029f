"""`fluid models` and `fluid train`: the registry's table, and training from a recipe.

Each training flag sets one recipe key (RECIPE_KEYS); a flag left out keeps the recipe's value.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, existing, one_of, writable_dir
from fluid_cli.config import Device
from fluid_cli.registry import SIZES, VARIANTS

# training flag -> the recipe key it sets (precedence: recipe < flags < --set; config.resolve)
RECIPE_KEYS = {
    "variant": "model.variant",
    "size": "model.size",
    "image_tokens": "data.image_tokens",
    "text": "data.text",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "ckpt_every": "train.ckpt_every",
    "val_every": "train.val_every",
    "seed": "train.seed",
    "device": "runtime.device",
}


def recipe_flags(given: dict) -> dict[str, dict]:
    """The training flags as recipe overrides: {'train': {'steps': 7, ...}} (None: not given)."""
    flags: dict[str, dict] = {}
    for name, key in RECIPE_KEYS.items():
        section, field = key.split(".")
        value = given[name]
        flags.setdefault(section, {})[field] = str(value) if isinstance(value, Path) and value else value
    return flags


def _key(name: str, text: str = "") -> str:
    """Help naming the recipe key a flag sets: 'Training steps (train.steps).'"""
    return f"{text} ({RECIPE_KEYS[name]})." if text else f"({RECIPE_KEYS[name]})."


@app.command("models")
def models_cmd(
    json_out: bool = typer.Option(
        False, "--json", help="Print JSON (one object per variant x size) instead of a table."
    ),
    variant: str | None = typer.Option(None, help="Only this variant."),
) -> None:
    """List every variant x size in the registry with its parameter count and FLOPs per image.

    Counts are computed on the meta device (no weights are allocated) at the paper's data shapes:
    256 tokens of 16 channels or a 8192-code vocabulary, T5-XXL text (4096 wide, 128 tokens).
    """
    from fluid_cli.models.table import model_rows, print_table

    rows = model_rows(variant)
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=1))
    else:
        print_table(rows)


@app.command("train")
def train_cmd(
    variant: str | None = typer.Option(None, help=_key("variant", " | ".join(VARIANTS))),
    size: str | None = typer.Option(None, help=_key("size", " | ".join(SIZES))),
    image_tokens: Path | None = typer.Option(
        None, "--image-tokens", help="Image-token artifact dir from `fluid tokenize`."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="Text-embedding artifact dir from `fluid encode-text`."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: config.json, metrics.jsonl, checkpoints/."),
    recipe: Path | None = typer.Option(None, "--recipe", help="TOML recipe (see recipes/)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: section.key=value (repeatable)."
    ),
    steps: int | None = typer.Option(None, help=_key("steps", "Training steps")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_key("batch_size", "Global batch size")),
    ckpt_every: int | None = typer.Option(
        None, "--ckpt-every", help=_key("ckpt_every", "Save a checkpoint every N steps")
    ),
    val_every: int | None = typer.Option(
        None, "--val-every", help=_key("val_every", "Validation loss every N steps")
    ),
    seed: int | None = typer.Option(None, help=_key("seed", "Seed of the data order, masks, noise and init")),
    device: str | None = typer.Option(None, help=_key("device", one_of(Device))),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the run's latest committed checkpoint."
    ),
) -> None:
    """Train a model on precomputed image tokens and text embeddings. Prints the run directory.

    Example: fluid train --variant rand-cont --size 1.1b --recipe recipes/rand-cont-1.1b.toml
    --image-tokens data/webli-latents --text data/webli-t5 --out runs/fluid-1.1b
    """
    at_least(1, steps=steps, batch_size=batch_size)
    at_least(0, ckpt_every=ckpt_every, val_every=val_every)
    existing(recipe, "--recipe", folder=False)
    writable_dir(out)
    from fluid_cli.config import resolve
    from fluid_cli.train import loop, state

    given = {"variant": variant, "size": size, "image_tokens": image_tokens, "text": text, "steps": steps,
             "batch_size": batch_size, "ckpt_every": ckpt_every, "val_every": val_every, "seed": seed,
             "device": device}  # fmt: skip
    r = resolve(recipe, recipe_flags(given), set_)
    train_state = state.build(r, out, resume)
    out_dir = loop.run(train_state)
    if train_state.dist.main:  # under torchrun, one line on stdout for pipelines
        typer.echo(str(out_dir))
