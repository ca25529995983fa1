"""Beyond one process: a merge's statistics on torch.distributed.

A merge's cost is its passes over the fitting data, and its statistics are sums (counts, sums,
sums of squares, A-B cross products), so they distribute exactly: every rank streams its own share
of the batches through the same passes, and the sums are added across ranks. When a default
process group with more than one process is initialised (``torch.distributed.init_process_group``,
or the CLI under ``torchrun``), ``merge``, ``prepare``, ``align``, ``barrier`` and ``evaluate``
work this way with no change of code; each rank passes its own share of the data (an empty tensor,
dataset or list where a rank has none). Without one, nothing here does anything.

What is exchanged (one collective per pass for the statistics, plus a few small ones):

- after each pass (the joint pass of A and B, the REPAIR pass of the merged model, BatchNorm
  re-estimation, an evaluation): one ``all_reduce(SUM)`` of one flat float64 vector holding every
  sum of the pass about zero (``passes.moments``: count, R1 = sum x, R2 = sum x^2, R_ab = sum
  x_a x_b^T; each rank converts its sums from its own shift first). Sums add exactly; averages of
  per-rank means and variances would lose the spread between the ranks' means.
- at the start of ``prepare``: which ranks have data and a fingerprint of every model (one
  ``all_reduce(MAX)``: models that differ between ranks are an error), then the example batch that
  every rank traces the model with (a broadcast from the lowest rank that has data, so that every
  rank discovers the same spec, also a rank with no data).
- the permutations: rank 0 solves the linear assignments and broadcasts them. Every rank holds
  the same reduced statistics, but a correlation computed on another thread count or device may
  differ in its last bit, and near-tied assignments could then differ; one solver cannot.
  Everything after (interpolation, REPAIR's goals, folding) is computed on every rank from the
  same permutations and reduced sums, so every rank ends with the same merged weights.

Failure of one rank is failure of the run. Every stretch of work that could fail on one rank alone
(a pass over its data, the assignment on rank 0, the CLI's loading) is a ``step``: at its end all
ranks meet in one small ``all_reduce`` of a flag per rank, so that an error on any rank is raised on
every rank, with that rank's message ("on rank 1: ..."), the same error class for graphrepair's
errors (exit status 2 in the CLI) and ``RankError`` for others (exit 1). A rank that fails inside a
pass also tells the others through the process group's store, and they stop their own pass at the
next batch instead of finishing it. A rank that dies (killed, or silent past the process group's
timeout, which gloo honours) makes the others' next collective fail: ``RankLostError``. Only rank 0
reports (progress bars, the CLI's output and error line) and writes files.

The answer of one process. ``shard`` gives each rank whole batches of the one-process run, and
every rank's sums take their shift from the shared example (``ChannelSums.calibrate``) instead of
from their own first batch: each batch's float32 sums are then the ones one process makes, and
only the order in which float64 totals of them are added differs (float32 numbers add in float64
with next to no rounding; the tests find the same permutations and bitwise-equal weights). Sums
about zero lose float64 precision only where a mean is huge against its spread (relative 1e-16
mean^2 / var). Ties: correlations are rounded to multiples of ``activation_match.TIE_GRID`` (2^-17) before the
assignment, so that statistics that differ only in summation order give the same matrix, and units
that tie (dead units: exact zeros; correlations equal within rounding) are resolved by the solver's
fixed order on that identical matrix, whatever the number of ranks.

In a user's own program (each rank passes its shard; ``shard`` cuts one the way the CLI does)::

    import torch.distributed as dist
    import graphrepair as gr
    from graphrepair.distributed import shard

    dist.init_process_group("gloo")            # "nccl" with one GPU per rank (torch.cuda.set_device)
    a, b = load_models()                       # the same weights on every rank
    x = load_fitting_inputs()                  # every rank may read all of it ...
    mine, n = shard(x, 5000, batch_size=256)   # ... and keeps its own batches of the first 5,000
    merged = gr.merge(a, b, mine, num_examples=n, batch_size=256)   # the same on every rank
    if dist.get_rank() == 0:
        gr.export_onnx(merged, x[:2], "merged.onnx")

``torchrun --nproc-per-node 2 -m graphrepair merge ...`` does the same from the command line
(gloo on CPU, nccl on GPUs; ``--device`` picks each rank's GPU from ``LOCAL_RANK``). The timeout
of a collective is ``GRAPHREPAIR_DIST_TIMEOUT`` seconds there (default 1800): a rank that neither
arrives nor dies is waited for that long. How a command-line process joins, is signalled and
leaves a run: ``graphrepair.cli.launch``.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from graphrepair import errors
from graphrepair.errors import GraphRepairError, RankLostError, TerminatedError

__all__ = ["RankError", "Run", "agree_on_function", "agree_on_start", "all_reduce_sum", "broadcast_perms", "check",
           "counters", "current", "is_reporting", "rank", "reduce_holders", "step", "world"]

_FAILURES_KEY = "graphrepair/failures"
_CHECK_EVERY_S = 0.2
_OK, _INTERNAL, _BAD_INPUT, _PEER = 0, 1, 2, 3


class RankError(RuntimeError):
    """Another rank failed with an error that is not bad input (a bug, out of memory ...)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class _PeerFailed(Exception):
    """Raised inside a step when another rank has reported a failure through the store."""


