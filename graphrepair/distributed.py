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
arrives nor dies is waited for that long.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from graphrepair import errors
from graphrepair.errors import GraphRepairError, RankLostError, TerminatedError

__all__ = ["RankError", "Run", "agree_on_start", "all_reduce_sum", "broadcast_perms", "check", "counters",
           "current", "is_reporting", "launch", "rank", "reduce_holders", "step", "world"]

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
_LAUNCHED = False  # launch() joined this process to a run (the CLI under a launcher)
_LEFT_KEY = "graphrepair/left"  # + "/<rank>": that rank is leaving after a failure
_LEAVE_WAIT_S = 5.0


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


# -- the command line ------------------------------------------------------------------------------

def launch(device_name: str) -> None:
    """For the CLI: join the process group a launcher describes in the environment (``WORLD_SIZE``
    > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT`` as torchrun sets them): nccl when ``device_name``
    gives CUDA, gloo otherwise, with a timeout of ``GRAPHREPAIR_DIST_TIMEOUT`` seconds (default
    1800); SIGTERM (torchrun stopping the others after a failure) becomes an error that ends the
    command cleanly; the standard output of every rank but 0 is discarded (rank 0 reports).
    Nothing happens outside such a launch."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or dist.is_initialized():
        return
    from graphrepair.runtime import pick_device

    device = pick_device(device_name)
    try:
        timeout = float(os.environ.get("GRAPHREPAIR_DIST_TIMEOUT", "1800"))
    except ValueError:
        raise GraphRepairError(f"GRAPHREPAIR_DIST_TIMEOUT={os.environ['GRAPHREPAIR_DIST_TIMEOUT']!r} is not "
                               f"a number of seconds") from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:
        raise GraphRepairError(f"cannot join the distributed run ({backend}, rank {os.environ.get('RANK')} of "
                               f"{os.environ.get('WORLD_SIZE')}): {' '.join(str(e).split())[:300]}") from e
    global _LAUNCHED
    _LAUNCHED = True
    atexit.register(_leave)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process

    def terminated(signum, frame):
        run = current()
        if run is not None:
            run.failed = True  # the others are gone or going: no more agreements
        raise TerminatedError("terminated (SIGTERM): the launcher stopped this process, usually because "
                              "another process of the run failed; nothing was written")

    signal.signal(signal.SIGTERM, terminated)


def end_failed(code: int) -> None:
    """For the CLI: end a process that :func:`launch` joined to a run at once with ``code`` after a
    failure, its streams flushed and outputs already removed. Tearing down a gloo group whose other
    processes have gone can abort the process in C++ ('terminate called without an active
    exception', exit -6, seen about once in 25 runs on rank 0, which hosts the store), and nothing is
    left to free. Returns outside such a run."""
    if not _LAUNCHED:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # the line is out; c10d's warnings while leaving are not news
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    _leave_in_order()
    os._exit(code)


def _leave_in_order() -> None:
    """The other ranks leave before rank 0, which may host the store: a rank still talking to the
    store when its host is gone prints c10d's 'Connection reset by peer' with a C++ stack. Each rank
    but 0 marks its leaving in the store; rank 0 waits for the marks (at most ``_LEAVE_WAIT_S``: a
    rank that died never marks; its c10d warnings go nowhere, see ``end_failed``)."""
    run = _RUN
    store = getattr(run, "store", None)
    if run is None or store is None:
        return
    with contextlib.suppress(Exception):
        if run.rank == 0:
            store.wait([f"{_LEFT_KEY}/{r}" for r in range(1, run.world)],
                       datetime.timedelta(seconds=_LEAVE_WAIT_S))
        else:
            store.set(f"{_LEFT_KEY}/{run.rank}", "1")


def _leave() -> None:
    global _RUN
    _RUN = None  # its reference to the store goes first
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()

