"""The linear assignment problem: the permutation P maximising sum_i score[i, P(i)].

One solver for every matcher (activation matching, weight matching): scipy's
``linear_sum_assignment`` on a float64 copy, NaN and infinities read as 0 (``lap``).
A wide matrix on the tie grid whose optimum can be proved the only one is solved without scipy's
run (the certified path, below): the same permutation, several times faster. Independent
problems (one per group) go through ``lap_each``: their matrices are made by the
caller, in the caller's thread (every torch op of a merge runs there, so the process keeps one
heap and torch's own thread pool), and only the solvers (scipy's, which releases the GIL, and
the certified path's numpy and scipy calls) run on worker threads, for matrices large enough
to pay for it. Each problem's answer does not depend
on the others', so the permutations are the same as one after another.

Why scipy and not lapx's ``lapjv``/``lapjvs`` (measured here, 3072 x 3072 float64 matrices on a
loaded 2-core machine; ``benchmarks/bench_assign.py``): lapjv is faster on matrices without ties
(0.25 s against 1.47 s for a correlation-like matrix, 1.0 s against 2.4 s for a random one), but
(a) on a matrix with dead units (500 rows and 300 columns of zeros, as dead units give) it took
7.9 s against scipy's 0.75 s, and (b) among tied optima it picks others than scipy (an all-zero
matrix does not give the identity), which moves what alignment's tie rules rely on (the
solver's fixed order on the rounded matrix, the weights' tie-break; activation_match.py);
lapjvs also solves in float32 by default, which does not keep the rounding grid's sums exact.

A certified path (``_certified``, wide square matrices on activation matching's tie grid:
multiples of GRID = 2^-17 with |s| n < 2^30, so that every sum below is exact in float64). For a
permutation P and duals u, v with slack(i, j) = u_i + v_j - s_ij >= 0 everywhere and 0 on P:

    sum_i s[i, Q(i)] = sum u + sum v - sum_i slack(i, Q(i)) <= sum_i s[i, P(i)]   for every Q,

so P is optimal, and an optimal Q has slack 0 on each of its entries. Another optimum exists
exactly when the tight entries off P (slack 0) hold an alternating cycle: the graph on rows with
an edge i -> P^-1(j) for each such (i, j) has a strongly connected component of two rows or more.
When there is none, P is the only optimum, and scipy (exact on such matrices: it only adds and
subtracts their entries) returns it: the same permutation, without scipy's run. P and (u, v) are
found cheaply: the entries within BAND of their row's or their column's maximum are candidates,
the sparse solver (``min_weight_full_bipartite_matching``) solves them, the duals are shortest
distances (Bellman-Ford) in the graph of the constraints v[P(i)] <= v[j] + s[i, P(i)] - s[i, j],
and the slack of every entry is checked in row blocks; entries with negative slack (and those
within half the band) join the candidates for another round. Where this proves nothing (ties:
two dead units, whose all-zero rows can be exchanged, or equal rows; off the grid; too many
candidates or rounds), scipy decides as before. On ties its own choice is what alignment's tie rules build on,
and only its run gives it: it spreads dead units over the free columns in the order of its
augmenting paths, not in a fixed order that could be reproduced without it.

Dead units in any order (``lap_each(dead_any_order=True)``, activation matching's groups, whose
dead units the weights then order: ``activation_match.activation_perms``). A unit with no
activation signal has an all-zero row (A's) or column (B's) of rounded correlations, and any
exchange among dead units ties; a ReLU layer has a few per cent of them, and scipy then decides
alone (0.3-0.6 s for 3072 units). What the merge keeps of that answer is how the live units are
paired: which live row takes which live column, which live rows take dead columns, which live
columns go to dead rows; the dead units' order among themselves is decided again by the weights.
The certified path proves that every optimum pairs the live units alike, and returns one of them:
- dead rows share one dual u_D and dead columns one v_E (their entries are all 0, and their
  candidates are the same columns, rows), so their slacks are a vector per column (u_D + v_j) and
  per row (u_i + v_E), not one entry each;
- their candidates: the live columns (rows) whose maximum lies within the band of 0, the
  least wanted live ones (twice as many as the dead rows, columns: the live units leave those
  to the dead), every dead unit of the other side, and each round what broke the certificate;
- another optimum exists that pairs the live units otherwise exactly when an alternating cycle
  of tight entries passes through a row paired live to live, or takes a tight entry from a live
  row to a live column; cycles through dead rows and rows paired with dead columns alone only
  exchange dead units. The dead rows' tight columns and the dead columns' tight rows go through
  one node each in the graph of the strongly connected components.
Matrices with many dead units (their entries among the candidates more than ``DEAD_CANDIDATES``
a row: from about 8 % dead units on each side of a 3072-unit layer) go to scipy as before, after
a few hundredths of a second spent finding that out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

# below this many rows a problem is solved in the caller's thread: a 256 x 256 assignment takes
# about a millisecond, less than handing it to a worker and waking it
PARALLEL_ROWS = 256

# the certified path (``_certified``, module doc): square matrices of this many rows or more, on
# this grid (``activation_match.TIE_GRID``); candidates: the entries within BAND grid steps of their
# row's or column's maximum (narrower or wider as needed), at most MAX_CANDIDATES a row; at most
# CERTIFIED_ROUNDS rounds, each adding the entries that broke the certificate and those within
# half that band of it
CERTIFIED_ROWS = 1024
GRID = 2.0 ** -17
MAX_CANDIDATES = 64
CERTIFIED_ROUNDS = 6
BAND = 13107  # 0.1 in correlation units
POTENTIAL_ROUNDS = 300
# the dead units' entries among the candidates (``dead``): at most this many a row besides
DEAD_CANDIDATES = 64
BLOCK_ROWS = 128


def _as_cost(score: torch.Tensor) -> np.ndarray:
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    return s


def _solve(s: np.ndarray) -> torch.Tensor:
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def _reduced(s: np.ndarray) -> np.ndarray:
    """The minimising form of ``s`` (a new array), reduced: each row's maximum less the row, then
    less each column's minimum. Every entry is >= 0 and every row and column holds a 0; every
    assignment's cost is its score, negated, plus one constant (the same optimum, ties aside:
    the subtractions round in the last bits). The solver's paths start from those zeros (a
    LLaMA MLP group of 2,816 units in weight matching's descent: 0.50-0.58 s -> 0.35-0.40 s)."""
    c = np.subtract(s.max(1)[:, None], s)
    c -= c.min(0)
    return c


