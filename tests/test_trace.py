"""Tracing: symbolic_trace first, torch.export when it fails, clear errors when both fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphrepair as gr
from fixtures.zoo import ZOO


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither tracer can follow it
            return self.fc(x)
        return -self.fc(x)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return {"logits": self.b(h), "hidden": (h.sum(-1),)}


def test_symbolic_trace_is_preferred():
    t = gr.trace(ZOO["mlp3"].factory(), ZOO["mlp3"].example_inputs())
    assert t.kind == "fx" and t.fx_error is None
    assert any(n.op == "call_module" for n in t.gm.graph.nodes)


def test_export_fallback_on_shape_control_flow():
    entry = ZOO["shape_branch_cnn"]
    t = gr.trace(entry.factory(), entry.example_inputs())
    assert t.kind == "export"
    assert "control flow" in t.fx_error
    # shapes were recorded for every tensor node
    convs = [n for n in t.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert convs and all(t.info[n.name].shape[0] == 2 for n in convs)


def test_untraceable_model_names_both_causes():
    with pytest.raises(gr.TraceError) as e:
        gr.trace(DataDependent(), torch.randn(2, 4))
    msg = str(e.value)
    assert "DataDependent" in msg and "symbolic_trace failed" in msg and "torch.export.export failed" in msg


def test_wrong_input_shape_names_the_failing_node():
    with pytest.raises(gr.ShapeError, match=r"node 'conv'.*3 channels.*Check the shape and dtype of the example"):
        gr.discover(ZOO["resnet20_bn"].factory(), torch.randn(1, 5, 32, 32))


def test_wrong_input_dtype_says_so():
    """Integer images into float weights: the message asked to check the shape alone."""
    with pytest.raises(gr.ShapeError, match=r"node 'conv'.*Long.*Check the shape and dtype of the example"):
        gr.discover(ZOO["resnet20_bn"].factory(), torch.ones(1, 3, 32, 32, dtype=torch.long))


def test_dict_and_tuple_outputs_are_supported():
    torch.manual_seed(0)
    m = DictOutput().eval()
    x = torch.randn(3, 4)
    spec = gr.discover(m, x)
    assert spec.num_free == 8  # the hidden layer; 'hidden' output sums it, which is invariant
    spec.check(m, x)


def test_tracing_does_not_change_training_mode():
    m = ZOO["resnet20_bn"].factory().train()
    gr.discover(m, ZOO["resnet20_bn"].example_inputs())
    assert all(mod.training for mod in m.modules())
