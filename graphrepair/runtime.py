"""Where and how models run: the one place for device lookup, device choice and eval mode.

- ``model_device(model)``: the device of a model's first parameter (or buffer), CPU without any.
  It is ``passes.modules.module_device`` (``passes`` cannot import ``graphrepair``; this is the
  name the application uses).
- ``pick_device(name)``: "auto" | "cpu" | "cuda" -> a torch.device. Under a launcher that sets
  ``LOCAL_RANK`` (torchrun) "cuda" and "auto" pick this process's own GPU, ``cuda:LOCAL_RANK``.
- ``eval_mode(*models)``: the models in eval mode for the duration of a ``with`` block; every
  module's own training flag is restored after it (the API never leaves a caller's model in
  another mode than it was given in).
- ``release()``: free what a finished pass left in reference cycles now (see its doc).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
from torch import nn

from passes.modules import module_device as model_device

from graphrepair.errors import GraphRepairError

__all__ = ["eval_mode", "local_rank", "model_device", "pick_device", "release"]


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, set by torchrun); 0 without one."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise GraphRepairError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer") from None


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU; ``cuda``: a GPU or an error. On CUDA the GPU
    is the ``LOCAL_RANK``-th (each process of a torchrun job on its own)."""
    if name not in ("auto", "cpu", "cuda"):
        raise GraphRepairError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GraphRepairError("--device cuda was requested but torch sees no CUDA device; "
                               "use --device cpu or auto")
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda")
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise GraphRepairError(f"LOCAL_RANK is {index} but torch sees {torch.cuda.device_count()} GPU(s); "
                               f"start at most one process per GPU on each node")
    return torch.device("cuda", index)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block, each flag restored after it."""
    flags = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


def release() -> None:
    """Collect reference cycles now. A torch.fx GraphModule and its graph refer to each other, so
    a pass's module (the pair with its taps' float64 sums, a permuted copy for a proof) outlives
    the pass until Python's collector runs, which counts objects, not bytes: on ViT-B/16 that
    kept 1.5 GB alive into the next pass. Called between the merge's passes (tens of ms)."""
    gc.collect()
