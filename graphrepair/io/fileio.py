"""Atomic output files, and the checks that let a command refuse a bad path before any work.

Every file graphrepair writes appears whole or not at all: the writer fills a temporary file in the
target's own directory (same file system, so the final ``os.replace`` is atomic), the data is
fsync'ed, the temporary file is renamed over the target, and the directory entry is fsync'ed.
If anything fails -- the writer raises, verification fails, the process is interrupted with
Ctrl-C or SIGTERM -- the temporary file is removed and the target is left as it was (absent, or
the old file).

- A target that is a symbolic link is not replaced by a regular file: the file the link points to
  is (the link stays a link). An existing target keeps its permission bits; a new one gets
  0666 minus the umask.
- The temporary name keeps the target's suffix (``.merged.onnx.<random>.tmp.onnx``) because some
  writers look at it (``numpy.savez`` appends ``.npz`` to a name that does not end with it), and is
  shortened so that it stays well below the file system's name limit even for a 255-byte target
  name (writers such as the ONNX export make temporary files of their own next to it).
- ``atomic_outputs`` writes the several outputs of one run together (``atomic_output`` is its
  one-file case). It hands out one temporary file per target (``Staged``). Only when every
  writer has succeeded are they committed, as one step:

  1. every temporary file is fsync'ed and given its target's mode;
  2. each existing target gets a hard link under a temporary name (its backup);
  3. the temporary files are renamed onto their targets, with SIGINT, SIGTERM and SIGHUP held back
     (``deferred_signals``): a signal that arrives meanwhile is delivered once the last rename is
     done, so an interrupted run has either replaced every output or none;
  4. if a rename fails, the targets already replaced get their backups back (or are removed when
     they did not exist before), and the OutputError says so. Only when that restore itself fails
     (or the file system has no hard links) does it name which outputs are new and which are old.
- ``check_target`` and ``check_source`` refuse, in one line, what cannot work: names longer than
  the file system allows, names that are not UTF-8 (the ONNX tools need UTF-8 paths), missing or
  read-only directories, directories, devices and FIFOs (reading a FIFO would wait forever, and
  replacing ``/dev/null`` would replace the device).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from graphrepair.errors import CheckpointError, DataError, GraphRepairError, OutputError

__all__ = ["atomic_output", "atomic_outputs", "atomic_write", "deferred_signals", "check_source", "check_target", "disk_full", "real_target",
           "save_safetensors", "same_file"]

HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# A writer failing with these says nothing about the writer: the disk is full.
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_OS_ERROR_TEXT = re.compile(r"os error (\d+)|No space left on device|File too large|Disk quota exceeded")
_TEMP_NAME_BYTES = 160  # room for the writers' own temporary names next to ours (255 in all)
_SUFFIX_BYTES = 24


def disk_full(exc: BaseException) -> str | None:
    """The reason (``"No space left on device"``) when ``exc`` or an exception it was raised from is
    a full disk, a quota or a file size limit; None otherwise. Writers written in other languages
    (safetensors) report the OS error in their message only."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc.strerror or os.strerror(exc.errno)
        match = _OS_ERROR_TEXT.search(str(exc))
        if match:
            if match.group(1) is None:
                return match.group(0)
            if int(match.group(1)) in _FULL:
                return os.strerror(int(match.group(1)))
        exc = exc.__cause__ or exc.__context__
    return None


