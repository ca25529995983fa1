"""passes.fold_batchnorm: eval-mode BatchNorm folded into the preceding conv / linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from passes import fold_batchnorms, producer_kind
from tests.helpers import Head, graph_of, random_bn

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


CASES = [
    ("linear", lambda b, g: Head(nn.Linear(6, 8, bias=b), random_bn(8, nn.BatchNorm1d)), (4, 6)),
    ("conv2d", lambda b, g: Head(nn.Conv2d(4, 6, 3, groups=g, bias=b), random_bn(6, nn.BatchNorm2d)), (3, 4, 7, 7)),
    ("conv1d", lambda b, g: Head(nn.Conv1d(4, 6, 3, groups=g, bias=b), random_bn(6, nn.BatchNorm1d)), (3, 4, 9)),
    (
        "conv_transpose2d",
        lambda b, g: Head(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=g, bias=b), random_bn(6, nn.BatchNorm2d)),
        (3, 4, 5, 5),
    ),
]
GROUPED = [(c, g) for c in CASES for g in (1, 2) if not (g == 2 and c[0] == "linear")]


def _kinds(gm):
    return [k for k in (producer_kind(gm, n) for n in gm.graph.nodes) if k is not None]


@pytest.mark.parametrize("how", ["fx", "aten", "aten_decomposed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case,groups", GROUPED, ids=[f"{c[0]}-groups{g}" for c, g in GROUPED])
def test_fold_batchnorm(case, groups, bias, how):
    name, factory, shape = case
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = factory(bias, groups).eval()
    gm = graph_of(model, x, how)
    expected = model(x)
    # fx graphs carry no shapes: Linear -> BatchNorm1d needs the rank, hence example_inputs
    result = fold_batchnorms(gm, example_inputs=(x,) if name == "linear" and how == "fx" else None)
    # structural: no batch norm left, one folded
    assert result.counts == {"folded": 1, "kept": 0}, result.notes
    assert "batchnorm" in _kinds(gm) and "batchnorm" not in _kinds(result.graph_module)
    keys = set(result.graph_module.state_dict())
    expected_keys = {k for k in gm.state_dict() if not k.startswith("body.1.")}
    assert keys == expected_keys | ({"body.0.bias"} if not bias else set()), keys
    # numeric
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = random_bn(3, nn.BatchNorm2d)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class InputNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = random_bn(3, nn.BatchNorm2d)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize(
    "cls,reason",
    [(Residual, "2 users"), (InputNorm, "not produced by a linear, conv or conv_transpose")],
    ids=["conv_two_users", "bn_on_input"],
)
@pytest.mark.parametrize("how", ["fx", "aten"])
def test_batchnorm_that_cannot_fold_is_kept(cls, reason, how):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    model = cls().eval()
    result = fold_batchnorms(graph_of(model, x, how))
    assert result.counts == {"folded": 0, "kept": 1}
    assert not result.modified
    assert reason in result.notes[0], result.notes
    assert "batchnorm" in _kinds(result.graph_module)
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_training_mode_batchnorm_is_not_folded():
    model = Head(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    gm = torch.fx.symbolic_trace(model)  # traced in training mode
    result = fold_batchnorms(gm)
    assert result.counts == {"folded": 0, "kept": 1}
    assert "training mode" in result.notes[0]


def test_linear_batchnorm_without_shapes_is_kept_with_advice():
    gm = graph_of(CASES[0][1](True, 1), torch.randn(4, 6), "fx")
    result = fold_batchnorms(gm)
    assert result.counts == {"folded": 0, "kept": 1}
    assert "example_inputs" in result.notes[0]
