"""The reuse of discovered specs (graphrepair/discovery/reuse.py): a model already discovered in
this process is not traced again, and a changed model is discovered afresh."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.discovery import discover as discover_module
from graphrepair.discovery import reuse


class Net(nn.Module):
    def __init__(self, width: int = 16, act: type = nn.ReLU, skip: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.act = act()
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)
        self.skip = skip
        self.register_buffer("scale", torch.ones(3), persistent=False)

    def forward(self, x):
        h = self.act(self.fc1(x))
        y = self.act(self.fc2(h))
        return self.out(y + h if self.skip else y) * self.scale


@pytest.fixture
def traces(monkeypatch):
    """The number of traces discovery made (each discovery traces once)."""
    calls = []
    real = discover_module.trace

    def counting(model, example_inputs):
        calls.append(type(model).__name__)
        return real(model, example_inputs)

    monkeypatch.setattr(discover_module, "trace", counting)
    reuse.clear()
    yield calls
    reuse.clear()


def _x(n=2):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(0))


def test_same_model_is_discovered_once(traces):
    torch.manual_seed(0)
    a = Net()
    first = gr.discover(a, (_x(),))
    again = gr.discover(a, (_x(),))
    assert again is first and traces == ["Net"]
    assert [g.size for g in first.groups] == [16, 16]
    # another instance of the architecture: its own discovery (what its forward reads outside
    # the model is in no key), kept for it in turn
    b = Net()
    other = gr.discover(b, (_x(),))
    assert other is not first and traces == ["Net", "Net"]
    assert gr.discover(b, (_x(),)) is other and gr.discover(a, (_x(),)) is first and len(traces) == 2


def test_a_merge_reuses_the_spec(traces):
    torch.manual_seed(0)
    a, b = Net(), Net()
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    gr.merge_models([a, b], data, num_examples=64, batch_size=32)
    gr.merge_models([a, b], data, num_examples=64, batch_size=32)
    assert traces == ["Net"]


@pytest.mark.parametrize("change", ["shape", "type", "flag", "buffer", "example"])
def test_a_changed_model_is_discovered_afresh(traces, change):
    torch.manual_seed(0)
    model = Net()
    x = _x()
    first = gr.discover(model, (x,))
    if change == "shape":  # a layer resized: the groups are another size
        model.fc2, model.out = nn.Linear(16, 24), nn.Linear(24, 3)
    elif change == "type":  # a layer of another type
        model.act = nn.Tanh()
    elif change == "flag":  # an attribute the forward reads: the residual ties fc1 and fc2
        model.skip = True
    elif change == "buffer":  # a non-persistent buffer, which the graph keeps as traced
        model.scale = torch.full((3,), 2.0)
    else:  # another example shape
        x = _x(5)
    fresh = gr.discover(model, (x,))
    assert fresh is not first and len(traces) == 2
    sizes = sorted(g.size for g in fresh.groups)
    assert sizes == {"shape": [16, 24], "flag": [16]}.get(change, [16, 16])
    # the fresh spec is the model's: it proves its own random permutations
    fresh.check(model, (x,))
    assert gr.discover(model, (x,)) is fresh and len(traces) == 2


def test_entries_go_with_their_model(traces):
    model = Net()
    spec = gr.discover(model, (_x(),))
    assert reuse.info()["entries"] == 1
    ref = weakref.ref(model)
    del model, spec
    gc.collect()
    assert ref() is None  # the kept spec does not keep the model (nor its weights) alive
    assert reuse.info()["entries"] == 0


def test_the_kept_spec_is_read_only(traces):
    spec = gr.discover(Net(), (_x(),))
    with pytest.raises(TypeError):
        spec.param_axes["fc1.weight"] = ()
    with pytest.raises(TypeError):
        spec.var_of_group["x"] = 0


def test_discovery_without_reuse(traces):
    model = Net()
    first = gr.discover(model, (_x(),))
    from graphrepair.discovery.discover import discover
    fresh = discover(model, (_x(),), reuse_spec=False)
    assert fresh is not first and len(traces) == 2
    assert [g.size for g in fresh.groups] == [g.size for g in first.groups]


def test_an_unkeyable_example_is_not_kept():
    model = Net()
    assert reuse.signature(model, ({"x": _x()},)) is None
    reuse.keep(model, None, object())
    assert reuse.lookup(model, None) is None
