"""The console script: `main` turns every failure into one line, and `run_cli` runs a command
in-process (the demo's stages, recipes/shapes_study.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from fluid_cli.cli.app import app
from fluid_cli.errors import FluidError, Interrupted, RequeueExit, describe

log = logging.getLogger(__name__)


def _setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("FLUID_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


_RESUME_HINT = {
    "train": "rerun the same command with --resume to continue from the last checkpoint",
    "tokenize": "rerun the same command to continue (finished shards are kept)",
    "encode-text": "rerun the same command to continue (finished shards are kept)",
    "sample": "rerun the same command to continue (finished images are kept)",
    "demo": "rerun the same command to continue (finished stages are kept)",
}


def _command_name(argv: list[str]) -> str:
    """`fluid bench train ...` -> 'bench train': the words before the first option."""
    words = []
    for a in argv:
        if a.startswith("-") or len(words) == 2 or (words and words[0] != "bench"):
            break
        words.append(a)
    return " ".join(words) or "fluid"


_MAIN_PID: int | None = None


def _on_sigint(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked DataLoader worker: the default, which torch handles quietly
        raise KeyboardInterrupt
    raise Interrupted()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Typer's standalone mode handles usage errors (exit 2); a
    FluidError becomes `error: ...` on stderr and exit 1; any other exception is the safety net's
    one line (errors.describe), exit 1; Ctrl-C says how to continue, exit 130. FLUID_DEBUG=1 shows
    the traceback instead."""
    import signal

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    debug = bool(os.environ.get("FLUID_DEBUG"))
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread: keep the default handler
        previous = None
    try:
        app(args=argv, prog_name="fluid")
    except FluidError as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except RequeueExit as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Interrupted as e:
        if debug:
            raise
        hint = _RESUME_HINT.get(command, "rerun the same command")
        print(f"error: {command} interrupted; {hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # the safety net: a stage did not turn this into a FluidError
        if debug:
            raise
        print(f"error: {describe(e, command)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_cli(args: list[str]) -> None:
    """One command through the real CLI, in-process, its stdout (the output path) sent to stderr.
    The demo's stages and recipes/shapes_study.py run this way."""
    log.info("$ fluid %s", " ".join(args))
    with contextlib.redirect_stdout(sys.stderr):
        app(args, standalone_mode=False)
