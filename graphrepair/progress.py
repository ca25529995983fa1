"""Progress bars for every pass over data (rich); silent with ``quiet`` and on every rank of a
distributed run but rank 0 (``graphrepair.distributed.is_reporting``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress(items: Iterable, description: str, *, total: int | None = None,
             quiet: bool = True) -> Iterator:
    """Iterate ``items`` under a progress bar on stderr (counting batches)."""
    from graphrepair.distributed import is_reporting

    if quiet or not is_reporting():
        yield from items
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    from rich.console import Console
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
