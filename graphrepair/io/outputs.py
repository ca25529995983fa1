"""The output files of one command: checked before any work starts, written all together or not at all.

``check_output_path`` fails fast (before minutes of merging) on a path that cannot be written: a
missing or read-only directory, a directory given as the file. ``atomic_outputs`` hands out one
temporary file per target (``fileio.atomic_output``, each in its target's directory); only when
every writer has succeeded are they renamed into place, so a command that fails half-way (an ONNX
verification, a full disk for the second file) leaves none of its outputs behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from graphrepair.distributed import is_reporting
from graphrepair.errors import OutputError
from graphrepair.io.fileio import atomic_output, check_target


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """OutputError (one line naming ``option``) unless ``path`` can be created or replaced."""
    return check_target(path, option)


def check_distinct(paths: dict[str, Path | None]) -> None:
    """OutputError if two options name the same file."""
    seen: dict[Path, str] = {}
    for option, p in paths.items():
        if p is None:
            continue
        key = p.resolve()
        if key in seen:
            raise OutputError(f"{seen[key]} and {option} both name '{p}'; give two different files")
        seen[key] = option


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[Path | None]) -> Iterator[list[Path | None]]:
    """Temporary paths for ``paths`` (None stays None); all are renamed into place when the block
    succeeds, none when it raises. (Only a failing rename itself -- after every file was written
    and verified -- can leave the files renamed before it in place.) In a distributed run only
    rank 0 writes: the other ranks get paths in a temporary directory that is removed after."""
    if not is_reporting():
        with tempfile.TemporaryDirectory(prefix="graphrepair-rank-") as d:
            yield [None if p is None else Path(d) / f"{i}_{Path(p).name}" for i, p in enumerate(paths)]
        return
    with contextlib.ExitStack() as stack:
        yield [None if p is None else stack.enter_context(atomic_output(p)) for p in paths]
