"""The weights' tie-break (graphrepair/merging/weight_match.py, WeightScores.cosine): a block asked
for again is not recomputed while the groups it reads keep their permutations, and the answer is
the one a fresh computation gives."""

from __future__ import annotations

import torch
from torch import nn

import graphrepair as gr
from graphrepair.merging import weight_match
from graphrepair.merging.weight_match import WeightScores


def _setup():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 2))
    a, b = make(), make()
    spec = gr.discover(a, torch.randn(2, 6))
    return spec, a.state_dict(), b.state_dict()


def test_a_block_asked_again_is_kept_and_reordered(monkeypatch):
    """The whole block kept (``WeightScores._last``), as for a group that is not ``plain`` (a
    plain group keeps each tensor's term instead: ``tests/test_weight_match_speed.py``)."""
    spec, sa, sb = _setup()
    g, other = [x.name for x in spec.groups]
    scores = WeightScores(spec, sa, sb)
    assert scores.plain(g)
    scores.plain = lambda name: False
    assert scores.depends(g) == (other,) and scores.depends(other) == (g,)
    held = {other: torch.randperm(10, generator=torch.Generator().manual_seed(1))}
    rows, cols = torch.tensor([1, 4, 7]), torch.tensor([2, 9, 5])
    first = scores.cosine(g, held, rows, cols)
    calls = []
    real = scores._cosine
    monkeypatch.setattr(scores, "_cosine", lambda *args: calls.append(1) or real(*args))
    again = scores.cosine(g, {other: held[other].clone()}, rows, cols[[2, 0, 1]])
    assert calls == []  # the same permutations read: kept, columns reordered
    fresh = WeightScores(spec, sa, sb)._cosine(g, held, rows, cols[[2, 0, 1]])
    torch.testing.assert_close(again, fresh, rtol=0, atol=1e-12)
    torch.testing.assert_close(again, first[:, [2, 0, 1]], rtol=0, atol=0)
    moved = {other: held[other].flip(0)}  # the group it reads moved: computed again
    now = scores.cosine(g, moved, rows, cols)
    assert len(calls) == 1
    torch.testing.assert_close(now, WeightScores(spec, sa, sb)._cosine(g, moved, rows, cols), rtol=0, atol=1e-12)
    scores.cosine(g, moved, torch.tensor([1, 4, 8]), cols)  # other rows: computed again
    assert len(calls) == 2


def test_positions():
    old = torch.tensor([5, 2, 9])
    assert weight_match._positions(old, torch.tensor([9, 5, 2])).tolist() == [2, 0, 1]
    assert weight_match._positions(old, torch.tensor([9, 5, 3])) is None
    assert weight_match._positions(old, torch.tensor([9, 5])) is None
