"""How a command-line process joins a distributed run, is signalled in it and leaves it.

Under a launcher (torchrun sets ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
``launch`` joins the process group (``graphrepair.distributed`` does the run's work):

- ``GRAPHREPAIR_DIST_TIMEOUT`` (seconds a collective waits for a rank that neither arrives nor
  dies; default 1800) is checked first, before joining, so that every rank, reading the same
  environment, refuses a bad value alike: exit 2 and one line naming the variable.
- SIGTERM (torchrun stopping the others after a failure), SIGINT (Ctrl-C, or a signal to one
  rank) and SIGHUP mark the run failed before the command line's own handlers run: the rank
  then leaves without meeting the others in another collective (a rank that does, while the
  others are inside a pass's collective, aborts gloo with a collective mismatch), and says why on
  its own line; the others lose contact and say so on theirs. SIGTERM ends with the
  TerminatedError's exit 2, SIGINT/SIGHUP with 128 + the signal.
- ``end`` ends a process, after a failure or a success, without tearing its group down, the other
  ranks leaving before rank 0, which hosts the store.
- What torch's C++ side writes on the process's stderr (file descriptor 2: c10d's warnings with
  a stack when the store's host has gone, 'Connection reset by peer') goes nowhere unless
  ``--debug``; Python's ``sys.stderr`` keeps the real stream, so the run's one line still comes
  (``quiet_native``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from graphrepair import distributed
from graphrepair.errors import GraphRepairError, TerminatedError

__all__ = ["dist_timeout", "end", "launch"]

TIMEOUT_VAR = "GRAPHREPAIR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a typo (and past c10d's integer milliseconds)
_LEFT_KEY = "graphrepair/left"  # + "/<rank>": that rank is leaving after a failure
_LEAVE_WAIT_S = 5.0
_LAUNCHED = False  # launch() joined this process to a run


def dist_timeout(environ=os.environ) -> float:
    """``GRAPHREPAIR_DIST_TIMEOUT`` in seconds: a finite number > 0 and at most a week; unset:
    1800. A GraphRepairError naming the variable and what it accepts otherwise."""
    text = environ.get(TIMEOUT_VAR)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise GraphRepairError(f"{TIMEOUT_VAR}={text!r} is not a timeout: it takes a number of seconds greater than "
                               f"0 and at most {MAX_TIMEOUT_S:.0f} (a week); unset, {DEFAULT_TIMEOUT_S:.0f}")
    return value


def launch(device_name: str, debug: bool = False) -> None:
    """Join the process group a launcher describes in the environment: nccl when ``device_name``
    gives CUDA, gloo otherwise, with ``dist_timeout()``; signals as the module text says; the
    standard output of every rank but 0 is discarded (rank 0 reports). Nothing happens outside
    such a launch."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or dist.is_initialized():
        return
    from graphrepair.runtime import pick_device

    timeout = dist_timeout()  # before anything else: every rank refuses a bad value alike
    device = pick_device(device_name)
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
    if not debug:
        quiet_native()
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process

    def terminated(signum, frame):
        _signalled()
        raise TerminatedError("terminated (SIGTERM): the launcher stopped this process, usually because "
                              "another process of the run failed; nothing was written")

    signal.signal(signal.SIGTERM, terminated)
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signum = getattr(signal, name)
            signal.signal(signum, _marking(signal.getsignal(signum)))


def quiet_native() -> None:
    """File descriptor 2 to the null device, ``sys.stderr`` (and ``sys.__stderr__``) on a copy of
    the real one: C++ libraries' output goes nowhere, Python's comes as before."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        real = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        stream = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
        sys.stderr = sys.__stderr__ = stream


def _signalled() -> None:
    """This rank was signalled: it meets the others in no further collective (``Run.failed``),
    and reports its own ending (``Run.lost``: it cannot agree with the others any more)."""
    run = distributed.current()
    if run is not None:
        run.failed = True
        run.lost = True


def _marking(previous):
    """A handler that marks the run failed, then does what ``previous`` (the command line's
    handler, which raises ``Interrupted`` once) does."""

    def handler(signum, frame):
        _signalled()
        if callable(previous):
            return previous(signum, frame)
        raise KeyboardInterrupt

    return handler


def end(code: int) -> None:
    """End a process that :func:`launch` joined to a run at once with ``code``, its streams
    flushed and its outputs written (or, after a failure, removed). The group is never torn down:
    tearing down a gloo group whose other processes have gone can abort the process in C++
    ('terminate called without an active exception', exit -6 with nothing on the stream): seen
    about once in 25 failed runs on rank 0, which hosts the store, and in CI on rank 1 of a run
    that had merged (rank 0 had reported and left first). Nothing is left to free. Returns
    outside such a run."""
    if not _LAUNCHED:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # the line is out; c10d's warnings while leaving are not news
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if sys.stderr.fileno() != 2:  # quiet_native's copy of the real stream
            os.dup2(devnull, sys.stderr.fileno())
    _leave_in_order()
    os._exit(code)


def _leave_in_order() -> None:
    """The other ranks leave before rank 0, which may host the store: a rank still talking to the
    store when its host is gone prints c10d's 'Connection reset by peer' with a C++ stack. Each rank
    but 0 marks its leaving in the store; rank 0 waits for the marks (at most ``_LEAVE_WAIT_S``: a
    rank that died never marks; its c10d warnings go nowhere, see ``end``)."""
    run = distributed._RUN
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
    """At exit, for an ending that did not pass through :func:`end` (a ``SystemExit`` raised past
    the command line's own endings): the group is torn down, the store's reference first."""
    distributed._RUN = None  # its reference to the store goes first
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
