"""merging.points: where activation matching observes each group and where REPAIR resets, chosen
from the spec and the traced graph alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphrepair as gr
from fixtures.zoo import ZOO
from graphrepair.merging.points import ObservePoint, ResetPoint, observation_points, reset_points


def _zoo_spec(name: str):
    entry = ZOO[name]
    torch.manual_seed(0)
    return gr.discover(entry.factory().eval(), entry.example_inputs())


def _obs(points: dict) -> dict:
    return {g: [(p.node, p.axis, p.positions.flatten().tolist()) for p in pts] for g, pts in points.items()}


def test_mlp_points():
    """mlp3 (Flatten, then Linear+ReLU x 3 of width 32, then the head): the three hidden Linear
    outputs are reset; each group is observed after its ReLU, which feeds the next Linear. The
    head's output is the model's output (fixed): no reset there."""
    spec = _zoo_spec("mlp3")
    want = [ResetPoint("_1", 1, 32, "conv/linear", "_1"), ResetPoint("_3", 1, 32, "conv/linear", "_3"),
            ResetPoint("_5", 1, 32, "conv/linear", "_5")]
    assert reset_points(spec) == want and reset_points(spec, "conv") == want
    assert _obs(observation_points(spec)) == {"1": [("_2", 1, list(range(32)))], "3": [("_4", 1, list(range(32)))],
                                              "5": [("_6", 1, list(range(32)))]}
    assert all(isinstance(p, ObservePoint) for pts in observation_points(spec).values() for p in pts)


class Residual(nn.Module):
    """stem conv -> BatchNorm -> ReLU, a residual branch (conv -> ReLU, no norm) added to it, then
    global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + torch.relu(self.conv(h))
        return self.fc(h.mean((2, 3)))


def test_residual_points():
    """The stem is reset after its BatchNorm (its only user), the branch conv at its own output,
    the residual sum as a residual point ("all" only). The stream is one group (the add joins the
    branch to it), observed where a conv or linear reads it: the first ReLU and the pooled mean."""
    torch.manual_seed(0)
    spec = gr.discover(Residual().eval(), torch.randn(2, 3, 6, 6))
    assert [g.name for g in spec.groups] == ["stem"]
    convs = [ResetPoint("bn", 1, 8, "conv/linear", "stem"), ResetPoint("conv", 1, 8, "conv/linear", "conv")]
    assert reset_points(spec, "conv") == convs
    assert reset_points(spec, "all") == [*convs, ResetPoint("add", 1, 8, "residual", "add")]
    assert _obs(observation_points(spec)) == {"stem": [("relu", 1, list(range(8))), ("mean", 1, list(range(8)))]}
    with pytest.raises(gr.GraphRepairError, match="points must be 'all' or 'conv', got 'every'"):
        reset_points(spec, "every")


def test_resnet20_points():
    """BN ResNet20: a reset after every conv's BatchNorm (the stem, 2 per block in 9 blocks, the 2
    projection shortcuts: 21) and at every block's residual sum (9), channels by stage."""
    spec = _zoo_spec("resnet20_bn")
    points = reset_points(spec)
    convs = [p for p in points if p.kind == "conv/linear"]
    sums = [p for p in points if p.kind == "residual"]
    assert (len(convs), len(sums)) == (21, 9) and reset_points(spec, "conv") == convs
    assert [p.node for p in sums] == ["add"] + [f"add_{i}" for i in range(1, 9)]
    assert [p.channels for p in sums] == [16] * 3 + [32] * 3 + [64] * 3
    assert {p.producer: p.node for p in convs if "shortcut" in p.node} == {
        "blocks_3_shortcut_0": "blocks_3_shortcut_1", "blocks_6_shortcut_0": "blocks_6_shortcut_1"}
    assert all(p.axis == 1 for p in points)
    obs = _obs(observation_points(spec))
    # each stage's stream is read by the next blocks (after each block's ReLU); the last also by the head
    assert [n for n, _, _ in obs["conv"]] == ["relu", "relu_2", "relu_4", "relu_6"]
    assert [n for n, _, _ in obs["blocks.6.conv2"]] == ["relu_14", "relu_16", "mean"]
    assert [n for n, _, _ in obs["blocks.0.conv1"]] == ["relu_1"]


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_weight_computed_in_the_forward_is_not_observed(tracer):
    """A weight transposed or scaled in the forward is a node of the group that feeds a linear
    layer, but no activation: its "samples" are the weight's rows, the same every batch. Before:
    observed beside the ReLUs, so the weight's rows entered the correlations the assignment
    solves. Only nodes computed from the model's inputs are observed."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 16))  # (in, out)
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            if tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
                raise ValueError("never")
            h = torch.relu(nn.functional.linear(x, self.w1.t()))
            return self.b(torch.relu(nn.functional.linear(h, self.a.weight * 2.0, self.a.bias)))

    spec = gr.discover(Net().eval(), torch.randn(4, 8))
    assert spec.traced.kind == tracer
    observed = {p.node for pts in observation_points(spec).values() for p in pts}
    relus = {n.name for n in spec.traced.gm.graph.nodes if "relu" in str(n.target)}
    assert observed == relus and len(relus) == 2, (observed, relus)
