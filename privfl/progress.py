"""The one rich progress bar privfl shows on long work: label, bar, count, elapsed time and an
optional live status field. A leaf module: every layer may import it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


def progress_bar(
    enabled: bool,
    label: str = "{task.description}",
    *,
    status: str | None = "{task.fields[status]}",
    console: Console | None = None,
) -> Progress:
    """A ``Progress`` with the columns label, bar, ``done/total``, elapsed time and ``status``.

    ``label`` and ``status`` are rich format strings (``{task.description}``,
    ``{task.fields[name]}``); with the default ``status`` every task must be added with a
    ``status=`` field, and ``status=None`` drops the column. ``enabled=False`` gives a silent bar.
    ``console``: where to draw (default rich's, on stdout; pass ``Console(stderr=True)`` to keep
    stdout for machine-readable output).
    """
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if status is not None:
        columns.append(TextColumn(status))
    return Progress(*columns, disable=not enabled, transient=False, console=console)
