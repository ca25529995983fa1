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
    import sys

    from rich.console import Console
    # the command line captures what libraries print on stderr while it runs; the bars go to the
    # stream it names (the terminal), and are not redirected into the capture
    stream = getattr(sys.stderr, "progress_stream", None) or sys.stderr
    with Progress(*columns, console=Console(file=stream), transient=True, redirect_stderr=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
