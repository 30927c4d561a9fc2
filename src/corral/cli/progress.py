"""A progress bar for the long first-time work (building the default image)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from corral.runtime.images import Progress as ProgressCallback


@contextmanager
def image_progress(console: Console | None = None) -> Iterator[ProgressCallback]:
    """A callback that draws a bar the first time it is called (nothing when no image is built)."""
    bar: Progress | None = None
    task = None

    def update(phase: str, fraction: float) -> None:
        nonlocal bar, task
        if bar is None:
            bar = Progress(
                TextColumn("Building the default image: {task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )
            bar.start()
            task = bar.add_task("starting", total=1.0)
        assert task is not None
        bar.update(task, completed=fraction, description=phase)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()
