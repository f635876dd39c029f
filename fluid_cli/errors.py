"""User-facing errors: one clear line on stderr and exit code 1, never a traceback.

Every stage raises `FluidError("what is wrong; what to do")` for bad input. `cli.main` turns it into
one line; `FLUID_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations


class FluidError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 1)."""

    exit_code = 1


class RequeueExit(Exception):
    """Training stopped cleanly on a preemption notice; the scheduler may requeue (exit code 75)."""

    exit_code = 75  # EX_TEMPFAIL: the conventional 'try again' code that Slurm/k8s wrappers requeue on
