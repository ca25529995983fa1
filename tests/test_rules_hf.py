"""Discovery rules for ops Hugging Face and diffusers models trace to, three ways each: structural
(the groups hold what they should), numeric (``spec.check`` keeps the function) and negative (the
rule must not free what is not free).

- ``x @ W.T`` in an exported graph is ``aten.numpy_T`` (Falcon): every axis reversed; ``x.mT``
  swaps the last two;
- in-place elementwise ops (``out.add_(identity)``, HF's ResNet) follow their out-of-place rule;
- padding (``F.pad``, ``aten.constant_pad_nd``, the padding modules) fixes the padded axes only
  (Swin, AutoencoderKL);
- tensor indexing (``h[arange(b), pos]``, ``aten.index.Tensor``: CLIP's text tower, Whisper's
  decoder) fixes the indexed axes only.

``form="export"`` models stop torch.fx's symbolic trace with a shape read as a Python int, so
discovery takes torch.export's ATen graph: the same model is checked in both graph forms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphrepair as gr
from graphrepair.discovery.rules.registry import RULES
from graphrepair.errors import CheckError
from tests.helpers import discover_checked, group_of


def export_only(x: torch.Tensor) -> None:
    """A Python int of a shape: symbolic_trace fails, torch.export traces on."""
    if int(x.shape[-1]) < 0:
        raise ValueError("never")


def op_names(spec) -> set[str]:
    from graphrepair.discovery.context import op_name

    return {op_name(n) for n in spec.traced.gm.graph.nodes if n.op in ("call_function", "call_method")}


# -- x @ W.T (aten.numpy_T) and x.mT ------------------------------------------------------------------


class TransposedWeights(nn.Module):
    """Falcon's form: ``x @ W.T`` with raw weight matrices (the exported graph's numpy_T)."""

    def __init__(self, form: str = "export", last_two: bool = False):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(3, 6))
        self.form, self.last_two = form, last_two

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        w1 = self.w1.mT if self.last_two else self.w1.T
        return torch.tanh(x @ w1) @ self.w2.T


@pytest.mark.parametrize("form", ["fx", "export"])
@pytest.mark.parametrize("last_two", [False, True])
def test_transposed_weight_joins_the_hidden_axis(form, last_two):
    spec = discover_checked(TransposedWeights(form, last_two), torch.randn(2, 5, 4))
    if form == "export":
        assert spec.traced.kind == "export"
        assert ("mT" if last_two else "numpy_T") in op_names(spec) or "transpose" in op_names(spec)
    g = group_of(spec, "w1", 0)
    assert g is not None and g.size == 6
    assert ("w2", 1) in {(m.name, m.axis) for m in g.params}
    assert spec.num_free == 6


def test_reversed_axes_rule_reverses_every_axis():
    """numpy_T on a 3-d hidden (b, l, c) -> (c, l, b): the channel axis is first after it, so a
    linear over the last axis reads the batch, and the channels reach the output: nothing moves."""

    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(2, 3)

        def forward(self, x):
            export_only(x)
            return self.lin2(torch.relu(self.lin1(x)).T)

    spec = discover_checked(Reversed(), torch.randn(2, 5, 4))
    assert "numpy_T" in op_names(spec)
    assert group_of(spec, "lin1.weight", 0) is None
    assert spec.num_free == 0
    assert RULES["numpy_T"] is not RULES["t"]


# -- in-place elementwise ops ----------------------------------------------------------------------


class InPlaceResidual(nn.Module):
    """HF ResNet's basic block in miniature: ``out.add_(shortcut)`` then an in-place ReLU."""

    def __init__(self, into_input: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.into_input = into_input

    def forward(self, x):
        h = torch.relu(self.stem(x))
        out = self.conv(h)
        if self.into_input:  # the shortcut is the model input itself: its channels are fixed
            out = self.conv(self.stem(x))[:, :3].add_(x)
            return out.mean((2, 3))
        out.add_(h)
        out.relu_()
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("form", ["fx", "export"])
def test_in_place_add_joins_the_residual_stream(form):
    model = InPlaceResidual()
    x = torch.randn(2, 3, 6, 6)
    if form == "export":
        model.forward = _export_first(model.forward)
    spec = discover_checked(model, x)
    assert {"add_", "relu_"} & op_names(spec) or form == "export"
    g = group_of(spec, "stem.weight", 0)
    assert g is not None and g.size == 8
    members = {(m.name, m.axis) for m in g.params}
    assert {("conv.weight", 0), ("conv.weight", 1), ("head.weight", 1)} <= members
    assert "residual" in g.joins
    assert not [f for f in spec.fixed if "no rule" in f.reason]


def test_in_place_add_of_the_input_fixes_the_stream():
    spec = discover_checked(InPlaceResidual(into_input=True), torch.randn(2, 3, 6, 6))
    assert "add_" in op_names(spec)
    g = group_of(spec, "conv.weight", 0)
    assert g is None  # its first 3 channels meet the model input, the rest the output: nothing moves
    assert RULES["add_"] is RULES["add"]


def _export_first(forward):
    def wrapped(x):
        export_only(x)
        return forward(x)
    return wrapped


# -- padding ---------------------------------------------------------------------------------------


class Padded(nn.Module):
    """conv -> pad (functional or a padding module) -> conv -> mean -> linear."""

    def __init__(self, how: str = "F.pad", channels: bool = False, form: str = "fx"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(8 if channels else 6, 5, 3)
        self.fc = nn.Linear(5, 2)
        self.pad = nn.ZeroPad2d((1, 2, 0, 1)) if how == "module" else nn.ReflectionPad2d(1) if how == "reflect" else None
        self.how, self.channels, self.form = how, channels, form

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        h = torch.relu(self.conv1(x))
        if self.channels:  # padding the channel axis: positions added to it, the channels are fixed
            h = F.pad(h, (0, 0, 0, 0, 1, 1))
        elif self.pad is not None:
            h = self.pad(h)
        else:
            h = F.pad(h, (1, 1, 2, 0), value=0.5)
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.mark.parametrize("how,form", [("F.pad", "fx"), ("F.pad", "export"), ("module", "fx"), ("reflect", "fx"),
                                      ("reflect", "export")])
def test_pad_keeps_the_channels_free(how, form):
    spec = discover_checked(Padded(how, form=form), torch.randn(2, 3, 8, 8))
    g = group_of(spec, "conv1.weight", 0)
    assert g is not None and g.size == 6
    assert ("conv2.weight", 1) in {(m.name, m.axis) for m in g.params}
    assert spec.num_free == 6 + 5
    assert not [f for f in spec.fixed if "no rule" in f.reason]


@pytest.mark.parametrize("form", ["fx", "export"])
def test_pad_on_the_channel_axis_fixes_it(form):
    spec = discover_checked(Padded(channels=True, form=form), torch.randn(2, 3, 8, 8))
    assert group_of(spec, "conv1.weight", 0) is None
    assert any("padded" in f.reason for f in spec.fixed)
    assert group_of(spec, "conv2.weight", 0) is not None  # after the pad, channels move again


# -- tensor indexing -------------------------------------------------------------------------------


class Pooled(nn.Module):
    """CLIP's pooled token: ``h[arange(b), position]`` (b, l, c) -> (b, c), then a projection."""

    def __init__(self, on_channels: bool = False, form: str = "fx"):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.lin3 = nn.Linear(2, 3)
        self.on_channels, self.form = on_channels, form

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        h = torch.relu(self.lin1(x))
        if self.on_channels:  # picking channels by a computed index: the channel axis is fixed
            pick = x[0, 0, :2].argsort()
            return self.lin3(h[:, :, pick])
        pos = x[..., 0].argmax(-1)
        return self.lin2(h[torch.arange(x.shape[0]), pos])


@pytest.mark.parametrize("form", ["fx", "export"])
def test_index_along_tokens_keeps_the_channels(form):
    spec = discover_checked(Pooled(form=form), torch.randn(3, 5, 4))
    if form == "export":
        assert "index" in op_names(spec)
    g = group_of(spec, "lin1.weight", 0)
    assert g is not None and g.size == 6
    assert ("lin2.weight", 1) in {(m.name, m.axis) for m in g.params}
    assert not [f for f in spec.fixed if "tensor indexing" in f.reason or "no rule" in f.reason]


@pytest.mark.parametrize("form", ["fx", "export"])
def test_index_on_the_channel_axis_fixes_it(form):
    spec = discover_checked(Pooled(on_channels=True, form=form), torch.randn(3, 5, 4))
    assert group_of(spec, "lin1.weight", 0) is None
    assert any("indexed by a tensor" in f.reason for f in spec.fixed)


def test_a_wrong_permutation_through_the_index_is_refused():
    """The proof sees a permutation that the rule would not allow: lin1's rows moved without
    lin2's columns."""
    model = Pooled().eval()
    x = torch.randn(3, 5, 4)
    spec = gr.discover(model, x)
    g = group_of(spec, "lin1.weight", 0)
    wrong = Pooled().eval()
    wrong.load_state_dict(model.state_dict())
    perm = torch.roll(torch.arange(g.size), 1)
    with torch.no_grad():
        wrong.lin1.weight.copy_(model.lin1.weight[perm])
        wrong.lin1.bias.copy_(model.lin1.bias[perm])
    with pytest.raises(CheckError, match=r"changes? the output"):
        spec.prove(model, wrong, x, {g.name: perm})
