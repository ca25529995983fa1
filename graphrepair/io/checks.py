"""Checks of data: each batch against the first (dtype, example shape, finite floats), labels against
a classifier's outputs, examples that do not vary. ``io.examples`` runs them as batches stream;
the command line runs them on data it holds whole. Also the tolerances a comparison of outputs is
given (a proof, the ONNX check: ``check_tolerances``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from graphrepair.errors import DataError, GraphRepairError
from graphrepair.io.inputs import Inputs

__all__ = ["LabelRule", "check_batch_shape", "check_examples_vary", "check_inputs", "check_labels",
           "check_tolerances"]


def check_tolerances(rtol: Any, atol: Any) -> None:
    """A GraphRepairError unless both tolerances of a comparison (a proof, the ONNX check) are
    finite numbers >= 0: a negative one fails every comparison, and a proof would then blame
    discovery."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise GraphRepairError(f"{name} must be a finite number >= 0, got {v!r}")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_batch_shape(x: torch.Tensor, expected: Sequence[int | None], where: str) -> None:
    """DataError unless ``x.shape[1:]`` equals ``expected`` (``None`` or ``-1`` matches any size).
    ``where`` names the data in the message, e.g. ``"--data fit.npz"``."""
    found = tuple(x.shape[1:])
    want = tuple(expected)
    fits = len(found) == len(want) and all(w is None or w == -1 or w == f for f, w in zip(found, want))
    if not fits:
        sizes = ["*" if w is None or w == -1 else str(w) for w in want]
        shown = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
        raise DataError(
            f"{where}: examples have shape {found} (batch {tuple(x.shape)}), expected {shown}; "
            "give data shaped like the model's input"
        )


def check_inputs(x: Inputs, like: Inputs, where: str, index: int | None = None) -> None:
    """DataError unless the inputs ``x`` of a batch are of the kind of ``like`` (the first batch,
    which the model was tried on): the same inputs, each of the same dtype, the same number of axes
    and, for floating inputs, the same example shape (integer token ids may vary in length); floats
    must be finite. ``where`` names the data (e.g. ``"--data fit.npz"``), ``index`` the batch."""
    at = f"{where}: batch {index}" if index is not None else where
    names, want = [n for n, _ in x.named()], [n for n, _ in like.named()]
    if names != want:
        raise DataError(f"{at} has inputs {', '.join(names)} where the first batch has {', '.join(want)}; "
                        "give every batch the same inputs")
    for (name, t), (_, ref) in zip(x.named(), like.named()):
        label = at if len(names) == 1 else f"{at} (input '{name}')"
        if t.dtype != ref.dtype:
            raise DataError(f"{label} has inputs of dtype {_dtype(t)} where the first batch has {_dtype(ref)}; "
                            "give every batch the same dtype")
        if t.is_complex() or t.dtype == torch.bool:
            raise DataError(f"{label} has inputs of dtype {_dtype(t)}; expected integers or floats")
        if t.is_floating_point():
            check_batch_shape(t, tuple(ref.shape[1:]), label)
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise DataError(f"{label} has {bad} NaN or infinite input values; clean the data")
        elif t.dim() != ref.dim():
            check_batch_shape(t, (None,) * (ref.dim() - 1), label)


def example_shapes(x: Inputs) -> str:
    """The shape of one example of ``x`` (beyond the batch axis), per input where there are several."""
    named = [(n, tuple(t.shape[1:])) for n, t in x.named()]
    return str(named[0][1]) if len(named) == 1 else ", ".join(f"{n}: {s}" for n, s in named)


def raise_if_other_shape(exc: Exception, where: str, inputs: Inputs, first: str) -> None:
    """DataError when a model failed (``exc``) on the batch ``where`` whose examples are not of the
    first batch's shapes ``first`` (``example_shapes``), which it ran on: the data, not the model,
    is at fault. (A model taking inputs of any size runs on such batches: they are not refused
    before it runs, except on the command line, ``Examples(strict=True)``.)"""
    if isinstance(exc, GraphRepairError) or example_shapes(inputs) == first:
        return
    text = " ".join(str(exc).split())[:300]
    raise DataError(f"{where} holds examples of shape {example_shapes(inputs)}, the first batch {first}, and "
                    f"the model failed on it ({type(exc).__name__}: {text}); give batches of the shapes the "
                    f"model takes") from exc


IGNORE_INDEX = -100  # a label skipped by accuracy and loss alike (cross_entropy's default, e.g. padding)


class LabelRule:
    """What labels must look like for a classifier whose outputs (logits) were seen on the first
    batch: integer class indices in ``[0, classes)``, one per output row (``ndim`` axes: 1 for
    logits ``(N, C)``, 2 for per-token logits ``(N, T, C)``)."""

    def __init__(self, classes: int, ndim: int = 1):
        self.classes, self.ndim = classes, ndim


def check_labels(y: Any, x: torch.Tensor | Inputs, rule: LabelRule | None, where: str,
                 index: int | None = None) -> None:
    """DataError unless ``y`` holds labels for the inputs ``x`` (one per example); with ``rule``,
    valid class indices of its classifier."""
    at = f"{where}: batch {index}" if index is not None else where
    n = x.batch_size if isinstance(x, Inputs) else x.shape[0]
    if y is None:
        raise DataError(f"{at} has inputs but no labels; evaluation needs (x, y) batches, a dict with "
                        "'y'/'labels', or a data file with a 'y' array")
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{at}: the labels are a {type(y).__name__}, not a tensor")
    one_hot = rule is not None and y.dim() == rule.ndim + 1 and y.shape[-1] == rule.classes
    hint = "; one-hot labels: store y.argmax(-1)" if one_hot else ""
    if y.dim() == 0 or y.shape[0] != n:
        raise DataError(f"{at} has {n} inputs but labels of shape {tuple(y.shape)}; "
                        f"give one label per example{hint}")
    if rule is None:
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{at}: labels have dtype {_dtype(y)}; give integer class indices{hint}")
    if y.dim() != rule.ndim:
        want = "(N,)" if rule.ndim == 1 else f"{rule.ndim} axes"
        raise DataError(f"{at}: labels have shape {tuple(y.shape)}, expected {want}: one class index per "
                        f"row of the model's outputs{hint}")
    scored = y[y != IGNORE_INDEX]
    if scored.numel():
        lo, hi = int(scored.min()), int(scored.max())
        if lo < 0 or hi >= rule.classes:
            raise DataError(f"{at}: labels range over [{lo}, {hi}] but the model has {rule.classes} outputs; "
                            f"give class indices in [0, {rule.classes}) ({IGNORE_INDEX} marks an example to skip)")


def check_examples_vary(x: Inputs | torch.Tensor, where: str) -> None:
    """DataError when all examples are identical (all-zero data, one example repeated): every
    activation is then constant, so there is nothing to correlate or normalise."""
    tensors = x.tensors() if isinstance(x, Inputs) else [x]
    if tensors[0].shape[0] >= 2 and all(bool((t == t[:1]).all()) for t in tensors):
        raise DataError(f"{where}: all {tensors[0].shape[0]} examples are identical, so no activation varies "
                        "and nothing can be matched or repaired; give real data")
