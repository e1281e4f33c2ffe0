"""Progress bars: rich, on stderr (stdout holds only results), off with ULTRACURATE_PROGRESS=0.

The rate and the ETA are the run's own: rows done over the time elapsed. rich's speed estimate
needs two updates within its 30 s window, so a job whose batches take longer (a 512 px
generate batch on the CPU) would show `--` for ever.
"""

from __future__ import annotations

import os
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TextColumn, TimeElapsedColumn)
from rich.text import Text


def enabled() -> bool:
    return os.environ.get("ULTRACURATE_PROGRESS", "1") != "0"


def rate(task: Task) -> float | None:
    """Rows per second since the task started, or None before any row is done."""
    elapsed = task.elapsed
    if not task.completed or not elapsed:
        return None
    return task.completed / elapsed


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        r = rate(task)
        if not r:
            return Text("-- rows/s", style="progress.data.speed")
        return Text(f"{r:.1f} rows/s" if r >= 1 else f"{1 / r:.1f} s/row",
                    style="progress.data.speed")


class EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        r = rate(task)
        if task.finished:
            left = 0.0
        elif r and task.total is not None:
            left = max(task.total - task.completed, 0) / r
        else:
            return Text("ETA -:--:--", style="progress.remaining")
        return Text(f"ETA {_clock(left)}", style="progress.remaining")


def bar(total: int | None, description: str, **kw) -> Progress:
    """A bar with rows done of total, rate, elapsed time and ETA, on stderr. Add a task with
    `add_task(description, total=total)`; start and stop it (or use it as a context)."""
    kw.setdefault("console", Console(stderr=True))
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(), TimeElapsedColumn(), EtaColumn(),
                    disable=not enabled(), transient=False, **kw)


class JobBar:
    """A job's bar: rows committed, plus the part of the batch in hand its stage reports
    computed (`Context.progress`, called per diffusion step or sub-batch), so a long batch
    moves the bar before it commits. Callable with rows of the batch in hand done."""

    def __init__(self, total: int | None, description: str, **kw):
        self.progress = bar(total, description, **kw)
        self.task = self.progress.add_task(description, total=total)
        self.committed = 0.0

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def set_total(self, total: int) -> None:
        """The total, once known (a job's pending rows are counted as they are read)."""
        self.progress.update(self.task, total=total)

    def __call__(self, rows_in_batch: float) -> None:
        self.progress.update(self.task, completed=self.committed + rows_in_batch)

    def advance(self, rows: int) -> None:
        """A batch of rows committed."""
        self.committed += rows
        self.progress.update(self.task, completed=self.committed)

    @property
    def completed(self) -> float:
        return self.progress.tasks[0].completed

