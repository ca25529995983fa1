"""Example data: batches from tensors, DataLoaders, iterables and data files.

What counts as data (the same everywhere in graphrepair):

* one tensor (or numpy array) of inputs, split along its first axis into batches;
* an :class:`ArrayDataset` (what :func:`load_data_file` returns), a ``torch.utils.data.TensorDataset``,
  a dict with ``"x"`` (and ``"y"``) tensors, or a *tuple* ``(x, y)`` of two tensors with the same
  number of examples (what ``fixtures.datasets`` returns): inputs and labels, split into batches.
  A list of two tensors stays a list of two batches;
* any other map-style ``Dataset`` (batched with a ``DataLoader``, in order);
* any iterable of batches -- a ``DataLoader``, a list, a generator -- where each batch is a tensor, a
  tuple/list whose first item is the input (second: the labels), or a dict holding the input under
  ``"x"`` or ``"input_ids"`` (else its first value) and the labels under ``"y"``, ``"labels"`` or
  ``"label"``.

Dtypes are kept as they are: integer inputs (token ids) stay integers, floats stay floats.
A generator can be iterated once only; pass a list, a tensor or a DataLoader when the data is used
for more than one pass (for instance one pass per model).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from graphrepair.errors import DataError, FewerExamplesWarning, GraphRepairError
from graphrepair.io.fileio import check_source
from graphrepair.io.loading import call_reference

__all__ = [
    "DATA_SUFFIXES",
    "ArrayDataset",
    "CheckedData",
    "ExampleStream",
    "FewerExamplesWarning",
    "LabelRule",
    "check_batch_shape",
    "check_examples_vary",
    "check_inputs",
    "check_labels",
    "in_memory",
    "iter_batches",
    "iter_labeled",
    "load_data",
    "load_data_file",
    "take_examples",
]

DATA_SUFFIXES = (".npz", ".npy", ".pt", ".safetensors")
_INPUT_KEYS = ("x", "input_ids")
_LABEL_KEYS = ("y", "labels", "label")


class ArrayDataset(Dataset):
    """Inputs ``x`` and optional labels ``y`` held in memory, with the file they came from.

    A map-style Dataset (``ds[i]`` is ``x[i]`` or ``(x[i], y[i])``), so a DataLoader works on it;
    :func:`iter_batches` slices it directly instead.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, source: str = "<memory>"):
        self.x = x
        self.y = y
        self.source = source

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> Any:
        return self.x[index] if self.y is None else (self.x[index], self.y[index])

    def __repr__(self) -> str:
        y = "None" if self.y is None else f"{tuple(self.y.shape)} {self.y.dtype}"
        return f"ArrayDataset(x={tuple(self.x.shape)} {self.x.dtype}, y={y}, source={self.source!r})"


# --------------------------------------------------------------------------------------------------
# Batches


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(value)
        except TypeError as exc:
            raise DataError(f"numpy array of dtype {value.dtype} cannot be used as a tensor: {exc}") from exc
    return None


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, Any]:
    """(input, labels or None) of one batch."""
    what = (
        "each batch must be a tensor, a tuple/list whose first item is the input tensor, "
        "or a dict with the input under 'x' or 'input_ids'"
    )
    y: Any = None
    tensor = _as_tensor(batch)
    if tensor is not None:
        x: Any = tensor
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(f"batch {index} is an empty {type(batch).__name__}; {what}")
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, Mapping):
        if not batch:
            raise DataError(f"batch {index} is an empty dict; {what}")
        key = next((k for k in _INPUT_KEYS if k in batch), next(iter(batch)))
        x = batch[key]
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    else:
        raise DataError(f"batch {index} is a {type(batch).__name__}; {what}")
    x_tensor = _as_tensor(x)
    if x_tensor is None:
        raise DataError(f"the input of batch {index} is a {type(x).__name__}, not a tensor; {what}")
    if x_tensor.dim() == 0:
        raise DataError(f"the input of batch {index} is a scalar; a batch needs a first (batch) axis")
    y_tensor = _as_tensor(y) if y is not None else None
    return x_tensor, (y_tensor if y_tensor is not None else y)


