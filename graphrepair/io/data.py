"""Data files and references: what ``--data``/``--eval`` and ``load_data`` name.

* ``load_data_file(path)``: inputs ``x`` and optional labels ``y`` from ``.npz``, ``.npy``, ``.pt`` or
  ``.safetensors``, checked whole (dtypes kept, floats finite), as an :class:`ArrayDataset`;
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
from graphrepair.io.inputs import as_tensor
from graphrepair.io.loading import call_reference

__all__ = ["DATA_SUFFIXES", "ArrayDataset", "checked_arrays", "load_data", "load_data_file"]

DATA_SUFFIXES = (".npz", ".npy", ".pt", ".safetensors")


class ArrayDataset(Dataset):
    """Inputs ``x`` and optional labels ``y`` held in memory, with the file they came from.

    A map-style Dataset (``ds[i]`` is ``x[i]`` or ``(x[i], y[i])``), so a DataLoader works on it;
    ``io.examples.Examples`` slices it directly instead.
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
