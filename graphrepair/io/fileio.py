"""Atomic output files.

Every file graphrepair writes appears whole or not at all: the writer fills a temporary file in the
target's own directory (same file system, so the final ``os.replace`` is atomic), the data is
fsync'ed, the temporary file is renamed over the target, and the directory entry is fsync'ed.
If anything fails -- the writer raises, verification fails, the process is interrupted with
Ctrl-C -- the temporary file is removed and the target is left as it was (absent, or the old file).

The temporary name keeps the target's suffix (``.merged.onnx.<random>.tmp.onnx``) because some
writers look at it: ``numpy.savez`` appends ``.npz`` to a name that does not end with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from graphrepair.errors import OutputError

__all__ = ["atomic_output", "atomic_write", "save_safetensors"]

# A writer failing with these says nothing about the writer: the disk is full.
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _create_temp(target: Path) -> Path:
    """Create an empty file next to ``target`` with a fresh name (mode 0666 minus the umask)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{target.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def check_target(path: str | os.PathLike, who: str | None = None) -> Path:
    """OutputError (one line, naming ``who`` -- e.g. a command-line option -- when given) unless
    ``path`` names a file that can be created or replaced."""
    p = Path(path)
    head = f"{who} '{p}'" if who else f"cannot write '{p}'"
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{head}: not a file name")
    if p.is_dir():
        raise OutputError(f"{head}: it is a directory; give a file name, e.g. '{p / 'out'}'")
    parent = p.parent
    if not parent.exists():
        raise OutputError(f"{head}: directory '{parent}' does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{head}: '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{head}: directory '{parent}' is not writable; choose a writable location")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; on success it replaces ``path``.

    >>> with atomic_output("out.onnx") as tmp:
    ...     torch.onnx.export(model, args, tmp)   # doctest: +SKIP

    Raises OutputError when the directory is missing or not writable, or the disk is full; any other
    exception raised inside the block propagates unchanged after the temporary file has been removed.
    """
    target = Path(path)
    check_target(target)
    try:
        tmp = _create_temp(target)
    except OSError as exc:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror
        raise OutputError(
            f"cannot write '{target}': {reason} in directory '{target.parent}'; "
            "choose a writable location for the output"
        ) from exc
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"writing '{target}' produced no file (the writer did not create '{tmp}')")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # writers that replace the temporary file themselves (safetensors) leave it 0600
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot replace '{target}': {exc.strerror}") from exc
        _fsync_directory(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise OutputError(
                f"cannot write '{target}': {exc.strerror} in '{target.parent}'; free space or choose another location"
            ) from exc
        raise


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` to write a temporary file, then move it to ``path`` atomically.

    ``write_fn`` receives the temporary path (it may write it by name, e.g. ``safetensors`` or
    ``torch.onnx.export``, or open it itself) and may raise to reject the output; then nothing is
    left behind. Returns ``Path(path)``.
    """
    with atomic_output(path) as tmp:
        write_fn(tmp)
    return Path(path)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _detached_cpu_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies safe for safetensors: tensors sharing storage (tied weights) are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, found {key!r} ({type(key).__name__})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
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