def _sliced(x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    if x.dim() == 0:
        raise DataError("data is a scalar tensor; give inputs with a first (batch) axis")
    if y is not None and y.shape[0] != x.shape[0]:
        raise DataError(f"inputs and labels differ in length: x has {x.shape[0]} examples, y has {y.shape[0]}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], (None if y is None else y[start : start + batch_size])


def _describe(data: Any) -> str:
    if isinstance(data, ArrayDataset):
        return f"'{data.source}'"
    if isinstance(data, torch.Tensor):
        return "the data tensor"
    return f"the {type(data).__name__} given"


def _is_xy_pair(data: Any) -> bool:
    """A tuple (x, y) of inputs and labels, as opposed to an iterable of two batches. Two tensors
    of one kind (same trailing shape and dtype) with different lengths are two batches; of
    different kinds they are inputs and labels, and then their lengths must agree."""
    if not (isinstance(data, tuple) and len(data) == 2):
        return False
    x, y = (_as_tensor(item) for item in data)
    if x is None or y is None or x.dim() < 1 or y.dim() < 1:
        return False
    if x.shape[0] == y.shape[0]:
        return True
    if x.shape[1:] == y.shape[1:] and x.dtype == y.dtype:
        return False
    raise DataError(f"inputs and labels differ in length: x has {x.shape[0]} examples, y has {y.shape[0]}; "
                    "give one label per example")


def _raw_pairs(data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """(x, y or None) per batch, before device moves and the emptiness check."""
    if data is None:
        raise DataError("no data given (None); pass a tensor, a DataLoader, an iterable of batches or a data file")
    if isinstance(data, (str, bytes, os.PathLike)):
        raise DataError(
            f"data is a {type(data).__name__} ({data!r}), not loaded data; "
            "use graphrepair.io.data.load_data(path_or_reference) first"
        )
    tensor = _as_tensor(data)
    if tensor is not None:
        yield from _sliced(tensor, None, batch_size)
    elif isinstance(data, ArrayDataset):
        yield from _sliced(data.x, data.y, batch_size)
    elif isinstance(data, TensorDataset):
        tensors = data.tensors
        yield from _sliced(tensors[0], tensors[1] if len(tensors) > 1 else None, batch_size)
    elif _is_xy_pair(data):
        yield from _sliced(_as_tensor(data[0]), _as_tensor(data[1]), batch_size)
    elif isinstance(data, Mapping) and "x" in data and _as_tensor(data["x"]) is not None:
        y = _as_tensor(data["y"]) if "y" in data else None
        yield from _sliced(_as_tensor(data["x"]), y, batch_size)
    elif (isinstance(data, Dataset) and not isinstance(data, IterableDataset)
          and hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        for i, batch in enumerate(DataLoader(data, batch_size=batch_size, shuffle=False)):
            yield _split_batch(batch, i)
    elif isinstance(data, Iterable) and not isinstance(data, Mapping):
        for i, batch in enumerate(data):
            yield _split_batch(batch, i)
    else:
        raise DataError(
            f"data of type {type(data).__name__} is not a tensor, a dataset or an iterable of batches"
        )


def _pairs(data: Any, batch_size: int, device: torch.device | str | None) -> Iterator[tuple[torch.Tensor, Any]]:
    _check_batch_size(batch_size)
    count = 0
    for x, y in _raw_pairs(data, batch_size):
        if x.shape[0] == 0:
            continue
        if device is not None:
            x = x.to(device, non_blocking=True)
            if isinstance(y, torch.Tensor):
                y = y.to(device, non_blocking=True)
        count += 1
        yield x, y
    if count == 0:
        hint = ""
        if isinstance(data, Iterator):
            hint = ("; an iterator or generator can be used once only -- pass a list, a tensor or a "
                    "DataLoader when the data is needed again")
        raise DataError(f"{_describe(data)} has no batches (no examples){hint}")


def iter_batches(data: Any, batch_size: int = 256, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Yield the input tensor of every batch of ``data``, moved to ``device`` if given.

    Tensors and in-memory datasets are split into batches of ``batch_size``; iterables keep their
    own batches. Batches with no examples are skipped; data with no examples at all raises
    DataError at the end of the iteration.
    """
    for x, _ in _pairs(data, batch_size, device):
        yield x


def iter_labeled(
    data: Any, batch_size: int = 256, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` per batch for evaluation; DataError if a batch has no labels."""
    for i, (x, y) in enumerate(_pairs(data, batch_size, device)):
        if y is None:
            raise DataError(
                f"batch {i} of {_describe(data)} has inputs but no labels; evaluation needs (x, y) batches, "
                "a dict with 'y'/'labels', or a data file with a 'y' array"
            )
        if not isinstance(y, torch.Tensor):
            raise DataError(f"the labels of batch {i} are a {type(y).__name__}, not a tensor")
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"batch {i} has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
                "give one label per example"
            )
        yield x, y


class ExampleStream(Iterator[Any]):
    """The batches of :func:`take_examples`; ``count`` is the number of examples yielded so far."""

    def __init__(self, data: Any, n: int, batch_size: int, device: torch.device | str | None, labeled: bool):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"the number of examples must be a positive integer, got {n!r}")
        _check_batch_size(batch_size)
        self.requested = n
        self.count = 0
        self._iterator = self._generate(data, batch_size, device, labeled)

    def _generate(self, data: Any, batch_size: int, device: Any, labeled: bool) -> Iterator[Any]:
        source = iter_labeled(data, batch_size, device) if labeled else iter_batches(data, batch_size, device)
        for item in source:
            x = item[0] if labeled else item
            keep = min(x.shape[0], self.requested - self.count)
            if keep < x.shape[0]:
                item = (item[0][:keep], item[1][:keep]) if labeled else item[:keep]
            self.count += keep
            yield item
            if self.count >= self.requested:
                return
        warnings.warn(
            f"{_describe(data)} has only {self.count} examples, fewer than the {self.requested} "
            f"requested; using {self.count}",
            FewerExamplesWarning,
            stacklevel=3,
        )

    def __iter__(self) -> ExampleStream:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)


def take_examples(
    data: Any,
    n: int,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    *,
    labeled: bool = False,
) -> ExampleStream:
    """Batches of ``data`` (inputs, or ``(x, y)`` with ``labeled=True``) until ``n`` examples.

    The last batch is trimmed so that exactly ``n`` examples are yielded and no further batch is
    read (an endless iterable is fine). If the data runs out first, a FewerExamplesWarning gives the
    number actually used, which is also ``stream.count`` afterwards. Data with no examples raises
    DataError.
    """
    return ExampleStream(data, n, batch_size, device, labeled)


def check_batch_shape(x: torch.Tensor, expected: Sequence[int | None], where: str) -> None:
    """DataError unless ``x.shape[1:]`` equals ``expected`` (``None`` or ``-1`` matches any size).

    ``where`` names the data in the message, e.g. ``"--data fit.npz"``.
    """
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


# --------------------------------------------------------------------------------------------------
# Checking data as it streams


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_inputs(x: torch.Tensor, like: torch.Tensor, where: str, index: int | None = None) -> None:
    """DataError unless the inputs ``x`` of a batch are of the kind of ``like`` (the first batch,
    which the model was tried on): the same dtype, the same number of axes and, for floating
    inputs, the same example shape (integer token ids may vary in length); floats must be finite.
    ``where`` names the data (e.g. ``"--data fit.npz"``), ``index`` the batch."""
    at = f"{where}: batch {index}" if index is not None else where
    if x.dtype != like.dtype:
        raise DataError(f"{at} has inputs of dtype {_dtype(x)} where the first batch has {_dtype(like)}; "
                        "give every batch the same dtype")
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{at} has inputs of dtype {_dtype(x)}; expected integers or floats")
    if x.is_floating_point():
        check_batch_shape(x, tuple(like.shape[1:]), at)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{at} has {bad} NaN or infinite input values; clean the data")
    elif x.dim() != like.dim():
        check_batch_shape(x, (None,) * (like.dim() - 1), at)


class LabelRule:
    """What labels must look like for a classifier whose outputs (logits) were seen on the first
    batch: integer class indices in ``[0, classes)``, one per output row (``ndim`` axes: 1 for
    logits ``(N, C)``, 2 for per-token logits ``(N, T, C)``)."""

    def __init__(self, classes: int, ndim: int = 1):
        self.classes, self.ndim = classes, ndim


def check_labels(y: Any, x: torch.Tensor, rule: LabelRule, where: str, index: int | None = None) -> None:
    """DataError unless ``y`` holds valid labels for the inputs ``x`` under ``rule``."""
    at = f"{where}: batch {index}" if index is not None else where
    if y is None:
        raise DataError(f"{at} has inputs but no labels; evaluation needs (x, y) batches, a dict with "
                        "'y'/'labels', or a data file with a 'y' array")
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{at}: the labels are a {type(y).__name__}, not a tensor")
    one_hot = (y.dim() == rule.ndim + 1 and y.shape[-1] == rule.classes)
    hint = "; one-hot labels: store y.argmax(-1)" if one_hot else ""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{at}: labels have dtype {_dtype(y)}; give integer class indices{hint}")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise DataError(f"{at} has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
                        f"give one label per example{hint}")
    if y.dim() != rule.ndim:
        want = "(N,)" if rule.ndim == 1 else f"{rule.ndim} axes"
        raise DataError(f"{at}: labels have shape {tuple(y.shape)}, expected {want}: one class index per "
                        f"row of the model's outputs{hint}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= rule.classes:
            raise DataError(f"{at}: labels range over [{lo}, {hi}] but the model has {rule.classes} outputs; "
                            f"give class indices in [0, {rule.classes})")


def check_examples_vary(x: torch.Tensor, where: str) -> None:
    """DataError when all examples of ``x`` are identical (all-zero data, one example repeated):
    every activation is then constant, so there is nothing to correlate or normalise."""
    if x.shape[0] >= 2 and bool((x == x[:1]).all()):
        raise DataError(f"{where}: all {x.shape[0]} examples are identical, so no activation varies and "
                        "nothing can be matched or repaired; give real data")


def _guarded_pairs(data: Any, batch_size: int, where: str) -> Iterator[tuple[torch.Tensor, Any]]:
    """``_raw_pairs`` with the user's own failures (a generator raising midway, a Dataset's
    ``__getitem__``) turned into a DataError naming the batch. Interrupts pass through."""
    pairs = _raw_pairs(data, batch_size)
    index = 0
    while True:
        try:
            item = next(pairs)
        except StopIteration:
            return
        except (DataError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:
            text = " ".join(str(exc).split())[:300]
            raise DataError(f"{where}: reading batch {index} raised {type(exc).__name__}: {text}") from exc
        yield item
        index += 1


class CheckedData:
    """``data`` (anything :func:`iter_batches` accepts) with every batch checked as it streams:
    inputs by :func:`check_inputs` against ``like`` (None: against the first batch of each pass),
    labels by :func:`check_labels` when ``labels`` is given, and a failure of the user's iterable
    reported as a DataError naming the batch. Re-iterable when ``data`` is. Yields ``x`` or
    ``(x, y)`` per batch."""

    def __init__(self, data: Any, *, where: str, like: torch.Tensor | None = None,
                 labels: LabelRule | None = None, batch_size: int = 256):
        self.data, self.where, self.like, self.labels, self.batch_size = data, where, like, labels, batch_size

    def __iter__(self) -> Iterator[Any]:
        like = self.like
        for i, (x, y) in enumerate(_guarded_pairs(self.data, self.batch_size, self.where)):
            if x.shape[0] == 0:
                continue
            check_inputs(x, x if like is None else like, self.where, i)
            like = x if like is None else like
            if self.labels is not None:
                check_labels(y, x, self.labels, self.where, i)
            yield x if y is None else (x, y)

    def __repr__(self) -> str:
        return f"CheckedData({self.where})"


def in_memory(data: Any, source: str) -> ArrayDataset | None:
    """``data`` as a checked ArrayDataset when it is held in memory as arrays (a tensor, a numpy
    array, a TensorDataset, an ``(x, y)`` tuple or a dict with ``"x"``), so that it can be checked
    once, whole, like a data file; None for iterables of batches and other datasets."""
    if isinstance(data, ArrayDataset):
        return data
    x: Any = None
    y: Any = None
    if _as_tensor(data) is not None:
        x = data
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[0], (data.tensors[1] if len(data.tensors) > 1 else None)
    elif _is_xy_pair(data):
        x, y = data
    elif isinstance(data, Mapping) and "x" in data and _as_tensor(data["x"]) is not None:
        x, y = data["x"], data.get("y")
    else:
        return None
    keys = ["x"] + (["y"] if y is not None else [])
    x_t = _check_array(x, "x", source, keys)
    y_t = _check_array(y, "y", source, keys) if y is not None else None
    if y_t is not None and y_t.shape[0] != x_t.shape[0]:
        raise DataError(f"{source}: 'x' has {x_t.shape[0]} examples but 'y' has {y_t.shape[0]}")
    if x_t.shape[0] == 0:
        raise DataError(f"{source} has no examples ('x' has shape {tuple(x_t.shape)})")
    return ArrayDataset(x_t, y_t, source=source)


# --------------------------------------------------------------------------------------------------
# Files and references


def _check_array(value: Any, key: str, path: Path | str, keys: list[str]) -> torch.Tensor:
    """``value`` as a tensor of examples; ``path`` is a file (or, as a string, names the source)."""
    where = f"data file '{path}'" if isinstance(path, Path) else str(path)
    tensor = _as_tensor(value)
    if tensor is None:
        raise DataError(
            f"{where}: '{key}' is a {type(value).__name__}, not an array; "
            f"it must hold tensors or arrays (keys: {', '.join(keys) or 'none'})"
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{where}: '{key}' has dtype {tensor.dtype}; expected integers or floats")
    if tensor.dim() == 0:
        raise DataError(f"{where}: '{key}' is a scalar; it needs a first (example) axis")
    if tensor.is_floating_point():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise DataError(f"{where}: '{key}' has {bad} NaN or infinite values; clean the data")
    return tensor


def _read_file(path: Path) -> tuple[Any, Any, list[str]]:
    """(x, y or None, the keys found) as stored in the file."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            x = archive["x"] if "x" in keys else None
            y = archive["y"] if "y" in keys else None
        return x, y, keys
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, ["(a single array)"]
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
        return tensors.get("x"), tensors.get("y"), list(tensors)
    if suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, torch.Tensor):
            return loaded, None, ["(a single tensor)"]
        if not isinstance(loaded, Mapping):
            raise DataError(
                f"data file '{path}' holds a {type(loaded).__name__}; expected a dict with 'x' (and 'y'), "
                "e.g. torch.save({'x': x, 'y': y}, path)"
            )
        return loaded.get("x"), loaded.get("y"), [str(k) for k in loaded]
    raise DataError(
        f"data file '{path}' has an unknown extension '{path.suffix}'; expected one of {', '.join(DATA_SUFFIXES)}"
    )


def load_data_file(path: str | os.PathLike) -> ArrayDataset:
    """Read inputs ``x`` and optional labels ``y`` from ``.npz``, ``.npy``, ``.pt`` or ``.safetensors``.

    ``.npy`` holds ``x`` only. A ``.pt`` file is read with ``torch.load(weights_only=True)``.
    Dtypes are kept (integer ids stay integers); floats must be finite.
    """
    path = Path(path)
    if os.path.isdir(path):
        raise DataError(f"data path '{path}' is a directory; give a {'/'.join(DATA_SUFFIXES)} file")
    check_source(path, "data file")
    try:
        x, y, keys = _read_file(path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read data file '{path}': {type(exc).__name__}: {exc}") from exc
    if x is None:
        raise DataError(
            f"data file '{path}' has no 'x' (it has: {', '.join(keys) or 'nothing'}); store the inputs "
            "under 'x' and the labels under 'y', e.g. numpy.savez(path, x=inputs, y=labels)"
        )
    x_tensor = _check_array(x, "x", path, keys)
    y_tensor = None
    if y is not None:
        y_tensor = _check_array(y, "y", path, keys)
        if y_tensor.shape[0] != x_tensor.shape[0]:
            raise DataError(
                f"data file '{path}': 'x' has {x_tensor.shape[0]} examples but 'y' has {y_tensor.shape[0]}"
            )
    if x_tensor.shape[0] == 0:
        raise DataError(f"data file '{path}' has no examples ('x' has shape {tuple(x_tensor.shape)})")
    return ArrayDataset(x_tensor, y_tensor, source=str(path))


def load_data(ref: str | os.PathLike) -> Any:
    """A data file (see :func:`load_data_file`) or ``MODULE:FUNCTION`` returning data.

    The function is called with no arguments and may return anything :func:`iter_batches` accepts
    (an iterable of batches, a DataLoader, a tensor, an ArrayDataset).
    """
    text = os.fspath(ref)
    path = Path(text)
    if path.suffix.lower() in DATA_SUFFIXES or _lexists(path):
        return load_data_file(path)
    if ":" not in text:
        raise DataError(
            f"data '{text}' is neither an existing file nor a MODULE:FUNCTION reference; "
            f"give a {', '.join(DATA_SUFFIXES)} file or MODULE:FUNCTION"
        )
    try:
        data = call_reference(text, kind="FUNCTION")
    except (GraphRepairError, KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:  # the user's function raised something that is not an Exception
        raise DataError(f"calling '{text}' raised {type(exc).__name__}: {exc}") from exc
    if data is None or isinstance(data, (str, bytes)) or not (
        _as_tensor(data) is not None or isinstance(data, (Iterable, Dataset, Mapping))
    ):
        raise DataError(
            f"'{text}' returned a {type(data).__name__}; FUNCTION must return data: an iterable of "
            "batches, a DataLoader, a tensor or a dataset"
        )
    return data


def _lexists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False
