"""The linear assignment problem: the permutation P maximising sum_i score[i, P(i)].

One solver for every matcher (activation matching, weight matching): scipy's
``linear_sum_assignment`` on a float64 copy, NaN and infinities read as 0 (``lap``).
Independent problems (one per group) are solved side by side on a thread pool
(``solve_each``): the solver releases the GIL, and each problem's answer does not depend on
the others', so the permutations are the same as one after another.

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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation maximising sum_i score[i, P(i)] (rows: A's channels, columns: B's)."""
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


T = TypeVar("T")
R = TypeVar("R")


def workers() -> int:
    """Threads for independent assignments: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def solve_each(solve: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[solve(item) for item in items]``, the items solved side by side on a thread pool
    (scipy's solver and torch's ops release the GIL while they work): each result is what
    ``solve`` gives for its item alone, in the items' order, whatever the number of threads.
    At most ``threads`` items are being solved at once (each item's matrices are made inside
    ``solve``: a model's correlations are never all held together)."""
    items = list(items)
    threads = min(len(items), threads or workers())
    if threads <= 1:
        return [solve(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="graphrepair-lap") as pool:
        return list(pool.map(solve, items))
