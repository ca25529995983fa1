"""Progress bars for every pass over data (rich); silent with ``quiet``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress(items: Iterable, description: str, *, total: int | None = None,
             quiet: bool = True) -> Iterator:
    """Iterate ``items`` under a progress bar on stderr (counting batches)."""
    if quiet:
        yield from items
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    from rich.console import Console
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