@dataclass
class Counters:
    """What the collectives of this process cost: bytes sent into each kind, seconds inside it
    (waiting for slower ranks included), number of calls."""

    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.bytes.clear()
        self.seconds.clear()
        self.calls.clear()


@dataclass
class Run:
    """The process group a merge runs in: this rank, the number of ranks, where collectives'
    tensors live (CUDA for nccl, CPU otherwise), and the state of failure handling."""

    rank: int
    world: int
    device: torch.device
    store: object | None
    counters: Counters = field(default_factory=Counters)
    failed: bool = False  # a failure was agreed (or a collective broke): no more agreements
    lost: bool = False  # a collective broke: the process group cannot agree on anything any more
    depth: int = 0  # steps entered and not left
    baseline: int = 0  # the store's failure count when failures were last agreed
    last_check: float = 0.0
    group: object | None = field(default=None, repr=False)  # the process group this run is in

    # -- collectives --------------------------------------------------------------------------

    def _timed(self, kind: str, nbytes: int, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:
            self.failed = True
            # gloo's and nccl's messages start with a source location and go on for lines
            text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))
            first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0][:200]
            self.lost = True
            raise RankLostError(
                f"rank {self.rank} lost contact with the other processes of the run ({first}): one was "
                f"killed, or did not arrive within the process group's timeout; nothing was written") from e
        finally:
            self.counters.add(kind, nbytes, time.perf_counter() - t)

    def all_reduce(self, t: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``t`` reduced over the ranks (on the collective device; returned there)."""
        t = t.to(self.device)
        self._timed(kind, t.numel() * t.element_size(), lambda: dist.all_reduce(t, op=op))
        return t

    def broadcast(self, t: torch.Tensor, src: int, kind: str) -> torch.Tensor:
        t = t.to(self.device)
        self._timed(kind, t.numel() * t.element_size(), lambda: dist.broadcast(t, src))
        return t

    def broadcast_object(self, obj, src: int, kind: str):
        box = [obj]
        self._timed(kind, 0, lambda: dist.broadcast_object_list(box, src))
        return box[0]

    def all_gather_object(self, obj, kind: str) -> list:
        out = [None] * self.world
        self._timed(kind, 0, lambda: dist.all_gather_object(out, obj))
        return out

    # -- failures -----------------------------------------------------------------------------

    def _failures(self) -> int | None:
        if self.store is None:
            return None
        try:
            return int(self.store.add(_FAILURES_KEY, 0))
        except Exception:  # a store that cannot count: no early stop, the step's flag still works
            self.store = None
            return None

    def tell_failure(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.add(_FAILURES_KEY, 1)

    def check(self) -> None:
        """Between batches: stop this rank's pass when another rank has reported a failure
        (at most one look at the store every ``_CHECK_EVERY_S`` seconds)."""
        now = time.monotonic()
        if self.depth == 0 or now - self.last_check < _CHECK_EVERY_S:
            return
        self.last_check = now
        seen = self._failures()
        if seen is not None and seen > self.baseline:
            raise _PeerFailed()

    def agree(self, where: str, error: BaseException | None) -> None:
        """All ranks meet: returns when no rank failed, else raises the first failing rank's error
        on every rank (this rank's own error where it is the first)."""
        if error is None:
            code = _OK
        elif isinstance(error, _PeerFailed):
            code = _PEER
        elif isinstance(error, GraphRepairError):
            code = _BAD_INPUT
        else:
            code = _INTERNAL
        flags = torch.zeros(self.world, dtype=torch.int64)
        flags[self.rank] = code
        flags = self.all_reduce(flags, "sync", op=dist.ReduceOp.MAX).cpu().tolist()
        if not any(flags):
            return
        self.failed = True
        mine = None if code in (_OK, _PEER) else (type(error).__name__, " ".join(str(error).split()))
        messages = self.all_gather_object(mine, "sync")
        self.baseline = self._failures() or self.baseline
        failing = [r for r, c in enumerate(flags) if c in (_INTERNAL, _BAD_INPUT)]
        if not failing:  # ranks stopped for a failure counted in the store that no rank reports
            raise GraphRepairError(f"{where}: a rank stopped for a failure that no rank reported; "
                                   f"rerun")
        first = failing[0]
        if first == self.rank and error is not None:
            raise error
        name, text = messages[first]
        message = f"on rank {first}: {text}"
        if flags[first] == _BAD_INPUT:
            cls = getattr(errors, name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, GraphRepairError) else GraphRepairError
            if cls is RankLostError or cls is TerminatedError:
                cls = GraphRepairError
            err = cls(message)
            err.rank = first
            raise err
        raise RankError(f"{message} ({name})", first)


_RUN: Run | None = None


def current() -> Run | None:
    """The run when a default process group of more than one process is initialised, else None."""
    global _RUN
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        _RUN = None
        return None
    group = dist.group.WORLD
    if _RUN is None or _RUN.group is not group:  # a new process group: a new run
        backend = dist.get_backend()
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:
            store = None
        _RUN = Run(dist.get_rank(), dist.get_world_size(), device, store)
        _RUN.group = group
        _RUN.baseline = _RUN._failures() or 0
    return _RUN


def rank() -> int:
    run = current()
    return 0 if run is None else run.rank


def world() -> int:
    run = current()
    return 1 if run is None else run.world


def is_reporting() -> bool:
    """Whether this process reports (progress, output, errors) and writes files: rank 0, or any
    process outside a distributed run; after contact with the others was lost (a rank died) every
    survivor reports its error, since none can tell which one would."""
    run = current()
    return run is None or run.rank == 0 or run.lost


def counters() -> Counters | None:
    run = current()
    return None if run is None else run.counters


@contextlib.contextmanager
def step(where: str) -> Iterator[None]:
    """A stretch of work that may fail on one rank alone; all ranks meet at its end, and a
    failure on any rank is raised on every rank (see the module doc). Outside a distributed run
    (or inside a step that is unwinding an agreed failure) it does nothing."""
    run = current()
    if run is None:
        yield
        return
    run.depth += 1
    try:
        yield
    except BaseException as e:
        if not run.failed and not isinstance(e, _PeerFailed):
            run.tell_failure()
        if run.failed:
            raise
        run.agree(where, e)
        raise
    else:
        if not run.failed:
            run.agree(where, None)
    finally:
        run.depth -= 1
        if run.depth == 0:
            run.failed = False  # an agreed failure ends with the outermost step that saw it


def check() -> None:
    """Between the batches of a pass: raise inside the step when another rank has failed."""
    run = current()
    if run is not None:
        run.check()


def all_reduce_sum(tensors: list[torch.Tensor], device: torch.device, kind: str = "reduce") -> list[torch.Tensor]:
    """The sums over the ranks of ``tensors`` (float64), in one collective of one flat vector,
    returned on ``device``; the tensors themselves outside a distributed run."""
    run = current()
    if run is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(device=run.device, dtype=torch.float64) for t in tensors])
    flat = run.all_reduce(flat, kind).to(device)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def reduce_holders(holders: list, device: torch.device, extra: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Sum the streaming statistics of ``holders`` (objects with ``raw_totals()`` and
    ``load_raw_totals(parts)``: taps, resets, observers) and the tensors ``extra`` over the ranks,
    in one collective; the holders take the sums, the summed ``extra`` are returned."""
    extra = list(extra or [])
    if current() is None:
        return extra
    parts = [h.raw_totals() for h in holders]
    flat = all_reduce_sum([p for ps in parts for p in ps] + extra, device)
    at = 0
    for h, ps in zip(holders, parts):
        h.load_raw_totals(flat[at:at + len(ps)])
        at += len(ps)
    return flat[at:]


def broadcast_perms(perms: dict[str, torch.Tensor] | None, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rank 0's permutations {group: LongTensor} on every rank (``sizes``: every group's size, in
    a fixed order)."""
    run = current()
    if run is None:
        return perms
    if run.rank == 0:
        flat = torch.cat([perms[g].reshape(-1).cpu().long() for g in sizes])
    else:
        flat = torch.empty(sum(sizes.values()), dtype=torch.int64)
    flat = run.broadcast(flat, 0, "broadcast").cpu()
    out, at = {}, 0
    for g, n in sizes.items():
        out[g] = flat[at:at + n].clone()
        at += n
    return out


def fingerprint(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 (sum, sum of squares) of every floating tensor, flattened: equal states give equal
    fingerprints (states that differ almost surely do not)."""
    parts = [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
             for t in state.values() if t.is_floating_point()]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def agree_on_start(states: list[dict[str, torch.Tensor]], example: torch.Tensor | None) -> torch.Tensor | None:
    """At the start of a distributed ``prepare``: the models must be the same on every rank
    (MismatchError naming the first that is not), and every rank gets the example batch of the
    lowest rank that has data (None when no rank has)."""
    run = current()
    if run is None:
        return example
    prints = [fingerprint(s) for s in states]
    has = torch.zeros(run.world, dtype=torch.float64)
    has[run.rank] = 0.0 if example is None else 1.0
    vec = torch.cat([has] + [torch.cat([p, -p]) for p in prints])
    vec = run.all_reduce(vec, "sync", op=dist.ReduceOp.MAX).cpu()
    at = run.world
    for i, p in enumerate(prints):
        hi, lo = vec[at:at + p.numel()], -vec[at + p.numel():at + 2 * p.numel()]
        at += 2 * p.numel()
        if not torch.equal(hi, lo):
            who = "AB"[i] if len(states) == 2 else str(i)
            keys = [k for k, t in states[i].items() if t.is_floating_point()]
            bad = keys[int((hi != lo).nonzero()[0]) // 2]
            raise errors.MismatchError(f"model {who} differs between the ranks (first at parameter {bad!r}); "
                                       f"every rank must load the same weights")
    holders = [r for r in range(run.world) if vec[r] > 0]
    if not holders:
        return None
    src = holders[0]
    shared = run.broadcast_object(None if example is None else example.detach().cpu(), src, "broadcast")
    return shared


_FUNCTION_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-9}
_FUNCTION_SAMPLE = 4096  # values of each output compared (the first ones), besides its moments


def _output_summary(model, example) -> list[torch.Tensor]:
    """Per output tensor of ``model`` on ``example`` (eval mode, no grad): float64 (first values,
    mean, mean square), small whatever the output's size."""
    from graphrepair.discovery.trace import output_tensors
    from graphrepair.io.inputs import Inputs
    from graphrepair.models import eval_mode

    with eval_mode(model), torch.no_grad():
        outs = output_tensors(Inputs.of(example).call(model))
    summary = []
    for t in outs:
        flat = t.detach().reshape(-1).double()
        summary.append(torch.cat([flat[:_FUNCTION_SAMPLE], flat.mean().reshape(1) if flat.numel() else flat,
                                  flat.square().mean().reshape(1) if flat.numel() else flat]).cpu())
    return summary


def agree_on_function(models: list, example: torch.Tensor) -> None:
    """At the start of a distributed ``prepare``, after ``agree_on_start``: every rank's models
    must compute what rank 0's compute, on the shared example batch (the same weights do not make
    the same function: a factory may build other layers on another rank, e.g. ReLU on one and
    tanh on the other, and statistics of different functions added together are a wrong answer).
    One gather of a small summary of every output; every rank compares alike and raises the same
    MismatchError, naming the model and the first rank that differs."""
    run = current()
    if run is None:
        return
    with step("running the models on rank 0's example batch"):  # a forward may fail on one rank
        mine = [_output_summary(m, example) for m in models]
    everyone = run.all_gather_object(mine, "sync")
    ref = everyone[0]
    for r in range(1, run.world):
        for i, (outs_ref, outs) in enumerate(zip(ref, everyone[r])):
            who = "AB"[i] if len(models) == 2 else str(i)
            dtype = next((p.dtype for p in models[i].parameters() if p.is_floating_point()), torch.float32)
            rtol = _FUNCTION_RTOL.get(dtype, 1e-4)
            bad = len(outs_ref) != len(outs) or any(a.shape != b.shape for a, b in zip(outs_ref, outs))
            diff = 0.0
            if not bad:
                for a, b in zip(outs_ref, outs):
                    scale = float(a.abs().max()) if a.numel() else 0.0
                    d = float((a - b).abs().max()) if a.numel() else 0.0
                    if not math.isfinite(d) and torch.equal(a.isnan(), b.isnan()):
                        d = float((a - b).nan_to_num().abs().max())
                    if d > rtol * max(1.0, scale):
                        bad, diff = True, d
                        break
            if bad:
                how = f"by up to {diff:.3g}" if diff else "in the number or the shapes of its outputs"
                raise errors.MismatchError(
                    f"model {who} computes another function on rank {r} than on rank 0 (its outputs on rank 0's "
                    f"example batch differ {how}, though its weights are the same): every rank must build "
                    f"the same model; check the model's factory for what depends on the rank")
