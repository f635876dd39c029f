"""The `fluid` command line: thin Typer commands that parse options, build a stage's settings
(fluid_cli/settings.py) and call that one stage.

    app.py      the Typer app          checks.py   option checks (one `error:` line each)
    entry.py    main (the console script) and run_cli (a command in-process)
    scaling.py  fit-scaling            train.py    models, train
    data.py     verify, synth-data, tokenize, encode-text
    bench.py    bench train, bench sample
    sample.py   sample                 evaluation.py  coco-30k, eval-fid, eval-geneval
    tools.py    shapes-data, train-tokenizer, demo

Heavy imports (torch, diffusers, transformers) happen inside the commands, so `fluid --help` stays
fast. Logs and progress go to stderr; stdout carries only data (an output path, or JSON).
Run `fluid --help` to see every command.
"""

from __future__ import annotations

import importlib

from fluid_cli.cli.app import app
from fluid_cli.cli.entry import main, run_cli

# Each module registers its commands on `app` as it is imported; this order is `fluid --help`'s.
for _group in ("scaling", "train", "data", "bench", "sample", "evaluation", "tools"):
    importlib.import_module(f"fluid_cli.cli.{_group}")

from fluid_cli.cli.bench import bench_app  # noqa: E402  (after the loop: registered in order)

__all__ = ["app", "bench_app", "main", "run_cli"]
