"""A rich progress bar for training on stderr (rank 0 only): step, loss, images/s, val loss, and an
ETA that knows about `train.time_limit_min`. Exercised by `fluid train` (and `fluid demo`).

A run stops at its step budget (`train.steps`) or at its time limit, whichever comes first. So the
ETA is the smaller of the two remaining times, and when the time limit comes first the bar's total
is the step the run is expected to reach by then (shown as `~N`), not the step budget: a 10-minute
demo run with `steps = 1_000_000` shows about 10 minutes and a few thousand steps, not 49 hours.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def forecast(
    step: int, steps: int, rate: float | None, seconds_left: float | None
) -> tuple[float | None, int | None]:
    """(seconds until the run stops, the step it stops at) from the current step, the step budget,
    the measured rate in steps/s (None: not known yet) and the time left before the time limit
    (None: no limit). Unknown values are None."""
    by_steps = max(steps - step, 0) / rate if rate else None
    if seconds_left is None:
        return by_steps, steps
    seconds_left = max(seconds_left, 0.0)
    if by_steps is not None and by_steps <= seconds_left:
        return by_steps, steps  # the step budget ends the run first
    if rate is None:
        return seconds_left, None
    # the time limit ends it: the run stops after the first step that completes past the limit
    return seconds_left, min(steps, step + int(rate * seconds_left) + (seconds_left > 0))


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True, deadline: float | None = None):
        """total: the step budget; start: the first step of this process (resume); deadline: the
        time.monotonic() at which train.time_limit_min stops the run (None: no limit)."""
        self.enabled, self.steps, self.deadline = enabled, total, deadline
        self._start_step, self._start_time = start, time.monotonic()
        self._status = ""
        self._val = ""
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
            console=Console(file=sys.stderr),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="", count="", eta="")
        self._refresh(start)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def _rate(self, step: int, now: float) -> float | None:
        """Steps/s: rich's recent-window speed, else the average since this process started."""
        speed = self.progress.tasks[0].speed if self.progress.tasks else None
        if speed:
            return speed
        done, dt = step - self._start_step, now - self._start_time
        return done / dt if done > 0 and dt > 0 else None

    def _refresh(self, step: int) -> dict:
        now = time.monotonic()
        left = None if self.deadline is None else self.deadline - now
        eta, end = forecast(step, self.steps, self._rate(step, now), left)
        if left is not None and left <= 0:
            end = step  # past the limit: this step is the last
        if end == self.steps:
            count = f"{step}/{self.steps}"
        else:
            count = f"{step}/~{end if end is not None else '?'} (time limit)"
        fields = {"count": count, "eta": _clock(eta), "total": end if end is not None else self.steps}
        self.progress.update(self.task, completed=step, **fields)
        return fields

    def update(self, step: int, row: dict | None) -> None:
        if row is not None:
            self._status = f"loss {row['loss']:.4f}  {row['images_per_s']:.1f} img/s"
        self._refresh(step)
        self.progress.update(self.task, status=f"{self._status}  {self._val}")

    def note(self, text: str) -> None:
        self._val = text
        self.progress.update(self.task, status=f"{self._status}  {self._val}")
