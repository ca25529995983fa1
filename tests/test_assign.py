"""The linear assignments (graphrepair/merging/assign.py): one solver, and independent groups
solved side by side on threads with the same permutations as one after another."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import graphrepair as gr
from graphrepair.merging import assign
from graphrepair.merging.activation_match import activation_perms, tie_safe
from graphrepair.merging.weight_match import WeightScores, weight_matching


def test_lap_maximises_and_reads_nan_as_zero():
    s = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]])
    assert assign.lap(s).tolist() == [1, 0, 2]
    s[0, 1] = float("nan")  # read as 0 (scipy refuses NaN): 0 + 0.8 + 0.7 still beats 0.1 + 0.2 + 0.7
    assert assign.lap(s).tolist() == [1, 0, 2]
    s[1, 0] = float("inf")  # read as 0 too: now the identity is best
    assert assign.lap(s).tolist() == [0, 1, 2]
    assert assign.lap(torch.zeros(4, 4)).tolist() == [0, 1, 2, 3]  # ties: the solver's fixed order


def test_lap_each_keeps_order_and_answers_on_threads(monkeypatch):
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(n, n, generator=g) for n in (40, 3, 60, 1, 25, 40, 300, 7)]
    seen = set()
    solve = assign._solve

    def spy(cost):
        seen.add(threading.current_thread().name)
        return solve(cost)

    monkeypatch.setattr(assign, "_solve", spy)
    one = [assign.lap(m) for m in mats]
    for threads in (1, 2, 4):
        got = list(assign.lap_each(iter(mats), threads))
        assert [s is m for (s, _), m in zip(got, mats)] == [True] * len(mats)
        assert all(torch.equal(a, p) for a, (_, p) in zip(one, got))
    # the chunks holding the 300-row matrix went to the pool; small ones stay in this thread
    assert any(name.startswith("graphrepair-lap") for name in seen)
    assert threading.current_thread().name in seen
    assert list(assign.lap_each([], 2)) == []


def test_lap_each_reads_scores_lazily_a_chunk_ahead():
    made = []

    def scores():
        for n in range(5):
            made.append(n)
            yield torch.eye(3)

    it = assign.lap_each(scores(), threads=2)
    next(it)
    assert made == [0, 1]  # one chunk of two made, not the whole model's matrices
    assert len(list(it)) == 4 and made == [0, 1, 2, 3, 4]


def test_workers_follow_torch_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert assign.workers() == 1


def _pair():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(10, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                                 nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    a, b = make(), make()
    with torch.no_grad():  # a few dead units in B: ties that the weights break
        b[2].weight[:3] = 0.0
        b[2].bias[:3] = -1.0
    return a, b, torch.randn(256, 10, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_threads_give_the_permutations_of_one_after_another(monkeypatch, method):
    a, b, x = _pair()
    prep = gr.prepare([a, b], x, num_examples=256, batch_size=64, statistics=False, states=False,
                      method=method)
    spec, stats = prep.spec, prep.stats[0]
    found = {}
    for threads in (1, 3):
        monkeypatch.setattr(assign, "workers", lambda t=threads: t)
        if method == "activation":
            scores = WeightScores(spec, a.state_dict(), b.state_dict())
            found[threads] = activation_perms(spec, stats, weights=scores)
        else:
            found[threads] = weight_matching(spec, a.state_dict(), b.state_dict())
    assert found[1].keys() == found[3].keys() and len(found[1]) == 3
    for g in found[1]:
        assert torch.equal(found[1][g], found[3][g]), g
    # and what the merge itself found (its solver ran on the pool)
    for g, p in prep.perms[0].items():
        assert torch.equal(p, found[1][g]), g


# the certified path (assign._certified): the optimum proved, and proved the only one, else scipy

def _correlations(n, seed, dead=0.0, spread=0.1):
    """A correlation-like matrix on the tie grid: each A unit's match a random B unit."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, spread, (n, n))
    s[np.arange(n), rng.permutation(n)] += rng.uniform(0.2, 0.9, n)
    s[rng.random(n) < dead] = 0.0
    s[:, rng.random(n) < dead] = 0.0
    return tie_safe(torch.as_tensor(s)).numpy()


