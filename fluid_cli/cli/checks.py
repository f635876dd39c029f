"""Checks at the CLI boundary: cheap, before any model or data is loaded, each one `error:` line."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from fluid_cli.errors import FluidError


def need(ok: bool, message: str) -> None:
    if not ok:
        raise FluidError(message)


def at_least(low: int | float, **options) -> None:
    """at_least(1, batch_size=b): '--batch-size must be at least 1, got 0' (None: not given)."""
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        need(value is None or value >= low, f"{flag} must be at least {low}, got {value}")


def finite(low: float | None = None, high: float | None = None, **options) -> None:
    for name, value in options.items():
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        need(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        need(low is None or value >= low, f"{flag} must be at least {low}, got {value}")
        need(high is None or value <= high, f"{flag} must be at most {high}, got {value}")


def writable_dir(path: Path | None, option: str = "--out") -> None:
    """`path` is a folder we can create or write into: not a file, not under a file, not read-only.
    Checked before any expensive work, so nothing is computed that cannot be saved."""
    if path is None:
        return
    path = Path(path)
    need(
        not path.exists() or path.is_dir(),
        f"{option} {path} is a file, not a folder; pass a new path or an existing folder",
    )
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    need(probe.is_dir(), f"{option} {path}: {probe} is a file, not a folder; pass a path inside a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".fluid-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FluidError(
            f"{option} {path}: cannot write in {probe} ({e.strerror}); choose a writable place"
        ) from None


def writable_file(path: Path | None, option: str = "--out") -> None:
    """`path` is a file we can write: not an existing folder, and its folder is writable."""
    if path is None:
        return
    path = Path(path)
    need(not path.is_dir(), f"{option} {path} is a folder; pass a file path")
    writable_dir(path.parent, f"{option} {path}: its folder")


def existing(path: Path | None, option: str, folder: bool | None = None) -> None:
    if path is None or str(path) == "-":
        return
    path = Path(path)
    need(path.exists(), f"{option} {path} does not exist")
    if folder is True:
        need(path.is_dir(), f"{option} {path} is a file; pass a folder")
    if folder is False:
        need(path.is_file(), f"{option} {path} is a folder; pass a file")


def one_of(kind) -> str:
    """'a | b | c' for a choice type's help text (config.choices)."""
    from fluid_cli.config import choices

    return " | ".join(choices(kind))