def _limits(directory: Path) -> tuple[int, int]:
    """(longest file name, longest path) in bytes for files in ``directory``."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX"), os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def _bytes(text: str) -> bytes:
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes (refused by _check_name)
        return text.encode("utf-8", "surrogatepass")


def _check_name(p: Path, head: str, error: type[GraphRepairError]) -> None:
    """Length and characters of a path, before the OS is asked anything about it."""
    if "\x00" in str(p):
        raise error(f"{head}: a file name cannot contain a NUL character")
    try:
        os.fsencode(p)
    except UnicodeEncodeError:
        raise error(f"{head}: the name holds characters no file name can (lone surrogates)") from None
    existing = next((d for d in (p.parent, *p.parent.parents) if _exists(d)), Path("."))
    name_max, path_max = _limits(existing)
    name = _bytes(p.name)
    if len(name) > name_max:
        raise error(f"{head}: the file name is {len(name)} bytes long; this file system allows at most "
                    f"{name_max}; choose a shorter name")
    absolute = _bytes(os.path.abspath(p))
    if len(absolute) >= path_max:
        raise error(f"{head}: the path is {len(absolute)} bytes long; this system allows at most "
                    f"{path_max - 1}; choose a shorter path")


def _exists(p: Path) -> bool:
    try:
        return os.path.lexists(p)
    except (OSError, ValueError):
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(p: Path, head: str, error: type[GraphRepairError]) -> os.stat_result | None:
    """``os.stat(p)`` (following links), None when nothing is there; OS refusals become ``error``."""
    try:
        return os.stat(p)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise error(f"{head}: '{p.parent}' is not a directory") from None
    except (ValueError, UnicodeError) as exc:
        raise error(f"{head}: not a valid file name ({exc})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{head}: too many levels of symbolic links") from None
        raise error(f"{head}: {exc.strerror}") from None


def real_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` must replace: ``path`` itself, or, when it is a symbolic link
    (possibly dangling), the file the link chain ends at."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def check_target(path: str | os.PathLike, who: str | None = None) -> Path:
    """OutputError (one line, naming ``who`` -- e.g. a command-line option -- when given) unless
    ``path`` names a file that can be created or replaced. Returns ``Path(path)``."""
    p = Path(path)
    head = f"{who} '{p}'" if who else f"cannot write '{p}'"
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{head}: not a file name")
    _check_name(p, head, OutputError)
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"{head}: the name is not valid UTF-8; choose a UTF-8 file name") from None
    real = real_target(p)
    if real != p:
        _check_name(real, f"{head} (a link to '{real}')", OutputError)
    st = _stat(real, head, OutputError)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{head}: it is a directory; give a file name, e.g. '{p / 'out'}'")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{head}: it is {_kind(st.st_mode)}, not a regular file; give a file name")
    parent = real.parent
    pst = _stat(parent, head, OutputError)
    if pst is None:
        raise OutputError(f"{head}: directory '{parent}' does not exist; create it first")
    if not stat.S_ISDIR(pst.st_mode):
        raise OutputError(f"{head}: '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{head}: directory '{parent}' is not writable; choose a writable location")
    return p


def check_source(path: str | os.PathLike, who: str | None = None,
                 error: type[GraphRepairError] = DataError) -> Path:
    """``error`` (one line, naming ``who`` when given) unless ``path`` is an existing regular file
    that can be read: refused are missing files, directories, FIFOs and devices (which could block
    forever or never end), names too long for the file system, and unreadable files."""
    p = Path(path)
    head = f"{who} '{p}'" if who else f"'{p}'"
    if str(path) == "":
        raise error(f"{head}: not a file name")
    _check_name(p, head, error)
    st = _stat(p, head, error)
    if st is None:
        raise error(f"{head}: file does not exist")
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{head}: it is a directory; give the file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{head}: it is {_kind(st.st_mode)}, not a regular file; graphrepair reads whole "
                    f"files: save the data to a file first")
    if not os.access(p, os.R_OK):
        raise error(f"{head}: permission denied; make the file readable")
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (through links, hard links and any
    spelling of the path), or, where one does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return os.path.realpath(a) == os.path.realpath(b)
        except (OSError, ValueError):
            return False


# --------------------------------------------------------------------------------------------------
# Staging: a temporary file next to the target, committed by rename


def _temp_path(target: Path) -> Path:
    """A fresh name next to ``target``: ``.<name, shortened>.<random>.tmp<suffix>`` (ASCII random
    part, at most ``_TEMP_NAME_BYTES`` bytes)."""
    suffix = target.suffix if len(_bytes(target.suffix)) <= _SUFFIX_BYTES else ""
    token = secrets.token_hex(4)
    room = _TEMP_NAME_BYTES - len(_bytes(f"..{token}.tmp{suffix}"))
    stem = _bytes(target.name)[:room].decode("utf-8", "ignore")
    return target.parent / f".{stem}.{token}.tmp{suffix}"


def _create_temp(target: Path) -> Path:
    """Create an empty file next to ``target`` with a fresh name (mode 0666 minus the umask)."""
    for _ in range(100):
        tmp = _temp_path(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Staged:
    """One output in the making: ``tmp`` (written by the caller) will replace ``target`` (the file a
    symbolic link at ``path`` points to, if it is one). ``path`` is what the user named."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_target(path)
        self.target = real_target(self.path)
        try:
            self.tmp = _create_temp(self.target)
        except OSError as exc:
            reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror
            raise OutputError(
                f"cannot write '{self.path}': {reason} in directory '{self.target.parent}'; "
                "choose a writable location for the output"
            ) from exc

    def seal(self) -> None:
        """Make the written temporary file durable, with the mode the target will keep."""
        if not self.tmp.exists():
            raise OutputError(f"writing '{self.path}' produced no file (the writer did not create '{self.tmp}')")
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            mode = stat.S_IMODE(os.stat(self.target).st_mode)
        except OSError:
            mode = 0o666 & ~_umask()  # writers that replace the temporary file (safetensors) leave 0600
        os.chmod(self.tmp, mode)

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise OutputError(f"cannot replace '{self.path}': {exc.strerror}") from exc

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def fsync_directory(directory: Path) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


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
def atomic_outputs(paths: Sequence[str | os.PathLike | None], written: list[Path] | None = None, *,
                   writes: bool = True,
                   interrupted: Callable[[], int | None] | None = None) -> Iterator[list[Path | None]]:
    """Temporary paths for ``paths`` (None stays None); all are committed together when the block
    succeeds (see the module text), none when it raises. ``written``, when given, receives the
    paths once they are all in place. ``writes=False`` (a process that does not write, e.g. a rank
    other than 0 of a distributed run) gives paths in a temporary directory that is removed after.
    ``interrupted``, when given, is asked once the block is done, with the signals held: when it
    names a signal, the process was interrupted and a library caught the exception the handler
    raised, so the run went on to its end; nothing is committed and KeyboardInterrupt is raised."""
    if not writes:
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
            signum = None if interrupted is None else interrupted()
            if signum is not None:
                raise KeyboardInterrupt(f"{signal.Signals(signum).name} arrived before the outputs were committed")
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
            folders = list(dict.fromkeys(str(s.target.parent) for s in staged if s is not None))
            where = f" in '{folders[0]}'" if len(folders) == 1 else ""
            raise OutputError(f"cannot write {names}: {reason}{where}; free space or choose another location; "
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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; on success it replaces ``path``
    (``atomic_outputs`` for one file).

    >>> with atomic_output("out.onnx") as tmp:
    ...     torch.onnx.export(model, args, tmp)   # doctest: +SKIP

    Raises OutputError when the directory is missing or not writable, or the disk is full; any other
    exception raised inside the block propagates after the temporary file has been removed.
    """
    with atomic_outputs([path]) as (tmp,):
        yield tmp


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` to write a temporary file, then move it to ``path`` atomically.

    ``write_fn`` receives the temporary path (it may write it by name, e.g. ``safetensors`` or
    ``torch.onnx.export``, or open it itself) and may raise to reject the output; then nothing is
    left behind. Returns ``Path(path)``.
    """
    with atomic_output(path) as tmp:
        write_fn(tmp)
    return Path(path)


def _detached_cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies safe for safetensors: tensors sharing storage (tied weights) are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state dict keys must be str, found {key!r} ({type(key).__name__})")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state dict entry '{key}' is a {type(value).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr != 0:
            storage_id = (str(tensor.device), ptr)
            if storage_id in seen_storage:
                tensor = tensor.clone()
            else:
                seen_storage.add(storage_id)
        out[key] = tensor
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` to ``path`` as safetensors, atomically, after reading it back.

    Accepts tensors on any device, with gradients, non-contiguous or sharing storage (tied weights
    are written once per name). The temporary file is reopened and its keys, shapes and dtypes are
    compared with the input before it replaces ``path``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = _detached_cpu_tensors(state_dict)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        with safe_open(str(tmp), framework="pt") as fh:
            keys = set(fh.keys())
            if keys != set(tensors):
                raise OutputError(f"safetensors file '{path}' read back with different keys; not written")
            for key in keys:
                sl = fh.get_slice(key)
                if tuple(sl.get_shape()) != tuple(tensors[key].shape):
                    raise OutputError(f"safetensors file '{path}': '{key}' read back with a different shape")

    return atomic_write(path, write)