def _solve_reduced(s: np.ndarray) -> torch.Tensor:
    """``_solve`` of ``s`` through its reduced form (``_reduced``)."""
    if not s.size:
        return _solve(s)
    _, cols = linear_sum_assignment(_reduced(s))
    return torch.as_tensor(cols, dtype=torch.long)


def _blocks(n: int) -> Iterator[slice]:
    """Row blocks of ``BLOCK_ROWS``: a pass over the matrix works in a few small buffers."""
    return (slice(a, min(a + BLOCK_ROWS, n)) for a in range(0, n, BLOCK_ROWS))


def _scan(s: np.ndarray, dead: bool = False):
    """One pass: (row minima, row maxima, column maxima, all-zero rows, all-zero columns) of
    ``s``, or None as soon as an entry is off the grid or, unless ``dead``, two rows are all zero."""
    n = s.shape[0]
    lo, hi = np.empty(n), np.empty(n)
    col_hi = np.full(n, -np.inf)
    zero_cols = np.ones(n, dtype=bool)
    buf, rounded = np.empty((min(BLOCK_ROWS, n), n)), np.empty((min(BLOCK_ROWS, n), n))
    for rows in _blocks(n):
        b, w, r = s[rows], buf[: rows.stop - rows.start], rounded[: rows.stop - rows.start]
        np.multiply(b, 1.0 / GRID, out=w)
        if not np.array_equal(np.rint(w, out=r), w):
            return None
        b.min(1, out=lo[rows])
        b.max(1, out=hi[rows])
        if not dead and int(((lo[: rows.stop] == 0) & (hi[: rows.stop] == 0)).sum()) > 1:
            return None
        np.maximum(col_hi, b.max(0), out=col_hi)
        zero_cols &= ~b.any(0)
    return lo, hi, col_hi, (lo == 0) & (hi == 0), zero_cols


