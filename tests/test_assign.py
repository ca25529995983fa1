"""The linear assignments (graphrepair/merging/assign.py): one solver, and independent groups
solved side by side on threads with the same permutations as one after another."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.merging import assign
from graphrepair.merging.activation_match import activation_perms
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
