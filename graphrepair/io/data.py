"""Data files and references: what ``--data``/``--eval`` and ``load_data`` name.

* ``load_data_file(path)``: inputs ``x`` and optional labels ``y`` from ``.npz``, ``.npy``, ``.pt`` or
  ``.safetensors``, checked whole (dtypes kept, floats finite), as an :class:`ArrayDataset`; a file
  without ``x`` whose arrays are named after the forward's keyword arguments (``input_ids``,
  ``attention_mask``, ...) gives them as keyword inputs, its labels under ``y`` or ``labels``;
* ``load_data(ref)``: a data file, or ``MODULE:FUNCTION`` returning data.

How data of any kind is read in batches, the same way by every pass, is ``io.examples``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from graphrepair.errors import DataError, GraphRepairError
from graphrepair.io.fileio import check_source
from graphrepair.io.inputs import as_tensor, no_values
from graphrepair.io.loading import call_reference

__all__ = ["DATA_SUFFIXES", "ArrayDataset", "checked_arrays", "load_data", "load_data_file"]

DATA_SUFFIXES = (".npz", ".npy", ".pt", ".safetensors")


class ArrayDataset(Dataset):
    """Inputs ``x`` and optional labels ``y`` held in memory, with the file they came from. ``x``
    is a tensor (the model's one positional input) or a dict of tensors sharing their first axis
    (keyword inputs, ``model(**x)``).

    A map-style Dataset (``ds[i]`` is ``x[i]`` or ``(x[i], y[i])``, a dict of rows for keyword
    inputs), so a DataLoader works on it; ``io.examples.Examples`` slices it directly instead.
    """

    def __init__(self, x: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor | None = None,
                 source: str = "<memory>"):
        self.x = x
        self.y = y
        self.source = source

    def __len__(self) -> int:
        return next(iter(self.x.values())).shape[0] if isinstance(self.x, dict) else self.x.shape[0]

    def head(self, n: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """The inputs of the first ``n`` examples."""
        return {k: v[:n] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[:n]

    def __getitem__(self, index: int) -> Any:
        x = {k: v[index] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[index]
        return x if self.y is None else (x, self.y[index])

    def __repr__(self) -> str:
        y = "None" if self.y is None else f"{tuple(self.y.shape)} {self.y.dtype}"
        x = ({k: f"{tuple(v.shape)} {v.dtype}" for k, v in self.x.items()} if isinstance(self.x, dict)
             else f"{tuple(self.x.shape)} {self.x.dtype}")
        return f"ArrayDataset(x={x}, y={y}, source={self.source!r})"


# --------------------------------------------------------------------------------------------------
# Files and references


def _check_array(value: Any, key: str, path: Path | str, keys: list[str]) -> torch.Tensor:
    """``value`` as a tensor of examples; ``path`` is a file (or, as a string, names the source)."""
    where = f"data file '{path}'" if isinstance(path, Path) else str(path)
    tensor = as_tensor(value)
    if tensor is None:
        raise DataError(
            f"{where}: '{key}' is a {type(value).__name__}, not an array; "
            f"it must hold tensors or arrays (keys: {', '.join(keys) or 'none'})"
        )
    if tensor.is_meta:
        raise no_values(where, repr(key))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{where}: '{key}' has dtype {tensor.dtype}; expected integers or floats")
    if tensor.dim() == 0:
        raise DataError(f"{where}: '{key}' is a scalar; it needs a first (example) axis")
    if tensor.is_floating_point():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise DataError(f"{where}: '{key}' has {bad} NaN or infinite values; clean the data")
    return tensor


LABEL_NAMES = ("y", "labels", "label")  # where a file of keyword arrays keeps its labels


def _read_file(path: Path) -> tuple[Any, Any, list[str]]:
    """(x, y or None, the keys found) as stored in the file; x is None when the file has neither
    ``x`` nor other named arrays, a dict of its named arrays (keyword inputs) when it has no ``x``."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return _split_named({k: archive[k] for k in archive.files})
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, ["(a single array)"]
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _split_named(load_file(str(path), device="cpu"))
    if suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, torch.Tensor):
            return loaded, None, ["(a single tensor)"]
        if not isinstance(loaded, Mapping):
            raise DataError(
                f"data file '{path}' holds a {type(loaded).__name__}; expected a dict with 'x' (and 'y'), "
                "e.g. torch.save({'x': x, 'y': y}, path)"
            )
        return _split_named({str(k): v for k, v in loaded.items()})
    raise DataError(
        f"data file '{path}' has an unknown extension '{path.suffix}'; expected one of {', '.join(DATA_SUFFIXES)}"
    )


def _split_named(arrays: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    keys = list(arrays)
    if "x" in arrays:
        return arrays["x"], arrays.get("y"), keys
    labels = [k for k in LABEL_NAMES if k in arrays]
    inputs = {k: v for k, v in arrays.items() if k not in LABEL_NAMES}
    return (inputs or None), (arrays[labels[0]] if labels else None), keys


def checked_arrays(x: Any, y: Any, source: str) -> ArrayDataset:
    """Inputs ``x`` and labels ``y`` (or None) held in memory, checked whole like a data file's;
    ``source`` names them in messages."""
    keys = ["x"] + (["y"] if y is not None else [])
    x_t = _check_array(x, "x", source, keys)
    y_t = _check_array(y, "y", source, keys) if y is not None else None
    if y_t is not None and y_t.shape[0] != x_t.shape[0]:
        raise DataError(f"{source}: 'x' has {x_t.shape[0]} examples but 'y' has {y_t.shape[0]}")
    if x_t.shape[0] == 0:
        raise DataError(f"{source} has no examples ('x' has shape {tuple(x_t.shape)})")
    return ArrayDataset(x_t, y_t, source=source)


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
            f"data file '{path}' has no inputs (it has: {', '.join(keys) or 'nothing'}); store the inputs "
            "under 'x' and the labels under 'y', e.g. numpy.savez(path, x=inputs, y=labels), or the "
            "forward's keyword inputs under their names, e.g. numpy.savez(path, input_ids=ids, "
            "attention_mask=mask, labels=labels)"
        )
    if isinstance(x, dict):
        x_tensor = {k: _check_array(v, k, path, keys) for k, v in x.items()}
        lengths = {k: t.shape[0] for k, t in x_tensor.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"data file '{path}': its inputs differ in length ("
                            + ", ".join(f"'{k}' {n}" for k, n in lengths.items())
                            + "); each keyword input needs one row per example")
        n, first = next(iter(lengths.values())), next(iter(x_tensor))
    else:
        x_tensor = _check_array(x, "x", path, keys)
        n, first = x_tensor.shape[0], "x"
    y_tensor = None
    if y is not None:
        name = "y" if "y" in keys else next(k for k in LABEL_NAMES if k in keys)
        y_tensor = _check_array(y, name, path, keys)
        if y_tensor.shape[0] != n:
            raise DataError(f"data file '{path}': '{first}' has {n} examples but '{name}' has {y_tensor.shape[0]}")
    if n == 0:
        raise DataError(f"data file '{path}' has no examples ('{first}' has none)")
    return ArrayDataset(x_tensor, y_tensor, source=str(path))


def load_data(ref: str | os.PathLike) -> Any:
    """A data file (see :func:`load_data_file`) or ``MODULE:FUNCTION`` returning data.

    The function is called with no arguments and may return anything ``io.examples.Examples``
    accepts (an iterable of batches, a DataLoader, a tensor, an ArrayDataset).
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
        as_tensor(data) is not None or isinstance(data, (Iterable, Dataset, Mapping))
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