def _slack(s: np.ndarray, u: np.ndarray, v: np.ndarray, below: float, live=None):
    """(flat indices, slack) of the entries whose slack u[i] + v[j] - s[i, j] is below ``below``;
    None when there are more than ``MAX_CANDIDATES`` a row. ``live``: (row mask, column mask),
    only the entries of those rows and columns."""
    n = s.shape[0]
    buf = np.empty((min(BLOCK_ROWS, n), n))
    found, slack, count = [], [], 0
    for rows in _blocks(n):
        w = buf[: rows.stop - rows.start]
        np.add(u[rows, None], v[None, :], out=w)
        w -= s[rows]
        if live is not None:
            w[:, ~live[1]] = np.inf
            w[~live[0][rows]] = np.inf
        idx = np.flatnonzero(w < below)
        count += len(idx)
        if count > MAX_CANDIDATES * n:
            return None
        slack.append(w.ravel()[idx])
        found.append(idx + rows.start * n)
    return np.concatenate(found), np.concatenate(slack)


def _band(s: np.ndarray, hi: np.ndarray, col_hi: np.ndarray, band: float, live=None) -> np.ndarray:
    """Flat indices of the entries within ``band`` of their row's maximum or their column's;
    ``live``: (row mask, column mask), only the entries of those rows and columns."""
    n = s.shape[0]
    found = []
    for rows in _blocks(n):
        b = s[rows]
        mask = b > (hi[rows] - band)[:, None]
        mask |= b > (col_hi - band)[None, :]
        if live is not None:
            mask &= live[1][None, :]
            mask &= live[0][rows, None]
        found.append(np.flatnonzero(mask) + rows.start * n)
    return np.concatenate(found)


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a`` and ``b`` (``np.union1d``, by one sort: numpy's
    hashing ``unique`` takes several times longer on the certified path's keys)."""
    out = np.concatenate([a, b])
    out.sort()
    return out[np.r_[True, out[1:] != out[:-1]]] if len(out) else out


def _least(values: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest of ``values`` where ``mask`` holds."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(values[idx], kind="stable")[:k]]


def _nearest(slack: np.ndarray, near: float, dead: int) -> np.ndarray:
    """Indices of the entries of ``slack`` below ``near``: every negative one, and of the
    others at most twice ``dead`` more, the smallest."""
    found = np.flatnonzero(slack < near)
    keep = int((slack < 0).sum()) + 2 * dead
    return found if len(found) <= keep else found[np.argsort(slack[found], kind="stable")[:keep]]


def _dead_entries(n: int, dead_rows: np.ndarray, cols: np.ndarray, rows: np.ndarray,
                  dead_cols: np.ndarray) -> np.ndarray:
    """Flat indices of every dead row's entries in ``cols`` and every dead column's in ``rows``."""
    return np.concatenate([(dead_rows[:, None] * n + cols[None, :]).ravel(),
                           (rows[:, None] * n + dead_cols[None, :]).ravel()])


def _potentials(s: np.ndarray, r: np.ndarray, c: np.ndarray, perm: np.ndarray):
    """Duals (u, v) of the candidate problem {(r, c)} at its optimum ``perm``, or None.

    v is the shortest distance from a virtual source in the graph of the difference
    constraints v[P(i)] <= v[j] + s[i, P(i)] - s[i, j] (one edge j -> P(i) per candidate (i, j)),
    by Bellman-Ford relaxations, and u[i] = s[i, P(i)] - v[P(i)]: then u[i] + v[j] >= s[i, j] on
    every candidate, with equality on P. None after ``POTENTIAL_ROUNDS`` relaxations (a long
    chain of distances: the caller falls back to the dense solver)."""
    n = len(perm)
    off = c != perm[r]
    r, c = r[off], c[off]
    head = perm[r]
    w = s[r, head] - s[r, c]
    order = np.argsort(head, kind="stable")
    head, tail, w = head[order], c[order], w[order]
    v = np.zeros(n)
    if len(head) == 0:  # the candidates are P itself
        return s[np.arange(n), perm], v
    starts = np.flatnonzero(np.r_[True, head[1:] != head[:-1]])
    heads = head[starts]
    for _ in range(POTENTIAL_ROUNDS):
        best = np.minimum(v[heads], np.minimum.reduceat(v[tail] + w, starts))
        if np.array_equal(best, v[heads]):
            return s[np.arange(n), perm] - v[perm], v
        v[heads] = best
    return None


def _match(s: np.ndarray, key: np.ndarray, top: float) -> np.ndarray | None:
    """The optimal assignment of ``s`` among the entries ``key`` (flat indices), None if these
    hold no perfect matching."""
    n = s.shape[0]
    r, c = np.divmod(key, n)
    try:
        rows, cols = min_weight_full_bipartite_matching(csr_matrix((top - s[r, c], (r, c)), shape=(n, n)))
    except ValueError:
        return None
    perm = np.empty(n, np.int64)
    perm[rows] = cols
    return perm


def _certified(s: np.ndarray, dead: bool = False) -> np.ndarray | None:
    """The assignment of ``s`` when it is the only optimal one, proved; None when that cannot be
    shown (then ``linear_sum_assignment`` decides). See the module doc, "A certified path".

    ``dead``: all-zero rows and columns (dead units) may take each other's places; an optimal
    assignment is returned when every optimum pairs the live units alike (the module doc, "Dead
    units in any order")."""
    n, m = s.shape
    if n != m or n < CERTIFIED_ROWS:
        return None
    if not np.array_equal(np.rint(s[0] * (1.0 / GRID)), s[0] * (1.0 / GRID)):
        return None  # a first row off the grid: out at once
    scan = _scan(s, dead)
    if scan is None:
        return None
    lo, hi, col_hi, zero_rows, zero_cols = scan
    if not dead and int(zero_cols.sum()) > 1:
        return None  # two all-zero columns (rows: ``_scan``) can be exchanged: ties, scipy's order decides
    if not max(float(hi.max()), -float(lo.min())) * n < 2.0 ** 30:
        return None  # every sum below (of a few n entries) exact in float64
    top = float(hi.max()) + 1.0  # weights top - s > 0: the sparse solver minimises
    arange = np.arange(n)
    # dead units (``dead``): their entries are not scanned one by one but per column (a dead
    # row's slack u_D + v_j) and per row (a dead column's u_i + v_E); the candidates give every
    # dead row the same columns and every dead column the same rows
    dead_rows = np.flatnonzero(zero_rows) if dead else arange[:0]
    dead_cols = np.flatnonzero(zero_cols) if dead else arange[:0]
    live = (~zero_rows, ~zero_cols) if len(dead_rows) or len(dead_cols) else None

    def with_dead(key: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """``key`` and the dead units' entries in ``cols`` and ``rows``; None when these are
        more than ``DEAD_CANDIDATES`` a row (many dead units: scipy decides). Only with dead units."""
        cols, rows = _union(cols, dead_cols), _union(rows, dead_rows)
        if len(dead_rows) * len(cols) + len(dead_cols) * len(rows) > DEAD_CANDIDATES * n:
            return None
        return _union(key, _dead_entries(n, dead_rows, cols, rows, dead_cols))

    # first duals: u = the row maxima, v = 0 (slack max_i - s[i, j] >= 0); the candidates: every
    # entry within ``band`` of its row's maximum (so off them, slack >= band), and of its column's;
    # a band a quarter as wide where that is too many (a matrix of a smaller scale), twice as
    # wide where these hold no perfect matching. A dead row's entries (0) are within the band of
    # a column whose maximum is below it, a dead column's of such a row; and the live units least
    # wanted (twice as many as there are dead units on the other side) are the dead units'
    # candidates too, since the live ones leave such units to them
    if live is not None:
        spare_cols = _least(col_hi, ~zero_cols, 2 * len(dead_rows))
        spare_rows = _least(hi, ~zero_rows, 2 * len(dead_cols))
    band, perm = BAND * GRID, None
    for _ in range(4):
        key = _band(s, hi, col_hi, band, live)
        if len(key) > MAX_CANDIDATES * n:
            band /= 4
            continue
        if live is not None:
            key = with_dead(key, _union(np.flatnonzero(col_hi < band), spare_cols),
                            _union(np.flatnonzero(hi < band), spare_rows))
            if key is None:
                return None
        perm = _match(s, key, top)
        if perm is not None:
            break
        band *= 2
    if perm is None:
        return None
    near = band / 2
    for _ in range(CERTIFIED_ROUNDS):
        if perm is None:
            perm = _match(s, key, top)
            if perm is None:
                return None
        r, c = np.divmod(key, n)
        duals = _potentials(s, r, c, perm)
        if duals is None:
            return None
        u, v = duals
        found = _slack(s, u, v, near, live)
        if found is None:
            return None
        check, slack = found
        i, j = np.divmod(check, n)
        # a dead row's slack in each column, a dead column's in each row (empty without dead units)
        by_col = u[dead_rows[0]] + v if len(dead_rows) else v[:0]
        by_row = u + v[dead_cols[0]] if len(dead_cols) else u[:0]
        if len(dead_rows) and not (u[dead_rows] == u[dead_rows[0]]).all():
            return None  # dead rows with different duals: not the structure relied on below
        if len(dead_cols) and not (v[dead_cols] == v[dead_cols[0]]).all():
            return None
        if (slack >= 0).all() and (by_col >= 0).all() and (by_row >= 0).all():
            break  # >= 0 on every entry: P is optimal
        # what broke the certificate, and what lies near it (for the dead units, the nearest
        # of these only: a dead column's entries are one per row)
        key = _union(key, check[slack < near])
        if live is not None:
            key = with_dead(key, _nearest(by_col, near, len(dead_rows)), _nearest(by_row, near, len(dead_cols)))
        if key is None or len(key) > (MAX_CANDIDATES + DEAD_CANDIDATES) * n:
            return None
        perm = None
    else:
        return None
    # unique: no alternating cycle of tight entries (slack 0; the live ones are all among
    # ``check``) around P; with dead units, none that changes how the live units pair. The graph
    # on rows has an edge i -> P^-1(j) for each tight (i, j) off P; the dead rows' tight columns
    # and the dead columns' tight rows go through one node each (``to_rows``, ``to_cols``), since
    # all dead rows have the same tight columns (and all dead columns the same tight rows)
    owner = np.empty(n, np.int64)
    owner[perm] = arange
    i, j = i[slack == 0], j[slack == 0]
    other = j != perm[i]
    src, dst = [i[other]], [owner[j[other]]]
    to_rows, to_cols = n, n + 1  # the dead rows' node and the dead columns'
    if len(dead_rows):
        tight = np.flatnonzero(by_col == 0)
        src += [dead_rows, np.full(len(tight), to_rows)]
        dst += [np.full(len(dead_rows), to_rows), owner[tight]]
    if len(dead_cols):
        tight = np.flatnonzero(by_row == 0)
        src += [tight, np.full(len(dead_cols), to_cols)]
        dst += [np.full(len(tight), to_cols), owner[dead_cols]]
    src, dst = np.concatenate(src), np.concatenate(dst)
    g = csr_matrix((np.ones(len(src)), (src, dst)), shape=(n + 2, n + 2))
    _, label = connected_components(g, directed=True, connection="strong")
    cyclic = np.bincount(label)[label] > 1  # nodes on a cycle
    if live is None:
        return None if cyclic.any() else perm  # any cycle is another optimum
    if (cyclic[:n] & ~zero_rows & ~zero_cols[perm]).any():
        return None  # a cycle moves a live row's live match
    live_edge = ~zero_rows[i[other]] & ~zero_cols[j[other]]
    if (label[i[other]][live_edge] == label[owner[j[other]]][live_edge]).any():
        return None  # a cycle makes a new live pair
    return perm


def _solve_any(s: np.ndarray, dead: bool = False) -> torch.Tensor:
    perm = _certified(s, dead)
    return _solve(s) if perm is None else torch.as_tensor(perm, dtype=torch.long)


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation maximising sum_i score[i, P(i)] (rows: A's channels, columns: B's)."""
    return _solve_any(_as_cost(score))


def workers() -> int:
    """Threads for independent assignments: the cores this process may use, at most torch's own
    thread count (``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` keeps a merge on one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads()))


def lap_each(scores: Iterable[torch.Tensor], threads: int | None = None, dead_any_order: bool = False,
             reduced: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(score, lap(score))`` for each score, in order. ``scores`` is read lazily in the
    caller's thread, at most ``threads`` matrices ahead (a model's correlations can take
    gigabytes: they are never all held); the solver runs side by side on that many threads when
    a matrix has ``PARALLEL_ROWS`` rows or more, in the caller's thread otherwise (the certified
    path first where it applies, then scipy: numpy and scipy calls only, no torch computation).
    ``dead_any_order``: the dead units (all-zero rows and columns) may be matched in another
    order than scipy's, where every optimum pairs the live units alike (module doc, "Dead units
    in any order"). ``reduced``: scipy solves each matrix's reduced form (``_reduced``), without
    the certified path: weight matching's scores, which are not on the tie grid and whose ties
    no rule builds on."""
    threads = threads or workers()
    def solve(c: np.ndarray) -> torch.Tensor:
        return _solve_reduced(c) if reduced else _solve_any(c, dead_any_order)

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
                perms = list(pool.map(solve, costs))
            else:
                perms = [solve(c) for c in costs]
            yield from zip(chunk, perms)
    finally:
        if pool is not None:
            pool.shutdown()
