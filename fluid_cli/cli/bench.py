"""`fluid bench train` and `fluid bench sample`: throughput on random data."""

from __future__ import annotations

import typer

from fluid_cli.cli.app import app
from fluid_cli.cli.checks import at_least, finite, one_of
from fluid_cli.config import Device, HeadTokens, Precision
from fluid_cli.settings import SampleSettings

bench_app = typer.Typer(
    help="Throughput benchmarks (images/s, tokens/s, TFLOP/s, MFU) on random data.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
_PRECISION_HELP = f"{one_of(Precision)} (auto: bf16 on accelerators, fp32 on cpu)."
S = SampleSettings  # the sampling defaults


@bench_app.command("train")
def bench_train_cmd(
    variant: str = typer.Option("rand-cont", help="Registry variant."),
    size: str = typer.Option("166m", help="Registry size."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per step (one process)."),
    steps: int = typer.Option(5, help="Timed steps (after 2 warm-up steps)."),
    device: str = typer.Option("auto", help=f"{one_of(Device)}."),
    precision: str = typer.Option("auto", help=_PRECISION_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing", help="Recompute each block in backward (less memory)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Training throughput at the paper's data shapes (256 tokens, T5-XXL 4096 x 128).

    Reports steps/s, images/s, tokens/s, TFLOP/s and MFU (analytic model FLOPs x3 against the
    device's bf16 peak), the FLOPs per image counted by torch's FLOP counter next to the analytic
    ones, and peak memory. One process; see docs/scale.md for multi-GPU and TPU runs.
    """
    at_least(1, batch_size=batch_size, steps=steps)
    import json

    from fluid_cli.bench import bench_train

    r = bench_train(
        variant, size, batch_size, steps, device_name=device, precision=precision, compile=compile,
        activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    if json_out:
        typer.echo(json.dumps(r))
    else:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        typer.echo(
            f"{r['variant']} {r['size']} on {r['device']} ({r['precision']}), batch {r['batch']}: "
            f"{r['images_per_s']:.2f} img/s, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3f} TFLOP/s, MFU {mfu}; "
            f"GFLOPs/image analytic {r['flops_per_image_analytic'] / 1e9:.2f}, counted "
            f"{r['flops_per_image_counted'] / 1e9:.2f} (x{r['flops_counted_over_analytic']:.3f}); "
            f"peak memory {r['peak_memory_gb']:.2f} GB"
        )


@bench_app.command("sample")
def bench_sample_cmd(
    variant: str = typer.Option("rand-cont", help="Registry variant."),
    size: str = typer.Option("166m", help="Registry size (tiny: synthetic shapes; others: the paper's)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images in the timed batch."),
    steps: int = typer.Option(S.steps, "--steps", help="K, random-order steps (raster: L, ignored)."),
    diffusion_steps: int = typer.Option(
        S.diffusion_steps, "--diffusion-steps", help="S, diffusion steps per token."
    ),
    cfg: float = typer.Option(S.cfg, "--cfg", help="Guidance scale (1 = off: half the work)."),
    head_tokens: str = typer.Option(
        S.head_tokens, "--head-tokens", help=f"{one_of(HeadTokens)} (fluid sample --help)."
    ),
    device: str = typer.Option("auto", help=f"{one_of(Device)}."),
    precision: str = typer.Option("auto", help=_PRECISION_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone call."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Sampling throughput with random weights (one timed batch after a short warm-up)."""
    at_least(1, batch_size=batch_size, steps=steps, diffusion_steps=diffusion_steps)
    finite(0.0, cfg=cfg)
    s = SampleSettings(steps=steps, diffusion_steps=diffusion_steps, cfg=cfg, head_tokens=head_tokens)
    import json

    from fluid_cli.sampling.bench import bench_sampling

    r = bench_sampling(variant, size, batch_size, s, device, precision, compile)
    if json_out:
        typer.echo(json.dumps(r))
    else:
        paper = r["paper_sec_per_image"]
        typer.echo(
            f"{r['variant']} {r['size']} on {r['device']} ({r['precision']}), batch {r['batch']}, {r['steps']} AR steps, "
            f"S={r['diffusion_steps']} cfg={r['cfg']}: {r['sec_per_image']:.3f} s/image, {r['images_per_s']:.3f} "
            f"img/s, {r['gflops_per_s']:.1f} GFLOP/s"
            + (f" (paper, TPU v5 per chip: {paper} s/image)" if paper else "")
        )
