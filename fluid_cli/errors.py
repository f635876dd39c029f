"""User-facing errors: one clear line on stderr and exit code 1, never a traceback.

Every stage raises `FluidError("what is wrong; what to do")` for bad input. `cli.main` turns it into
one line; `FLUID_DEBUG=1` shows the traceback instead. Any other exception that escapes a stage is
turned into one line by `describe` (the safety net: the common cases raise their own FluidError).
"""

from __future__ import annotations

import errno
import json


class FluidError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 1)."""

    exit_code = 1


class RequeueExit(Exception):
    """Training stopped cleanly on a preemption notice; the scheduler may requeue (exit code 75)."""

    exit_code = 75  # EX_TEMPFAIL: the conventional 'try again' code that Slurm/k8s wrappers requeue on


class Interrupted(BaseException):
    """Ctrl-C, raised by the handler `cli.main` installs (Typer swallows KeyboardInterrupt silently)."""

    exit_code = 130  # 128 + SIGINT, as a shell reports it


DEBUG_HINT = "FLUID_DEBUG=1 shows the traceback"

_OS_ADVICE = {
    errno.EACCES: "permission denied: choose a place you can write (or read), or fix its permissions",
    errno.EPERM: "operation not permitted: choose another place, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another place",
    errno.ENOSPC: "the disk is full: free space and rerun the same command (finished work is kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the same command",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "a file is in the way: pass a new path, or a folder where a folder is wanted",
    errno.ENOTDIR: "a file is in the way where a folder is wanted: pass a folder or a new path",
    errno.EISDIR: "it is a folder where a file is wanted: pass a file path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException, command: str = "") -> str:
    """One line for an exception that is not a FluidError: what failed, on which path, what to do."""
    what = f"{command} failed" if command else "failed"
    if isinstance(exc, OSError) and exc.errno is not None:
        path = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            path = f"{path} -> {exc.filename2}"
        advice = _OS_ADVICE.get(exc.errno, "check the path and rerun the same command")
        where = f" on {path}" if path else ""
        return f"{what}{where}: {exc.strerror or type(exc).__name__}; {advice}"
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"{what}: a text file is not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8 and rerun"
        )
    if isinstance(exc, json.JSONDecodeError):
        return f"{what}: a JSON file is invalid ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or re-create it"
    if type(exc).__name__ == "SafetensorError":
        return (
            f"{what}: a .safetensors file is damaged or not safetensors ({_one_line(exc, 120)}); "
            "re-create it with the stage that wrote it"
        )
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"{what}: out of memory ({_one_line(exc, 120)}); lower --batch-size or use a larger machine"
    return (
        f"{what}: {type(exc).__name__}: {_one_line(exc, 200) or 'no message'} "
        f"(an input the command did not check, or a bug; {DEBUG_HINT}, please report it)"
    )
