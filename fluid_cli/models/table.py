"""The rows of `fluid models`: parameter counts (meta device, nothing allocated) and FLOPs per image."""

from __future__ import annotations

import sys

import torch

from fluid_cli.models.config import ModelConfig
from fluid_cli.models.flops import train_flops_per_image
from fluid_cli.registry import SIZES, VARIANTS, get_variant


def count_params(cfg: ModelConfig) -> int:
    from fluid_cli.models.fluid_model import FluidModel

    with torch.device("meta"):
        model = FluidModel(cfg)
    return sum(p.numel() for p in model.parameters())


def model_rows(variant: str | None = None) -> list[dict]:
    variants = [get_variant(variant).name] if variant else list(VARIANTS)
    rows = []
    for v in variants:
        for s in SIZES.values():
            cfg = ModelConfig.build(v, s.name)
            n = count_params(cfg)
            nominal = s.nominal_params
            rows.append(
                {
                    "variant": v,
                    "size": s.name,
                    "depth": s.depth,
                    "width": s.width,
                    "heads": s.heads,
                    "params": n,
                    "nominal_params": nominal,
                    "rel_diff": None if nominal is None else (n - nominal) / nominal,
                    "train_gflops_per_image": train_flops_per_image(cfg) / 1e9,
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fluid models (paper data shapes: 256 tokens, T5-XXL 4096 x 128)")
    for col in ("variant", "size", "blocks", "width", "heads", "params", "paper", "diff", "train GFLOPs/img"):
        table.add_column(col, justify="right" if col not in ("variant", "size") else "left")
    for r in rows:
        paper = "-" if r["nominal_params"] is None else f"{r['nominal_params'] / 1e6:,.0f}M"
        diff = "-" if r["rel_diff"] is None else f"{r['rel_diff']:+.1%}"
        table.add_row(
            r["variant"],
            r["size"],
            str(r["depth"]),
            str(r["width"]),
            str(r["heads"]),
            f"{r['params'] / 1e6:,.1f}M",
            paper,
            diff,
            f"{r['train_gflops_per_image']:,.1f}",
        )
    Console(file=sys.stdout, width=120).print(table)
