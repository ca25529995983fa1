"""No full garbage collection inside a merge: the passes' modules are emptied when they finish
(``runtime.release``), so that the pair's float64 sums are freed by their reference counts, with
Python's collector switched off."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair import runtime
from passes import pair_tap


class Branchy(nn.Module):
    """The paper's MLP reads its input's shape in Python (``if x.size(1) == 3``): symbolic
    tracing fails and torch.export's graph is used, whose pair runs on copies of the graph
    carrying A's and B's weights."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        if x.size(1) == 3:
            x = x.mean(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _plain():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("factory, kind", [(_plain, "fx"), (Branchy, "export")])
def test_the_pairs_sums_are_freed_when_the_merge_returns(monkeypatch, factory, kind):
    torch.manual_seed(0)
    a, b = factory().eval(), factory().eval()
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(1))
    assert gr.discover(a, x[:2]).traced.kind == kind
    taps, sums = [], []
    real_forward = pair_tap.PairTap.forward

    def watched(self, xa, xb):  # weak references only: the watch keeps nothing alive
        out = real_forward(self, xa, xb)
        if not self.calibrating and not any(t() is self for t in taps):
            taps.append(weakref.ref(self))
            sa, sb = self.sums[0]
            sums.extend(weakref.ref(t) for t in (sa._tot, sb._tot))
            if self.cross[0] is not None and self.cross[0]._wait is not None:
                sums.append(weakref.ref(self.cross[0]._wait))
        return out

    monkeypatch.setattr(pair_tap.PairTap, "forward", watched)
    gc.collect()
    gc.disable()  # what the merge does not free by reference counts stays
    try:
        res = gr.merge_models([a, b], x, num_examples=96, batch_size=32)
        alive_taps = [t for t in taps if t() is not None]
        alive_sums = [s for s in sums if s() is not None]
    finally:
        gc.enable()
    assert res.examples == 96 and len(taps) >= 2 and len(sums) >= 2 * len(taps)
    assert alive_taps == [] and alive_sums == []


def test_no_full_collection_inside_a_merge(monkeypatch):
    torch.manual_seed(0)
    a, b = _plain().eval(), _plain().eval()
    x = torch.randn(64, 12)
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(args) or 0)
    gr.merge_models([a, b], x, num_examples=64, batch_size=32)
    assert calls == []


def test_release_empties_only_the_module_given():
    inner = nn.Linear(3, 3)
    outer = nn.Sequential(inner)
    outer.register_buffer("b", torch.ones(2))
    before = inner.weight.clone()
    runtime.release(outer)
    assert list(outer.children()) == [] and dict(outer.named_buffers()) == {}
    torch.testing.assert_close(inner.weight, before)  # the submodule itself is left as it was
    assert dict(inner.named_parameters()).keys() == {"weight", "bias"}
