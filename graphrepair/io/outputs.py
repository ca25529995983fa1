"""The output files of one command, checked before any work starts.

``check_output_path`` fails fast (before minutes of merging) on a path that cannot be written: a
missing or read-only directory, a directory given as the file, a name too long or not UTF-8.
``check_distinct`` refuses two outputs naming one file and ``check_not_inputs`` an output that
names an input (the same file through any spelling, link or hard link): writing it would destroy
the input. The files are then written all together or not at all by ``fileio.atomic_outputs``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from graphrepair.errors import OutputError
from graphrepair.io.fileio import check_target, same_file

__all__ = ["check_distinct", "check_not_inputs", "check_output_path"]


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """OutputError (one line naming ``option``) unless ``path`` can be created or replaced."""
    return check_target(path, option)


def check_distinct(paths: Mapping[str, Path | None]) -> None:
    """OutputError if two options name the same file."""
    seen: list[tuple[str, Path]] = []
    for option, p in paths.items():
        if p is None:
            continue
        for other, q in seen:
            if same_file(p, q):
                raise OutputError(f"{other} and {option} both name '{p}'; give two different files")
        seen.append((option, p))


def check_not_inputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """OutputError if an output names one of the input files (the same file through another
    spelling of the path, a symbolic link or a hard link): the run would replace what it reads.
    Inputs that are not existing files (``MODULE:FUNCTION`` references) are skipped."""
    for option, out in outputs.items():
        if out is None:
            continue
        for source, path in inputs.items():
            if path is None or not _is_file(path):
                continue
            if same_file(out, path):
                raise OutputError(f"{option} '{out}' is the input {source} '{path}': writing it would destroy "
                                  f"the input; give another output file")


def _is_file(path) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False
