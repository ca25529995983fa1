"""One model input: the positional and keyword tensors of one call, ``model(*args, **kwargs)``.

How people hold a model's input, and what each becomes:

* a tensor ``x``                                   -> ``model(x)``
* a tuple (or list) of tensors ``(a, b)``          -> ``model(a, b)``        (positional arguments)
* a dict of tensors ``{"input_ids": t, ...}``      -> ``model(input_ids=t, ...)`` (keyword arguments,
  as Hugging Face models take a ``BatchEncoding``); a ``labels`` entry is the labels, not an input.

A *batch* (what data yields) is an input or ``(input, labels)``; :func:`split_batch` takes one
apart. Every tensor of an input shares its first (batch) axis; ``head(n)`` keeps the first ``n``
examples of all of them, ``to(device, dtype)`` moves them (``dtype`` casts floating tensors only:
token ids stay integers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
import weakref

import numpy as np
import torch

from graphrepair.errors import DataError

__all__ = ["LABEL_KEYS", "Inputs", "as_tensor", "no_values", "split_batch"]

LABEL_KEYS = ("labels", "label", "y")  # a dict batch's labels, in this order of preference


def as_tensor(value: Any) -> torch.Tensor | None:
    """``value`` as a tensor (a numpy array is wrapped without a copy), else None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(value)
        except TypeError as exc:
            raise DataError(f"numpy array of dtype {value.dtype} cannot be used as a tensor: {exc}") from exc
    return None


def no_values(where: str, what: str) -> DataError:
    """The error for data ``what`` (of ``where``) on the meta device."""
    return DataError(f"{where}: {what} is on the meta device (a shape without values); give tensors holding the data")


