"""Progress reporting with rich: one live bar per task (stage, block k/N, ETA)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Reporter:
    """Shows progress bars on stderr; ``quiet`` turns everything off (tests, library use)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A bar for ``total`` steps; yields ``update(done, total, note="")`` (the note, e.g. the
        current loss, is shown after the bar)."""
        if self.quiet:
            yield lambda done, total, note="": None
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        )
        with progress:
            task = progress.add_task(description, total=total, note="")
            yield lambda done, total, note="": progress.update(
                task, completed=done, total=total, note=note
            )

    def info(self, message: str) -> None:
        if not self.quiet:
            console.print(message)
