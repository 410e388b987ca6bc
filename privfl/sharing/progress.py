"""The rich progress bar the data-sharing trainers show: label, bar, count, elapsed time, a status field."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


def progress_bar(enabled: bool, label: str) -> Progress:
    """A ``Progress`` whose tasks take a ``status`` field; ``enabled=False`` gives a silent one."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    return Progress(*columns, disable=not enabled, transient=False)
