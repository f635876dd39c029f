"""A rich progress bar for training on stderr (rank 0 only): step, loss, images/s, val loss."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled = enabled
        self._status = ""
        self._val = ""
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(file=sys.stderr),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, row: dict | None) -> None:
        if row is not None:
            self._status = f"loss {row['loss']:.4f}  {row['images_per_s']:.1f} img/s"
        self.progress.update(self.task, completed=step, status=f"{self._status}  {self._val}")

    def note(self, text: str) -> None:
        self._val = text
        self.progress.update(self.task, status=f"{self._status}  {self._val}")