@dataclass(frozen=True)
class Inputs:
    """The tensors of one call: ``model(*args, **kwargs)``. Build it with :meth:`of`."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def of(cls, value: Any, where: str = "example_inputs") -> Inputs:
        """``value`` (an Inputs, a tensor or numpy array, a tuple/list of them, a dict of them) as
        Inputs; DataError naming ``where`` and the offending item otherwise. A dict's label entry
        (``labels``, ``label``, ``y``) is dropped: it is not an input."""
        if isinstance(value, Inputs):
            return value
        what = ("give a tensor, a tuple of tensors (positional arguments) or a dict of tensors "
                "(keyword arguments)")
        single = as_tensor(value)
        if single is not None:
            return cls((single,), {})._with_values(where)
        if isinstance(value, (tuple, list)):
            if not value:
                raise DataError(f"{where} is an empty {type(value).__name__}; {what}")
            args = []
            for i, item in enumerate(value):
                t = as_tensor(item)
                if t is None:
                    raise DataError(f"{where}: positional input {i} is a {type(item).__name__}, not a tensor; {what}")
                args.append(t)
            return cls(tuple(args), {})._with_values(where)
        if isinstance(value, Mapping):
            kwargs = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise DataError(f"{where}: key {key!r} is not a string; a dict input maps the forward's "
                                    "argument names to tensors")
                if key in LABEL_KEYS:
                    continue
                t = as_tensor(item)
                if t is None:
                    raise DataError(f"{where}: '{key}' is a {type(item).__name__}, not a tensor; {what}")
                kwargs[key] = t
            if not kwargs:
                raise DataError(f"{where} is a dict with no input tensor (keys: {', '.join(map(str, value)) or 'none'}); "
                                f"{what}")
            return cls((), kwargs)._with_values(where)
        raise DataError(f"{where} is a {type(value).__name__}; {what}")

    def _with_values(self, where: str) -> Inputs:
        """Itself; a DataError naming a tensor on the meta device (a shape without values)."""
        for name, t in self.named():
            if t.is_meta:
                raise no_values(where, "the input" if name == "0" and len(self.args) == 1 and not self.kwargs
                                else f"input {name!r}")
        return self

    # -- reading ---------------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, positional ones first, then keyword ones in their order."""
        return [*self.args, *self.kwargs.values()]

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor): ``"0"``, ``"1"``... for positional inputs, the keyword for the others."""
        for i, t in enumerate(self.args):
            yield str(i), t
        yield from self.kwargs.items()

    @property
    def first(self) -> torch.Tensor:
        """The first tensor (the one a single-input model takes)."""
        return self.tensors()[0]

    @property
    def batch_size(self) -> int:
        """The examples in this input: the first axis of its tensors (DataError if they differ,
        or if a tensor has no batch axis)."""
        sizes = set()
        for name, t in self.named():
            if t.dim() == 0:
                raise DataError(f"input '{name}' is a scalar; every input needs a first (batch) axis")
            sizes.add(t.shape[0])
        if len(sizes) != 1:
            shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in self.named())
            raise DataError(f"the inputs of one batch differ in their number of examples ({shapes}); "
                            "every input needs the same first (batch) axis")
        return sizes.pop()

    @property
    def device(self) -> torch.device:
        return self.first.device

    def signature(self) -> tuple:
        """What decides a trace: per input its name, dtype and shape without the batch axis."""
        return tuple((name, str(t.dtype), tuple(t.shape[1:])) for name, t in self.named())

    def fingerprint(self) -> tuple:
        """A cheap identity of the examples (shapes and two float64 sums per tensor, one of them
        weighted by position), read from the device once: the same batch read twice gives the same
        fingerprint, a reordered or other batch almost surely not. Used to check that a pass sees
        the examples of the first."""
        sums = []
        for _, t in self.named():
            rows = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
            per_row = rows.sum(1, dtype=torch.float64)
            where = torch.arange(1, per_row.shape[0] + 1, dtype=torch.float64, device=per_row.device)
            sums.append(torch.stack([per_row.sum(), (per_row * where).sum()]))
        values = torch.cat(sums).tolist() if sums else []
        return tuple((name, tuple(t.shape), values[2 * i], values[2 * i + 1])
                     for i, (name, t) in enumerate(self.named()))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named()]

    def describe(self) -> str:
        return ", ".join(f"{n}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for n, t in self.named())

    # -- deriving --------------------------------------------------------------------------------

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """``fn`` applied to every tensor."""
        return Inputs(tuple(fn(t) for t in self.args), {k: fn(t) for k, t in self.kwargs.items()})

    def head(self, n: int) -> Inputs:
        """The first ``n`` examples."""
        return self.map(lambda t: t[:n])

    def slice(self, start: int, stop: int) -> Inputs:
        return self.map(lambda t: t[start:stop])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Inputs:
        """On ``device``; floating tensors cast to ``dtype`` when given (integers stay)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            return t.to(device, non_blocking=True) if device is not None else t
        return self.map(move)

    def detach(self) -> Inputs:
        return self.map(lambda t: t.detach())

    def cpu(self) -> Inputs:
        return self.map(lambda t: t.cpu())

    def call(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``, on copies of the tensors for a model whose forward writes
        into its inputs (``x /= 255``, ``x.sub_(mean)``): the caller's data is left as it is, and
        every call sees the data as given (a proof running the model twice on one example, the
        two models of a merge fed one batch). Whether a model writes into its inputs is found on
        its first call, given copies (their version counters move), and kept while it lives."""
        try:
            writes = _WRITES_INPUTS.get(model)
        except TypeError:  # (no weak reference can hold it: every call copies)
            writes = True
        if writes is False:
            return model(*self.args, **self.kwargs)
        own = self.map(lambda t: t.clone())
        versions = [t._version for _, t in own.named()]
        out = model(*own.args, **own.kwargs)
        if writes is None:
            _WRITES_INPUTS[model] = any(t._version != v for (_, t), v in zip(own.named(), versions))
        return out

    @staticmethod
    def cat(parts: list[Inputs]) -> Inputs:
        """The examples of ``parts`` (inputs of one signature) in one Inputs."""
        first = parts[0]
        args = tuple(torch.cat([p.args[i] for p in parts]) for i in range(len(first.args)))
        kwargs = {k: torch.cat([p.kwargs[k] for p in parts]) for k in first.kwargs}
        return Inputs(args, kwargs)


# model -> whether its forward writes into its inputs (``Inputs.call``)
_WRITES_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_batch(batch: Any, where: str = "the data") -> tuple[Inputs, Any]:
    """(inputs, labels or None) of one batch of data.

    * a tensor: the input, no labels;
    * a tuple/list: its first item is the input (a tensor, a tuple of tensors or a dict), its second
      (if any) the labels;
    * a dict: ``{"x": ..., "y": ...}`` (``x`` and labels only) holds the input under ``x``; any
      other dict is keyword inputs, every entry but the labels (``labels``, ``label``, ``y``), as a
      Hugging Face batch holds them (nothing is dropped).
    """
    what = ("each batch must be an input (a tensor, or a dict of tensors for keyword inputs) or "
            "(input, labels); a tuple of several inputs goes inside: ((a, b), labels)")
    t = as_tensor(batch)
    if t is not None:
        return Inputs((t,), {}), None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(f"{where} is an empty {type(batch).__name__}; {what}")
        labels = batch[1] if len(batch) > 1 else None
        return Inputs.of(batch[0], f"the input of {where}"), _labels(labels)
    if isinstance(batch, Mapping):
        if not batch:
            raise DataError(f"{where} is an empty dict; {what}")
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if "x" in batch and set(batch) <= {"x", *LABEL_KEYS}:
            return Inputs.of(batch["x"], f"'x' of {where}"), _labels(labels)
        return Inputs.of(batch, where), _labels(labels)
    raise DataError(f"{where} is a {type(batch).__name__}; {what}")


def _labels(value: Any) -> Any:
    t = as_tensor(value) if value is not None else None
    return t if t is not None else value
