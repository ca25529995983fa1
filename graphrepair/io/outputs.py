"""The output files of one command: checked before any work starts, written all together or not at all.

``check_output_path`` fails fast (before minutes of merging) on a path that cannot be written: a
missing or read-only directory, a directory given as the file, a name too long or not UTF-8.
``check_distinct`` refuses two outputs naming one file and ``check_not_inputs`` an output that
names an input (the same file through any spelling, link or hard link): writing it would destroy
the input.

``atomic_outputs`` hands out one temporary file per target (``fileio.Staged``, each in its
target's directory). Only when every writer has succeeded are they committed, as one step:

1. every temporary file is fsync'ed and given its target's mode;
2. each existing target gets a hard link under a temporary name (its backup);
3. the temporary files are renamed onto their targets, with SIGINT, SIGTERM and SIGHUP held back
   (``deferred_signals``): a signal that arrives meanwhile is delivered once the last rename is
   done, so an interrupted run has either replaced every output or none;
4. if a rename fails, the targets already replaced get their backups back (or are removed when they
   did not exist before), and the OutputError says so. Only when that restore itself fails (or the
   file system has no hard links) does it name which outputs are new and which are old.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from graphrepair.distributed import is_reporting
from graphrepair.errors import GraphRepairError, OutputError
from graphrepair.io.fileio import Staged, check_target, disk_full, fsync_directory, same_file

__all__ = ["atomic_outputs", "check_distinct", "check_not_inputs", "check_output_path", "deferred_signals"]

HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


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


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = HELD_SIGNALS) -> Iterator[list[int]]:
    """Hold back ``signums`` inside the block (in the main thread; elsewhere this does nothing):
    a signal arriving meanwhile is recorded and, once the block is done, delivered again to the
    handler that was in place (so a default SIGTERM still terminates the process, Ctrl-C still
    raises KeyboardInterrupt). Yields the list of signals held so far."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {}
    for s in signums:
        try:
            previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):
            continue
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[Path | None], written: list[Path] | None = None) -> Iterator[list[Path | None]]:
    """Temporary paths for ``paths`` (None stays None); all are committed together when the block
    succeeds (see the module text), none when it raises. ``written``, when given, receives the
    paths once they are all in place. In a distributed run only rank 0 writes: the other ranks get
    paths in a temporary directory that is removed after."""
    if not is_reporting():
        with tempfile.TemporaryDirectory(prefix="graphrepair-rank-") as d:
            yield [None if p is None else Path(d) / f"{i}_{Path(p).name}" for i, p in enumerate(paths)]
        return
    staged: list[Staged | None] = []
    try:
        for p in paths:
            staged.append(None if p is None else Staged(p))
        yield [None if s is None else s.tmp for s in staged]
        live = [s for s in staged if s is not None]
        for s in live:
            s.seal()
        with deferred_signals():
            _commit_all(live)
            if written is not None:
                written.extend(s.path for s in live)
    except BaseException as exc:
        for s in staged:
            if s is not None:
                s.discard()
        reason = None if isinstance(exc, GraphRepairError) else disk_full(exc)
        if reason is not None:
            names = ", ".join(f"'{s.path}'" for s in staged if s is not None)
            raise OutputError(f"cannot write {names}: {reason}; free space or choose another location; "
                              f"no output was changed") from exc
        if isinstance(exc, GraphRepairError):  # writers name the temporary file: name the output
            text = str(exc)
            for s in staged:
                if s is not None:
                    text = text.replace(str(s.tmp), str(s.path))
            if text != str(exc):
                raise type(exc)(text) from exc
        raise


def _commit_all(staged: list[Staged]) -> None:
    """Rename every temporary file onto its target, or restore every target (see the module text)."""
    existed = [os.path.lexists(s.target) for s in staged]
    backups: list[Path | None] = []
    try:
        for s, there in zip(staged, existed):
            backups.append(_backup(s) if there else None)
        done: list[int] = []
        try:
            for i, s in enumerate(staged):
                s.commit()
                done.append(i)
        except OutputError as exc:
            left = _restore([(staged[i], backups[i], existed[i]) for i in done])
            if not left:
                raise OutputError(f"{exc}; no output was changed") from exc.__cause__
            new = [str(s.path) for s in left]
            old = [str(s.path) for s in staged if s not in left]
            raise OutputError(f"{exc}; {', '.join(new)} {'is' if len(new) == 1 else 'are'} new, "
                              f"{', '.join(old)} {'is' if len(old) == 1 else 'are'} old") from exc.__cause__
    finally:
        for b in backups:
            if b is not None:
                with contextlib.suppress(OSError):
                    b.unlink()
    for directory in dict.fromkeys(s.target.parent for s in staged):
        fsync_directory(directory)


def _backup(s: Staged) -> Path | None:
    """A hard link to the existing target (None when links are not possible here)."""
    backup = s.tmp.with_name(s.tmp.name + ".old")
    try:
        os.link(s.target, backup)
    except OSError:
        return None
    return backup


def _restore(done: list[tuple[Staged, Path | None, bool]]) -> list[Staged]:
    """Undo the renames in ``done``; returns the outputs that could not be restored (left new)."""
    left = []
    for s, backup, existed in done:
        try:
            if backup is not None:
                os.replace(backup, s.target)
            elif not existed:
                os.unlink(s.target)
            else:
                left.append(s)
        except OSError:
            left.append(s)
    return left