def _scipy(s):
    return linear_sum_assignment(s, maximize=True)[1]


@pytest.fixture
def small_certified(monkeypatch):
    monkeypatch.setattr(assign, "CERTIFIED_ROWS", 16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,spread", [(64, 0.1), (300, 0.1), (300, 0.3), (1024, 0.1)])
def test_certified_is_scipys_permutation(small_certified, seed, n, spread):
    s = _correlations(n, seed, spread=spread)
    p = assign._certified(s)
    if spread == 0.1:  # a clear optimum: the path proves it
        assert p is not None
    if p is not None:
        assert np.array_equal(p, _scipy(s))
    assert np.array_equal(assign.lap(torch.as_tensor(s)).numpy(), _scipy(s))


def test_certified_finds_the_optimum_far_from_the_row_maxima(small_certified):
    # every row's largest entry in column 0: the optimum takes entries far below the row maxima,
    # which the first candidates (near each row's and column's maximum) miss
    rng = np.random.default_rng(3)
    n = 200
    s = rng.uniform(-0.5, 0.5, (n, n))
    s[:, 0] = 0.95
    s[np.arange(n), rng.permutation(n)] += 0.3
    s = tie_safe(torch.as_tensor(s)).numpy()
    p = assign._certified(s)
    assert p is not None and np.array_equal(p, _scipy(s))
    best = s[np.arange(n), p]
    assert (best < s.max(1) - 0.2).sum() > n // 2  # most rows away from their maximum


def test_certified_refuses_ties(small_certified):
    n = 200
    s = _correlations(n, 0)
    # two dead units (all-zero rows): any exchange of their columns ties
    dead = s.copy()
    dead[[5, 9]] = 0.0
    assert assign._certified(dead) is None
    dead_cols = s.copy()
    dead_cols[:, [5, 9]] = 0.0
    assert assign._certified(dead_cols) is None
    # two equal rows (units with the same activations): no dead unit, still a tie
    same = s.copy()
    same[7] = same[3]
    assert assign._certified(same) is None
    # an exchange of equal value between two rows of the optimum: s[a, P(a)] + s[b, P(b)] ==
    # s[a, P(b)] + s[b, P(a)], the rest untouched
    p = _scipy(s)
    tied = s.copy()
    a, b = 11, 42
    d = 1310 * assign.GRID  # about 0.01, on the grid
    tied[a, p[b]] = tied[a, p[a]] - d
    tied[b, p[a]] = tied[b, p[b]] + d
    assert assign._certified(tied) is None
    # a single exchange's loss of one grid step is no tie: proved
    step = tied.copy()
    step[a, p[b]] -= assign.GRID
    got = assign._certified(step)
    assert got is not None and np.array_equal(got, _scipy(step))
    # and lap gives scipy's choice on every one of them
    for m in (dead, dead_cols, same, tied, step):
        assert np.array_equal(assign.lap(torch.as_tensor(m)).numpy(), _scipy(m))


def test_certified_only_on_the_grid(small_certified):
    s = _correlations(200, 1)
    assert assign._certified(s) is not None
    off = s.copy()
    off[150, 3] += assign.GRID / 3  # one entry off the grid: sums no longer exact
    assert assign._certified(off) is None
    assert assign._certified(np.random.default_rng(0).normal(size=(200, 200))) is None
    assert assign._certified(s[:, :150]) is None  # not square
    big = s * 2.0 ** 14  # on the grid, but sums too large to be exact
    assert assign._certified(big) is None


def test_lap_each_takes_the_certified_path_and_gives_scipys(small_certified, monkeypatch):
    sizes = [(300, 0.0), (300, 0.05), (40, 0.0), (500, 0.0)]
    mats = [_correlations(n, seed, dead=d) for seed, (n, d) in enumerate(sizes)]
    solved = []
    solve = assign._solve
    monkeypatch.setattr(assign, "_solve", lambda c: solved.append(c.shape[0]) or solve(c))
    got = [p for _, p in assign.lap_each([torch.as_tensor(m) for m in mats], threads=2)]
    assert all(np.array_equal(p.numpy(), _scipy(m)) for p, m in zip(got, mats))
    assert got[0].dtype == torch.long
    assert solved == [300]  # only the one with dead units went to scipy


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_certified_path_keeps_the_merge_permutations(monkeypatch, method):
    a, b, x = _pair()
    with torch.no_grad():  # no dead units in B here: the certified path can prove these groups
        b[2].weight.copy_(torch.randn(48, 48, generator=torch.Generator().manual_seed(5)))
    found = {}
    for rows in (10 ** 9, 8):
        monkeypatch.setattr(assign, "CERTIFIED_ROWS", rows)
        found[rows] = gr.prepare([a, b], x, num_examples=256, batch_size=64, statistics=False,
                                 states=False, method=method).perms[0]
    assert found[8].keys() == found[10 ** 9].keys()
    for g in found[8]:
        assert torch.equal(found[8][g], found[10 ** 9][g]), g


def test_certified_grid_is_the_tie_grid():
    from graphrepair.merging.activation_match import TIE_GRID
    assert assign.GRID == TIE_GRID


def test_certified_when_the_candidates_are_the_optimum_alone(small_certified):
    # each unit's match far above everything else: the first candidates are P itself
    n = 100
    s = np.full((n, n), -0.5)
    p = np.random.default_rng(2).permutation(n)
    s[np.arange(n), p] = 0.875  # on the grid
    s[3, 7] = s[3, 7] - assign.GRID  # not quite constant off P
    got = assign._certified(s)
    assert got is not None and np.array_equal(got, p) and np.array_equal(got, _scipy(s))


def test_certified_at_another_scale(small_certified):
    # correlations ten times smaller (the first band holds whole rows): a narrower band proves it
    s = tie_safe(torch.as_tensor(_correlations(300, 4) / 10)).numpy()
    got = assign._certified(s)
    assert got is not None and np.array_equal(got, _scipy(s))


# dead units in any order (assign, "Dead units in any order"): the live units' pairing proved
# the only optimal one, the dead units' order left to the caller

def _live_pairing(s, p):
    """(live row -> live column pairs, live rows on dead columns, live columns on dead rows)."""
    dead_rows, dead_cols = ~s.any(1), ~s.any(0)
    p = np.asarray(p)
    live = ~dead_rows & ~dead_cols[p]
    return (frozenset(zip(np.flatnonzero(live).tolist(), p[live].tolist())),
            frozenset(np.flatnonzero(~dead_rows & dead_cols[p]).tolist()),
            frozenset(p[dead_rows & ~dead_cols[p]].tolist()))


def test_dead_in_any_order_proves_exactly_the_unique_live_pairings(monkeypatch):
    # every permutation of 6 units scored: where the path answers, its answer is optimal and
    # every optimum pairs the live units as it does; where all optima do, it answers
    import itertools
    monkeypatch.setattr(assign, "CERTIFIED_ROWS", 4)
    n = 6
    perms = np.array(list(itertools.permutations(range(n))))
    rng = np.random.default_rng(0)
    proved = unique = 0
    for _ in range(600):
        levels = int(rng.integers(2, 6))  # few values: many ties among live units too
        s = rng.integers(-levels, levels + 1, (n, n)) * (6553 * assign.GRID)  # steps of ~0.05
        s[rng.random(n) < 0.3] = 0.0
        s[:, rng.random(n) < 0.3] = 0.0
        values = s[np.arange(n)[None, :], perms].sum(1)
        pairings = {_live_pairing(s, q) for q in perms[values == values.max()]}
        p = assign._certified(s, dead=True)
        unique += len(pairings) == 1
        if p is not None:
            proved += 1
            assert s[np.arange(n), p].sum() == values.max()
            assert pairings == {_live_pairing(s, p)}
        else:
            assert len(pairings) > 1
    assert proved == unique and 200 < proved < 600  # both kinds met, and every unique one proved


@pytest.mark.parametrize("seed", range(3))
def test_dead_in_any_order_pairs_the_live_units_as_scipy(small_certified, seed):
    s = _correlations(400, seed, dead=0.03)
    dead_rows, dead_cols = ~s.any(1), ~s.any(0)
    assert dead_rows.sum() > 5 and dead_cols.sum() > 5
    assert assign._certified(s) is None  # scipy's own order on ties: not without its run
    p = assign._certified(s, dead=True)
    ref = _scipy(s)
    assert p is not None and _live_pairing(s, p) == _live_pairing(s, ref)
    assert s[np.arange(len(p)), p].sum() == s[np.arange(len(ref)), ref].sum()
    # the same through lap_each, without scipy's run
    solved = []
    solve = assign._solve
    with pytest.MonkeyPatch.context() as m:
        m.setattr(assign, "_solve", lambda c: solved.append(c.shape[0]) or solve(c))
        (_, got), = assign.lap_each([torch.as_tensor(s)], dead_any_order=True)
    assert solved == [] and np.array_equal(got.numpy(), p)


def test_dead_in_any_order_leaves_many_dead_units_to_scipy(small_certified):
    s = _correlations(300, 1, dead=0.3)
    assert assign._certified(s, dead=True) is None  # their candidates would be too many
    (_, got), = assign.lap_each([torch.as_tensor(s)], dead_any_order=True)
    assert np.array_equal(got.numpy(), _scipy(s))
    # a live pairing with another optimum (an exchange of equal value between two live rows) is
    # not proved either
    s = _correlations(300, 2, dead=0.03)
    p = _scipy(s)
    live = np.flatnonzero(s.any(1) & s.any(0)[p])
    a, b = live[3], live[17]
    d = 1310 * assign.GRID
    s[a, p[b]] = s[a, p[a]] - d
    s[b, p[a]] = s[b, p[b]] + d
    assert assign._certified(s, dead=True) is None


def test_dead_in_any_order_keeps_the_merge_permutations(monkeypatch):
    # dead units in A and in B: the certified path orders them otherwise than scipy, and the
    # weights' tie-break puts them where scipy's order led it
    a, b, x = _pair()
    with torch.no_grad():
        a[2].weight[5:9] = 0.0
        a[2].bias[5:9] = -1.0
    found, solved = {}, []
    solve = assign._solve
    monkeypatch.setattr(assign, "_solve", lambda c: solved.append(c.shape[0]) or solve(c))
    for rows in (10 ** 9, 8):
        monkeypatch.setattr(assign, "CERTIFIED_ROWS", rows)
        solved.clear()
        found[rows] = gr.prepare([a, b], x, num_examples=256, batch_size=64, statistics=False,
                                 states=False).perms[0]
    assert 48 not in solved  # the layer with dead units on both sides went the certified way
    assert found[8].keys() == found[10 ** 9].keys()
    for g in found[8]:
        assert torch.equal(found[8][g], found[10 ** 9][g]), g


@pytest.mark.parametrize("seed", range(4))
def test_a_reduced_solve_is_the_optimum_of_the_matrix(seed):
    """``lap_each(reduced=True)`` (weight matching's descent): scipy solves each matrix less its
    row maxima, then less its column minima. The reduced form is >= 0 with a 0 in every row and
    column, and the optimum is the matrix's own (scipy's on the matrix as it is; no ties here)."""
    gen = torch.Generator().manual_seed(seed)
    n = 300 + 50 * seed
    a, b = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64), torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    scores = [a @ b.T, (a @ b.T) * 1e-3 + 7.0, -(a @ b.T)]
    for score, (got, perm) in zip(scores, assign.lap_each(iter(scores), threads=2, reduced=True)):
        assert got is score
        c = assign._reduced(score.numpy())
        assert (c >= 0).all() and (c.min(0) == 0).all() and (c.min(1) == 0).all()
        assert torch.equal(perm, torch.as_tensor(linear_sum_assignment(score.numpy(), maximize=True)[1]))
    dead = scores[0].clone()
    dead[:5] = 0.0  # units without weights: all-zero rows, any order among them
    dead[:, :5] = 0.0
    (_, perm), = assign.lap_each([dead], reduced=True)
    assert sorted(perm.tolist()) == list(range(n))
    best = dead.numpy()[np.arange(n), linear_sum_assignment(dead.numpy(), maximize=True)[1]].sum()
    assert dead.numpy()[np.arange(n), perm.numpy()].sum() == pytest.approx(best, rel=1e-12)
    (_, empty), = assign.lap_each([torch.zeros(0, 0)], reduced=True)
    assert empty.numel() == 0
