"""The linear assignment problem: the permutation P maximising sum_i score[i, P(i)].

One solver for every matcher (activation matching, weight matching): scipy's
``linear_sum_assignment`` on a float64 copy, NaN and infinities read as 0 (``lap``).
Independent problems (one per group) go through ``lap_each``: their matrices are made by the
caller, in the caller's thread (every torch op of a merge runs there, so the process keeps one
heap and torch's own thread pool), and only scipy's solver, which releases the GIL, runs on
worker threads, for matrices large enough to pay for it. Each problem's answer does not depend
on the others', so the permutations are the same as one after another.

Why scipy and not lapx's ``lapjv``/``lapjvs`` (measured here, 3072 x 3072 float64 matrices on a
loaded 2-core machine; ``benchmarks/bench_assign.py``): lapjv is faster on matrices without ties
(0.25 s against 1.47 s for a correlation-like matrix, 1.0 s against 2.4 s for a random one), but
(a) on a matrix with dead units (500 rows and 300 columns of zeros, as dead units give) it took
7.9 s against scipy's 0.75 s, and (b) among tied optima it picks others than scipy (an all-zero
matrix does not give the identity), which moves what alignment's tie rules rely on (the
solver's fixed order on the rounded matrix, the weights' tie-break; activation_match.py);
lapjvs also solves in float32 by default, which does not keep the rounding grid's sums exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# below this many rows a problem is solved in the caller's thread: a 256 x 256 assignment takes
# about a millisecond, less than handing it to a worker and waking it
PARALLEL_ROWS = 256


def _as_cost(score: torch.Tensor) -> np.ndarray:
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    return s


def _solve(s: np.ndarray) -> torch.Tensor:
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation maximising sum_i score[i, P(i)] (rows: A's channels, columns: B's)."""
    return _solve(_as_cost(score))


def workers() -> int:
    """Threads for independent assignments: the cores this process may use, at most torch's own
    thread count (``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` keeps a merge on one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


def lap_each(scores: Iterable[torch.Tensor], threads: int | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(score, lap(score))`` for each score, in order. ``scores`` is read lazily in the
    caller's thread, at most ``threads`` matrices ahead (a model's correlations can take
    gigabytes: they are never all held); the solver runs side by side on that many threads when
    a matrix has ``PARALLEL_ROWS`` rows or more, in the caller's thread otherwise."""
    threads = threads or workers()
    scores = iter(scores)
    pool = None
    try:
        while True:
            chunk = [s for _, s in zip(range(threads), scores)]
            if not chunk:
                return
            costs = [_as_cost(s) for s in chunk]
            if threads > 1 and len(chunk) > 1 and max(c.shape[0] for c in costs) >= PARALLEL_ROWS:
                if pool is None:
                    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="graphrepair-lap")
                perms = list(pool.map(_solve, costs))
            else:
                perms = [_solve(c) for c in costs]
            yield from zip(chunk, perms)
    finally:
        if pool is not None:
            pool.shutdown()
