"""Where models run: the one place for device lookup and device choice (modes and the models
themselves: ``graphrepair.models``).

- ``model_device(model)``: the device of a model's first parameter (or buffer), CPU without any.
  It is ``passes.modules.module_device`` (``passes`` cannot import ``graphrepair``; this is the
  name the application uses).
- ``model_dtype(model)``: the dtype of a model's first floating parameter (or buffer), None
  without one: the dtype floating inputs are cast to.
- ``pick_device(name)``: "auto" | "cpu" | "cuda" -> a torch.device. Under a launcher that sets
  ``LOCAL_RANK`` (torchrun) "cuda" and "auto" pick this process's own GPU, ``cuda:LOCAL_RANK``;
  with fewer GPUs than processes on the node "auto" runs every process on the CPU.
- ``release(*modules)``: let go of what a finished pass's own modules hold (see its doc).
- ``held_memory()``: around every API call, glibc's allocator is set to keep freed memory for
  reuse instead of mapping fresh pages for every large activation (see its doc).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator

import torch

from passes.modules import module_device as model_device

from graphrepair.errors import GraphRepairError

__all__ = ["held_memory", "holds_memory", "local_rank", "model_device", "model_dtype", "pick_device", "release"]


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (or buffer), None without one."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, set by torchrun); 0 without one."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise GraphRepairError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer") from None


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU; ``cuda``: a GPU or an error. On CUDA the GPU
    is the ``LOCAL_RANK``-th (each process of a torchrun job on its own). Under a launcher with more
    processes on the node (``LOCAL_WORLD_SIZE``) than GPUs, nccl cannot run (one GPU per process):
    ``auto`` gives the CPU on every process (each decides alike from the same numbers, so the
    group agrees on gloo), ``cuda`` is an error on every process, before any of them joins."""
    if name not in ("auto", "cpu", "cuda"):
        raise GraphRepairError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GraphRepairError("--device cuda was requested but torch sees no CUDA device; "
                               "use --device cpu or auto")
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda")
    index, gpus = local_rank(), torch.cuda.device_count()
    try:
        processes = max(index + 1, int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0))
    except ValueError:
        raise GraphRepairError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} is not an integer") from None
    if processes > gpus:
        if name == "auto":
            return torch.device("cpu")
        raise GraphRepairError(f"--device cuda with {processes} processes on this node but torch sees {gpus} "
                               f"GPU(s): each process needs its own GPU; start at most {gpus} per node "
                               f"(torchrun --nproc-per-node {gpus}) or use --device cpu")
    return torch.device("cuda", index)


def release(*modules: torch.nn.Module) -> None:
    """Let go now of what each of ``modules`` (made by a pass for itself, finished with) holds: its
    own submodules, parameters and buffers are dropped, and the module is not to be run again.

    A torch.fx GraphModule and its graph refer to each other, so a pass's module (the pair with
    its taps' float64 sums, the graph copies carrying A's and B's weights) outlives the pass until
    Python's collector runs, which counts objects, not bytes: on ViT-B/16 that kept 1.5 GB alive
    into the next pass. A full collection costs what the whole process holds (0.15 s each in a
    small merge), so instead the cycle is emptied: what the module refers to is freed by its
    reference count as soon as nothing else holds it, and the empty cycle costs nothing.

    Only the modules' own tables are cleared, not their submodules' (a pair's submodules are
    the caller's models themselves): never give it a caller's model."""
    for m in modules:
        m._modules.clear()
        m._parameters.clear()
        m._buffers.clear()


# -- the CPU allocator during a call ---------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_HELD = 1 << 30  # blocks up to 1 GiB come from the heap, up to 1 GiB of free top is kept
# Leaving the outermost call, a heap with at most this much free memory keeps it for the next
# call instead of trimming it (see ``held_memory``)
_KEEP_FREE = 64 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later): the heap's statistics in size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


_depth = 0
_depth_lock = threading.Lock()


def _glibc():
    """The C library when it is glibc and the user left its allocator alone, else None."""
    if os.environ.get("GRAPHREPAIR_MALLOC", "").lower() == "system":
        return None
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None  # the user tuned malloc: theirs stands
    return _libc()


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc's handle, made once (a ``ctypes.CDLL`` is a reference cycle: one per call would be
    garbage for the collector), or None off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    try:  # (older glibc: no mallinfo2; the free memory is then always trimmed)
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
    except AttributeError:
        pass
    return libc


def _free_bytes(libc) -> int | None:
    """The bytes the heap holds free (``mallinfo2``'s ``fordblks``: freed blocks, the pages of
    those trimmed before included), None where the C library cannot say."""
    info = getattr(libc, "mallinfo2", None)
    if info is None:
        return None
    try:
        return int(info().fordblks)
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def holds_memory() -> bool:
    """Whether ``held_memory`` acts in this process (glibc, malloc not tuned by the user)."""
    return _glibc() is not None


@contextlib.contextmanager
def held_memory() -> Iterator[None]:
    """Keep freed CPU memory for reuse while graphrepair runs; give the free memory back after.

    A merge on the CPU runs the models over every batch several times. With glibc's default
    malloc each activation above the mmap threshold (32 MB at most; a ResNet20 of width 2 at
    batch 500 makes 65 MB maps) is a fresh mapping whose pages fault on first touch, and freed
    heap above the trim threshold goes back to the system, to be faulted in again by the next
    batch. Measured on the BN ResNet20 of width 2, 2,000 examples, 2 cores: a merge took 28-29 s
    with 9.1-9.6 M minor page faults, and 15-16 s with 0.8-1.0 M held (``benchmarks/bench_merge.py``).

    On entering the first call, ``mallopt`` raises glibc's mmap and trim thresholds to 1 GiB, so
    blocks are reused as a caching allocator (jemalloc, tcmalloc) reuses them. They stay raised
    for the rest of the process: glibc's dynamic thresholds cannot be restored once set, and
    setting fixed ones back made the plain forward passes after a merge fault five times as often
    as before it (bench_merge: 14.3 M against 2.2 M faults, 47 s against 30 s). Leaving the
    outermost call, ``malloc_trim(0)`` gives the free memory back to the system, so the process
    holds what it holds, not the merge's peak; a heap with at most ``_KEEP_FREE`` (64 MB) free
    keeps it for the next call instead, as a caching allocator would. A trimmed heap's pages
    fault in again on the next call: the paper MLP's merge (15-22 MB free after it) faulted
    2,000-3,000 pages per merge and ran 3-13 ms slower (8 and 5,000 examples) than with them
    kept (``glibc``'s ``mallinfo2`` tells the free bytes; without it, always trimmed). Nested
    calls act once. Nothing is done off glibc, when ``GLIBC_TUNABLES`` sets a ``glibc.malloc.``
    tunable (the user's choice stands) or when ``GRAPHREPAIR_MALLOC=system``."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _depth_lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _HELD)
            libc.mallopt(_M_TRIM_THRESHOLD, _HELD)
    try:
        yield
    finally:
        with _depth_lock:
            _depth -= 1
            if _depth == 0:
                free = _free_bytes(libc)
                if free is None or free > _KEEP_FREE:
                    libc.malloc_trim(0)
