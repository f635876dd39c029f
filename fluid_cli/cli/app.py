"""The Typer application every command module registers on; no command lives here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fluid",
    help="Fluid: autoregressive text-to-image models over continuous or discrete tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
