"""Examples: the one way every pass reads data (statistics, REPAIR, refit, evaluation, sharding).

``Examples(data, n, batch_size, device=..., dtype=...)`` is built once from anything a user passes:

* one tensor (or numpy array) of inputs, split along its first axis into batches;
* arrays of inputs and labels held in memory: an ``ArrayDataset`` (what ``load_data_file`` returns),
  a ``TensorDataset``, a dict with ``"x"`` (and ``"y"``), a *tuple* ``(x, y)`` of two tensors with the
  same number of examples, or a dict of keyword tensors with one first axis (a ``labels`` entry is
  the labels), all split into batches. A list of two tensors stays a list of two batches (refused
  where the second is one integer label per example of the first: a tuple was meant);
* any other map-style ``Dataset`` (batched with a ``DataLoader``, in order);
* any iterable of batches -- a ``DataLoader``, a list, a generator -- each batch as
  ``io.inputs.split_batch`` reads it: a tensor, ``(input, labels)``, or a dict of keyword tensors
  with a ``labels`` entry.

It yields one :class:`Batch` (``inputs``: an ``Inputs``, ``labels``) per batch, at most ``n`` examples
(the last batch cut), on ``device``, floating inputs cast to ``dtype`` (the model's: a bfloat16 or
float64 model given float32 data runs on its own dtype; integer token ids stay integers).

**Every pass sees the same examples.** A merge reads its data several times (the joint pass of the
endpoints, REPAIR's pass of the merged model, the refit's passes), and pairs what one pass measured
with what another computes; a loader that reorders between passes (``DataLoader(shuffle=True)``)
would pair the statistics of some examples with the inputs of others. So:

* the examples of the first pass are held in memory (converted, on ``device``) when they take at
  most ``hold_bytes`` (``HOLD_BYTES``, 1 GiB); every later pass replays them;
* when they do not fit, later passes read the source again, and each batch must have the
  ``Inputs.fingerprint`` it had in the first pass: otherwise a DataError says that the data gave
  other examples in pass k than in pass 1, and what to do (tensors, lists and in-memory arrays,
  which cannot change, are not checked);
* a ``DataLoader`` whose sampler shuffles (``RandomSampler``) and whose examples cannot be held is
  refused before the first pass;
* a one-shot iterator (a generator) is read once and held whatever its size.

``consistent=False`` (evaluation, where a pass over all the data gives one answer in any order)
drops the check and the refusal. ``strict=True`` (the command line) also checks every batch as it
streams: the dtype and the example shape of the first batch (integer ids may vary in length) and
finite floats (``io.checks``). A failure of the user's own iterable is a DataError naming the batch.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset

from graphrepair.errors import DataError, GraphRepairWarning
from graphrepair.io.checks import LabelRule, check_inputs, check_labels
from graphrepair.io.data import ArrayDataset, checked_arrays
from graphrepair.io.inputs import LABEL_KEYS, Inputs, as_tensor, split_batch

__all__ = ["HOLD_BYTES", "Batch", "DifferentExamplesError", "Examples", "FewerExamplesWarning", "in_memory",
           "is_xy_pair"]

HOLD_BYTES = 2 ** 30  # the examples of a pass are held in memory up to this size (as refit.CACHE_BYTES)


class FewerExamplesWarning(GraphRepairWarning):
    """The data held fewer examples than were asked for; the message gives the number used."""


@dataclass(frozen=True)
class Batch:
    """One batch: the model's inputs and the labels (None without)."""

    inputs: Inputs
    labels: Any = None

    @property
    def size(self) -> int:
        return self.inputs.batch_size

    def head(self, n: int) -> Batch:
        if n >= self.size:
            return self
        labels = self.labels[:n] if isinstance(self.labels, torch.Tensor) else self.labels
        return Batch(self.inputs.head(n), labels)

    def to(self, device, dtype=None) -> Batch:
        labels = self.labels
        if isinstance(labels, torch.Tensor) and device is not None:
            labels = labels.to(device, non_blocking=True)
        return Batch(self.inputs.to(device, dtype), labels)

    @property
    def nbytes(self) -> int:
        ts = self.inputs.tensors() + ([self.labels] if isinstance(self.labels, torch.Tensor) else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _check_count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Sources: what the data is, read as (Inputs, labels) per batch


class _Arrays:
    """Inputs and labels held in memory as arrays (one first axis), sliced into batches."""

    def __init__(self, inputs: Inputs, labels: torch.Tensor | None):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return self.inputs.batch_size

    def slice(self, lo: int, hi: int) -> _Arrays:
        return _Arrays(self.inputs.slice(lo, hi), None if self.labels is None else self.labels[lo:hi])

    def batches(self, batch_size: int) -> Iterator[tuple[Inputs, Any]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.inputs.slice(start, stop), None if self.labels is None else self.labels[start:stop]


def is_xy_pair(data: Any) -> bool:
    """A tuple (x, y) of inputs and labels, as opposed to an iterable of two batches. Two tensors
    of one kind (same trailing shape and dtype) with different lengths are two batches; of
    different kinds they are inputs and labels, and then their lengths must agree."""
    if not (isinstance(data, tuple) and len(data) == 2):
        return False
    x, y = (as_tensor(item) for item in data)
    if x is None or y is None or x.dim() < 1 or y.dim() < 1:
        return False
    if x.shape[0] == y.shape[0]:
        return True
    if x.shape[1:] == y.shape[1:] and x.dtype == y.dtype:
        return False
    raise DataError(f"inputs and labels differ in length: x has {x.shape[0]} examples, y has {y.shape[0]}; "
                    "give one label per example")


def _arrays(x: Any, y: Any, where: str) -> _Arrays:
    inputs = Inputs.of(x, where)
    if any(t.dim() == 0 for t in inputs.tensors()):
        raise DataError(f"{where} is a scalar tensor; give inputs with a first (batch) axis")
    size = inputs.batch_size
    labels = as_tensor(y) if y is not None else None
    if labels is not None and (labels.dim() == 0 or labels.shape[0] != size):
        raise DataError(f"inputs and labels differ in length: x has {size} examples, y has "
                        f"{labels.shape[0] if labels.dim() else 'a scalar'}")
    return _Arrays(inputs, labels)


def _keyword_arrays(data: Mapping) -> bool:
    """A dict of keyword tensors sharing one first axis (a whole tokenised data set)."""
    ts = [as_tensor(v) for v in data.values()]
    return bool(ts) and all(t is not None and t.dim() > 0 for t in ts) and len({t.shape[0] for t in ts}) == 1 \
        and all(isinstance(k, str) for k in data) and any(k not in LABEL_KEYS for k in data)


def _source(data: Any, batch_size: int) -> _Arrays | Iterable:
    """``data`` as arrays (held in memory) or as an iterable of raw batches."""
    if isinstance(data, _Arrays):
        return data
    if data is None:
        raise DataError("no data given (None); pass a tensor, a DataLoader, an iterable of batches or a data file")
    if isinstance(data, (str, bytes, os.PathLike)):
        raise DataError(f"data is a {type(data).__name__} ({data!r}), not loaded data; "
                        "use graphrepair.io.data.load_data(path_or_reference) first")
    if as_tensor(data) is not None:
        return _arrays(data, None, "data")
    if isinstance(data, ArrayDataset):
        return _arrays(data.x, data.y, f"'{data.source}'")
    if isinstance(data, TensorDataset):
        ts = data.tensors
        return _arrays(ts[0], ts[1] if len(ts) > 1 else None, "the TensorDataset")
    if is_xy_pair(data):
        return _arrays(data[0], data[1], "x")
    if _labels_in_a_list(data):
        x, y = (as_tensor(t) for t in data)
        raise DataError(f"data is a list of two tensors, read as two batches, but the second "
                        f"({tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}) looks like the labels of the "
                        f"first ({tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}): give inputs and labels as "
                        f"a tuple, (x, y)")
    if isinstance(data, Mapping):
        if "x" in data and as_tensor(data["x"]) is not None and set(data) <= {"x", *LABEL_KEYS}:
            return _arrays(data["x"], next((data[k] for k in LABEL_KEYS if k in data), None), "'x'")
        if _keyword_arrays(data):
            labels = next((data[k] for k in LABEL_KEYS if k in data), None)
            return _arrays(data, labels, "the data")
        raise DataError(f"data of type {type(data).__name__} is not a tensor, a dataset or an iterable of batches "
                        f"(a dict of data needs 'x', or keyword tensors sharing one first axis)")
    if (isinstance(data, Dataset) and not isinstance(data, IterableDataset)
            and hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterable):
        return data
    raise DataError(f"data of type {type(data).__name__} is not a tensor, a dataset or an iterable of batches")


def _labels_in_a_list(data: Any) -> bool:
    """A list [x, y] that cannot be two batches of one input: y is integer class indices, one per
    example of x, and x has more axes or is floating."""
    if not (isinstance(data, list) and len(data) == 2):
        return False
    x, y = (as_tensor(t) for t in data)
    return (x is not None and y is not None and y.dim() == 1 and x.dim() >= 1 and x.shape[0] == y.shape[0]
            and not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool
            and (x.dim() > 1 or x.is_floating_point()))


def _shuffles(data: Any) -> bool:
    """A DataLoader whose sampler draws a new order every pass."""
    if not isinstance(data, DataLoader):
        return False
    sampler = getattr(data.batch_sampler, "sampler", None) if data.batch_sampler is not None else data.sampler
    return isinstance(sampler, RandomSampler) or isinstance(data.sampler, RandomSampler)


def _describe(data: Any) -> str:
    if isinstance(data, ArrayDataset):
        return f"'{data.source}'"
    if isinstance(data, torch.Tensor):
        return "the data tensor"
    return f"the {type(data).__name__} given"


class DifferentExamplesError(DataError):
    """A later pass over the data gave other examples than the first."""


def in_memory(data: Any, source: str) -> ArrayDataset | None:
    """``data`` as a checked ArrayDataset when it is held in memory as arrays (a tensor, a numpy
    array, a TensorDataset, an ``(x, y)`` tuple or a dict with ``"x"``), so that it can be checked
    once, whole, like a data file; None for iterables of batches and other datasets."""
    if isinstance(data, ArrayDataset):
        return data
    x: Any = None
    y: Any = None
    if as_tensor(data) is not None:
        x = data
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[0], (data.tensors[1] if len(data.tensors) > 1 else None)
    elif is_xy_pair(data):
        x, y = data
    elif isinstance(data, Mapping) and "x" in data and as_tensor(data["x"]) is not None and set(data) <= {"x", "y"}:
        x, y = data["x"], data.get("y")
    else:
        return None
    return checked_arrays(x, y, source)


# --------------------------------------------------------------------------------------------------
# Examples


class Examples:
    """The examples of a computation, read in batches the same way by every pass (see the module
    doc). ``n``: examples used (None: all); ``where``: the data's name in messages;
    ``labels``: True (each batch needs one label per example) or a ``LabelRule``; ``between``: a
    callable run before every batch (a distributed run's check for another rank's failure);
    ``allow_empty``: no batch at all is not an error (a rank's empty share)."""

    def __init__(self, data: Any, n: int | None = None, batch_size: int = 256, *, device=None,
                 dtype: torch.dtype | None = None, where: str | None = None, labels: bool | LabelRule = False,
                 strict: bool = False, consistent: bool = True, hold_bytes: int = HOLD_BYTES,
                 allow_empty: bool = False, between: Callable[[], None] | None = None):
        if n is not None:
            _check_count(n, "the number of examples")
        _check_count(batch_size, "batch_size")
        self.data, self.n, self.batch_size = data, n, batch_size
        self.device, self.dtype = device, dtype
        self.where = where or _describe(data)
        self.labels, self.strict, self.consistent = labels, strict, consistent
        self.hold_bytes, self.allow_empty, self.between = hold_bytes, allow_empty, between
        self.shared_example: Inputs | None = None  # set by a distributed run: the example every rank uses
        self._source = _source(data, batch_size)
        self._one_shot = isinstance(self._source, Iterator)
        self._shuffles = _shuffles(self._source)
        self._records: list = []  # batch k as the first pass read it: a Batch while held, else its fingerprint
        self._holding = True
        self._complete = False  # the records cover all the examples
        self._held_bytes = 0
        self._count: int | None = None
        self._counted = 0  # examples the last pass read
        self._passes = 0
        self._example: Inputs | None = None
        self._first_raw: Inputs | None = None

    @classmethod
    def of(cls, data: Any, n: int | None = None, batch_size: int = 256, **options) -> Examples:
        """``data`` as Examples; Examples given are used as they are (their own ``n`` and batch
        size), taking the ``device`` and ``dtype`` given when they have none."""
        if isinstance(data, Examples):
            for key in ("device", "dtype", "between"):
                if getattr(data, key) is None and options.get(key) is not None:
                    setattr(data, key, options[key])
            if options.get("allow_empty"):
                data.allow_empty = True
            if options.get("labels") and data.labels is False:
                data.labels = options["labels"]
            return data
        return cls(data, n, batch_size, **options)

    # -- what is known without reading ---------------------------------------------------------

    @property
    def stable(self) -> bool:
        """Whether a pass over the source always gives the same examples (arrays and lists)."""
        return isinstance(self._source, (_Arrays, list, tuple))

    @property
    def held(self) -> bool:
        """Whether every pass now replays examples held in memory."""
        return self._complete and self._holding

    @property
    def count(self) -> int | None:
        """The examples a pass gives: known for arrays, else after the first complete pass."""
        if self._count is None and isinstance(self._source, _Arrays):
            size = len(self._source)
            return size if self.n is None else min(size, self.n)
        return self._count

    @property
    def empty(self) -> bool:
        """No example at all (a rank's empty share), as far as is known without reading."""
        if isinstance(self._source, _Arrays):
            return len(self._source) == 0 or self.n == 0
        if isinstance(self._source, (list, tuple)):
            return len(self._source) == 0
        return self._complete and not self._records

    def batches(self) -> int | None:
        """The number of batches of a pass (for progress), None when unknown."""
        if self._complete:
            return len(self._records)
        count = self.count if self.count is not None else self.n
        return None if count is None else -(-count // self.batch_size)

    # -- passes --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self._pass(None)

    def take(self, n: int | None) -> Iterable[Batch]:
        """The first ``n`` examples of every pass (None: all), as a re-iterable."""
        return _Take(self, n)

    def _pass(self, limit: int | None) -> Iterator[Batch]:
        if self._one_shot and not self._complete:
            self._fill()
        self._passes += 1
        if self.held:
            yield from self._replay(limit)
            return
        if self._shuffles and self.consistent:
            self._refuse_unholdable()
        seen = 0
        k = -1
        for k, batch in enumerate(self._read()):
            if self.between is not None:
                self.between()
            batch = self._record(k, batch)
            if limit is not None and seen + batch.size >= limit:
                yield batch.head(limit - seen)
                return
            seen += batch.size
            yield batch
        self._ended(k + 1)

    def _replay(self, limit: int | None) -> Iterator[Batch]:
        seen = 0
        for batch in self._records:
            if self.between is not None:
                self.between()
            batch = batch.to(self.device, self.dtype)
            if limit is not None and seen + batch.size >= limit:
                yield batch.head(limit - seen)
                return
            seen += batch.size
            yield batch

    def _fill(self) -> None:
        """Read a one-shot iterator once, holding every batch."""
        hold, self.hold_bytes = self.hold_bytes, math.inf
        try:
            k = -1
            for k, batch in enumerate(self._read()):
                self._record(k, batch)
            self._ended(k + 1)
        finally:
            self.hold_bytes = hold

    def _record(self, k: int, batch: Batch) -> Batch:
        """Batch ``k`` of this pass, checked against (or kept as) the first pass's."""
        if k < len(self._records):
            first = self._records[k]
            if self.stable or not self.consistent:
                return batch
            was = first.inputs.fingerprint() if isinstance(first, Batch) else first
            if batch.inputs.fingerprint() != was:
                raise self._different(f"batch {k} holds other examples")
            return batch
        if self._complete:  # the first pass ended here
            if self.consistent and not self.stable:
                raise self._different(f"it gave more than the {len(self._records)} batches of pass 1")
            return batch
        if self._holding:
            self._held_bytes += batch.nbytes
            if self._held_bytes <= self.hold_bytes:
                self._records.append(batch)
                return batch
            if self._shuffles and self.consistent:
                raise self._unholdable(self._held_bytes)
            self._holding = False
            self._records = [b.inputs.fingerprint() if (self.consistent and not self.stable) else None
                             for b in self._records]
        self._records.append(batch.inputs.fingerprint() if (self.consistent and not self.stable) else None)
        return batch

    def _ended(self, batches: int) -> None:
        """A pass read all the examples: ``batches`` of them."""
        if self._complete:
            if batches != len(self._records) and self.consistent and not self.stable:
                raise self._different(f"it ended after {batches} batches, pass 1 after {len(self._records)}")
            return
        self._complete = True
        self._count = sum(b.size for b in self._records) if self._holding else self._counted
        if self.n is not None and self._count < self.n and self._count > 0:
            warnings.warn(f"{self.where} has only {self._count} examples, fewer than the {self.n} requested; "
                          f"using {self._count}", FewerExamplesWarning, stacklevel=4)

    def _different(self, what: str) -> DataError:
        return DifferentExamplesError(
            f"{self.where} gave other examples in pass {self._passes} than in pass 1 ({what}; e.g. a DataLoader "
            f"with shuffle=True, or random augmentation): every pass of a merge must see the same examples. "
            f"Give the data in a fixed order (shuffle=False), as a tensor, or fewer examples "
            f"(num_examples) so that they can be held in memory (up to {_size(self.hold_bytes)})")

    def _unholdable(self, nbytes: float) -> DataError:
        return DataError(
            f"{self.where} shuffles (its sampler is a RandomSampler), and its "
            f"{'examples' if self.n is None else f'{self.n} examples'} take about {_size(nbytes)}, more than "
            f"can be held in memory (up to {_size(self.hold_bytes)}): every pass of a merge would see other examples. "
            f"Give a DataLoader with shuffle=False, a tensor, or fewer examples (num_examples)")

    def _refuse_unholdable(self) -> None:
        """Before the first pass of a shuffling loader: refuse when its examples cannot be held
        (their size estimated from one batch)."""
        if self._complete:
            return
        first = self._peek()
        per_example = first.nbytes / max(first.size, 1)
        try:
            total = len(self._source.dataset)
        except (TypeError, AttributeError):
            total = None
        if total is None and self.n is None:
            raise self._unholdable(math.inf)
        wanted = min(x for x in (total, self.n) if x is not None)
        if per_example * wanted > self.hold_bytes:
            raise self._unholdable(per_example * wanted)

    # -- reading the source --------------------------------------------------------------------

    def _raw(self) -> Iterator[tuple[Inputs, Any]]:
        """(inputs, labels) per batch of the source, the user's failures as a DataError naming
        the batch (interrupts pass through)."""
        if isinstance(self._source, _Arrays):
            yield from self._source.batches(self.batch_size)
            return
        items = iter(self._source)
        index = 0
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except (DataError, KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as exc:
                text = " ".join(str(exc).split())[:300]
                raise DataError(f"{self.where}: reading batch {index} raised {type(exc).__name__}: {text}") from exc
            if isinstance(item, Batch):
                yield item.inputs, item.labels
            else:
                yield split_batch(item, f"batch {index} of {self.where}")
            index += 1

    def _read(self) -> Iterator[Batch]:
        """The converted batches of one pass over the source, up to ``n`` examples, checked."""
        count, like, k = 0, None, 0
        for inputs, labels in self._raw():
            for name, t in inputs.named():
                if t.dim() == 0:
                    raise DataError(f"the input '{name}' of batch {k} of {self.where} is a scalar; a batch "
                                    "needs a first (batch) axis")
            size = inputs.batch_size
            if size == 0:
                continue
            if self._first_raw is None:
                self._first_raw = inputs
            if like is None:
                like = inputs
            if self.strict:
                check_inputs(inputs, like, self.where, k)
            elif inputs.names != like.names:  # other inputs than the first batch: say so
                check_inputs(inputs, like, self.where, k)
            if self.labels is not False:
                check_labels(labels, inputs, self.labels if isinstance(self.labels, LabelRule) else None,
                             self.where, k)
            batch = Batch(inputs, labels)
            if self.n is not None and count + size > self.n:
                batch = batch.head(self.n - count)
            batch = batch.to(self.device, self.dtype)
            count += batch.size
            k += 1
            yield batch
            if self.n is not None and count >= self.n:
                break
        self._counted = count
        if count == 0 and not self.allow_empty:
            hint = ""
            if self._one_shot:
                hint = ("; an iterator or generator can be used once only -- pass a list, a tensor or a "
                        "DataLoader when the data is needed again")
            raise DataError(f"{self.where} has no batches (no examples){hint}")

    def first(self) -> Batch:
        """The first batch (read apart from any pass when no pass has read it yet)."""
        if self._one_shot and not self._complete:
            self._fill()
        if self._shuffles and self.consistent:
            self._refuse_unholdable()
        return self._peek()

    def _peek(self) -> Batch:
        """The first batch, read apart from any pass (not recorded)."""
        if self._records and isinstance(self._records[0], Batch):
            return self._records[0]
        reader = self._read()
        try:
            return next(reader)
        except StopIteration:
            raise DataError(f"{self.where} has no batches (no examples)") from None
        finally:
            reader.close()

    # -- examples to trace and prove with --------------------------------------------------------

    def example(self, k: int = 2) -> Inputs:
        """The first ``k`` examples of the first batch (the inputs to trace and prove with), the
        same at every call; in a distributed run the example every rank shares."""
        if self.shared_example is not None:
            return self.shared_example
        if self._example is None or self._example.batch_size < k:
            self._example = self.first().inputs.head(k)
        return self._example.head(k).to(self.device, self.dtype)

    def local_example(self, k: int = 2) -> Inputs | None:
        """This process's own example, None when its share is empty."""
        if self.empty:
            return None
        try:
            return self.example(k)
        except DataError:
            if self.allow_empty:
                return None
            raise

    def missing_batch_axis(self, model: Callable[..., Any]) -> DataError | None:
        """When ``model`` fails on the example: a DataError saying that the data yields single
        examples without a batch axis, if the model runs on the first item with one added."""
        first = self._first_raw if self._first_raw is not None else self._peek().inputs
        with torch.no_grad():
            try:  # the model runs on two examples: the batch axis is there
                first.head(2).to(self.device, self.dtype).call(model)
                return None
            except Exception:
                pass
            try:
                first.map(lambda t: t.unsqueeze(0)).to(self.device, self.dtype).call(model)
            except Exception:
                return None
        kind = "an IterableDataset" if isinstance(self.data, IterableDataset) else f"the {type(self.data).__name__}"
        return DataError(
            f"{self.where} yields single examples without a batch axis (the first: {first.describe()}): "
            f"the model runs on it only with a first (batch) axis added. {kind[0].upper() + kind[1:]} must "
            f"yield batches: batch it with a DataLoader (DataLoader(dataset, batch_size=256)) or stack the "
            f"examples into one tensor")

    # -- sharing the examples between processes --------------------------------------------------

    def shard(self, rank: int, world: int) -> Examples:
        """This process's share: the examples cut into batches of ``batch_size``, rank ``r`` takes
        the contiguous block of whole batches [r B / W, (r + 1) B / W) of B, so that every batch is
        one a single process would see. Arrays are sliced; other data is read once (a pass, with its
        checks) and its batches split."""
        options = dict(device=self.device, dtype=self.dtype, where=self.where, labels=self.labels,
                       strict=self.strict, consistent=self.consistent, hold_bytes=self.hold_bytes,
                       allow_empty=True, between=self.between)
        if isinstance(self._source, _Arrays):
            n = self.count
            batches = math.ceil(n / self.batch_size)
            lo = min(n, rank * batches // world * self.batch_size)
            hi = min(n, (rank + 1) * batches // world * self.batch_size)
            return Examples(self._source.slice(lo, hi), None, self.batch_size, **options)
        every = list(self)
        mine = every[rank * len(every) // world:(rank + 1) * len(every) // world]
        part = Examples(mine, None, self.batch_size, **options)
        part._count = sum(b.size for b in mine)
        return part

    def __repr__(self) -> str:
        return f"Examples({self.where}, n={self.n}, batch_size={self.batch_size})"


class _Take:
    """The first ``n`` examples of every pass over ``examples``."""

    def __init__(self, examples: Examples, n: int | None):
        self.examples, self.n = examples, n

    def __iter__(self) -> Iterator[Batch]:
        return self.examples._pass(self.n)


def _size(nbytes: float) -> str:
    if nbytes == math.inf:
        return "an unknown size"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"
