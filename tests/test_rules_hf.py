"""Discovery rules for ops Hugging Face and diffusers models trace to, three ways each: structural
(the groups hold what they should), numeric (``spec.check`` keeps the function) and negative (the
rule must not free what is not free).

- ``x @ W.T`` in an exported graph is ``aten.numpy_T`` (Falcon): every axis reversed; ``x.mT``
  swaps the last two;
- in-place elementwise ops (``out.add_(identity)``, HF's ResNet) follow their out-of-place rule;
- padding (``F.pad``, ``aten.constant_pad_nd``, the padding modules) fixes the padded axes only
  (Swin, AutoencoderKL);
- tensor indexing (``h[arange(b), pos]``, ``aten.index.Tensor``: CLIP's text tower, Whisper's
  decoder) fixes the indexed axes only;
- a contiguous slice (``aten.slice`` with step 1, ``narrow``) is one block of its input's axis
  (Phi-3's fused q/k/v, GPT-NeoX's and GPT-J's rotary and pass-through head dims); a strided one
  fixes the axis;
- ``torch.gather`` (DeBERTa's relative positions) fixes the gathered axis and keeps the others;
- the grouped product of a mixture of experts (``grouped_mm_fallback``, Mixtral) contracts one
  permutation shared by all experts and fixes the experts' axis.

``form="export"`` models stop torch.fx's symbolic trace with a shape read as a Python int, so
discovery takes torch.export's ATen graph: the same model is checked in both graph forms.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphrepair as gr
from graphrepair.discovery.rules.registry import RULES
from graphrepair.errors import CheckError
from tests.helpers import discover_checked, group_of


def rows_moved(model: nn.Module, index, *names: str) -> nn.Module:
    """A copy of ``model`` whose parameters ``names`` have their rows (axis 0) gathered by ``index``."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            moved.get_parameter(name).copy_(model.get_parameter(name)[index])
    return moved


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
    # its first 3 channels meet the model input: fixed; the 5 the slice cuts off are read by nothing
    assert g is not None and g.size == 5
    assert {m.layout.split(",")[0] for m in g.params} == {"cat(fixed[3]"}
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
    perm = torch.roll(torch.arange(g.size), 1)
    wrong = rows_moved(model, perm, "lin1.weight", "lin1.bias")
    with pytest.raises(CheckError, match=r"changes? the output"):
        spec.prove(model, wrong, x, {g.name: perm})


# -- contiguous slices -----------------------------------------------------------------------------


class FusedProjection(nn.Module):
    """Phi-3's form: one linear's output cut into three contiguous blocks, each read by its own
    layer (``step=2`` cuts interleaved positions instead: the unsafe variant)."""

    def __init__(self, form: str = "fx", step: int = 1, how: str = "slice"):
        super().__init__()
        self.fused = nn.Linear(4, 12)
        self.a, self.b, self.c = nn.Linear(5, 2), nn.Linear(4, 2), nn.Linear(3, 2)
        self.form, self.step, self.how = form, step, how

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        h = torch.relu(self.fused(x))
        if self.step != 1:
            return self.a(torch.cat([h[..., 0:10:2], h[..., 1:10:2]], -1)[..., :5]) + self.c(h[..., 9:])
        if self.how == "narrow":
            parts = h.narrow(-1, 0, 5), h.narrow(-1, 5, 4), h.narrow(-1, 9, 3)
        else:
            parts = h[..., :5], h[..., 5:9], h[..., 9:]
        return self.a(parts[0]) + self.b(parts[1]) + self.c(parts[2])


@pytest.mark.parametrize("form,how", [("fx", "slice"), ("export", "slice"), ("fx", "narrow"), ("export", "narrow")])
def test_contiguous_slices_keep_each_block_free(form, how):
    spec = discover_checked(FusedProjection(form, how=how), torch.randn(2, 3, 4))
    for reader, size in (("a", 5), ("b", 4), ("c", 3)):
        g = group_of(spec, f"{reader}.weight", 1)
        assert g is not None and g.size == size, reader
        assert ("fused.weight", 0) in {(m.name, m.axis) for m in g.params}
    assert spec.num_free == 5 + 4 + 3  # the three blocks (a + b + c is the output)
    assert not [f for f in spec.fixed if "sliced" in f.reason or "no rule" in f.reason]


@pytest.mark.parametrize("form", ["fx", "export"])
def test_overlapping_slices_share_their_blocks(form):
    """h[:, :4] + h[:, 2:]: the blocks [0, 2), [2, 4), [4, 6) carry one permutation (each output
    channel j adds h[j] and h[j + 2])."""

    class Overlap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = nn.Linear(3, 6), nn.Linear(4, 2)

        def forward(self, x):
            if form == "export":
                export_only(x)
            h = torch.relu(self.lin1(x))
            return self.lin2(h[:, :4] * h[:, 2:])

    spec = discover_checked(Overlap(), torch.randn(5, 3))
    g = group_of(spec, "lin1.weight", 0)
    assert g is not None and g.size == 2 and spec.num_free == 2


@pytest.mark.parametrize("form", ["fx", "export"])
def test_strided_slice_fixes_the_axis(form):
    spec = discover_checked(FusedProjection(form, step=2), torch.randn(2, 3, 4))
    assert group_of(spec, "fused.weight", 0) is None
    assert any("with step 2" in f.reason for f in spec.fixed)
    assert group_of(spec, "c.weight", 1) is None  # the strided reads fix the whole fused axis, block c too


def test_a_wrong_permutation_across_slice_blocks_is_refused():
    """Moving a channel of the fused output from one block to another changes the function."""
    model = FusedProjection().eval()
    x = torch.randn(2, 3, 4)
    spec = gr.discover(model, x)
    g = group_of(spec, "b.weight", 1)
    swap = torch.arange(12)
    swap[4], swap[5] = 5, 4  # the last channel of block a and the first of block b
    wrong = rows_moved(model, swap, "fused.weight", "fused.bias")
    with pytest.raises(CheckError, match=r"changes? the output"):
        spec.prove(model, wrong, x, {g.name: torch.arange(g.size)})


# -- gather ----------------------------------------------------------------------------------------


class Gathered(nn.Module):
    """DeBERTa's form: scores gathered along one axis by an index expanded over the others."""

    def __init__(self, on: str = "tokens", form: str = "fx"):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.on, self.form = on, form
        self.register_buffer("pos", torch.tensor([[2], [0], [1], [1], [4]]))

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        h = torch.relu(self.lin1(x))  # (b, l, c)
        b, l, c = h.shape
        if self.on == "channels":  # channels picked by position: fixed
            idx = self.pos[:, 0].view(1, 1, 5).expand(b, l, 5)
            return self.lin2(torch.cat([torch.gather(h, 2, idx), h[..., :1]], -1))
        if self.on == "short":  # an index shorter than h on the channel axis reads its first channels
            idx = self.pos.view(1, l, 1).expand(b, l, 5)
            return self.lin2(torch.cat([torch.gather(h, 1, idx), h[..., :1]], -1))
        idx = self.pos.view(1, l, 1).expand(b, l, c)
        return self.lin2(torch.gather(h, 1, idx))


@pytest.mark.parametrize("form", ["fx", "export"])
def test_gather_along_tokens_keeps_the_channels(form):
    spec = discover_checked(Gathered(form=form), torch.randn(2, 5, 4))
    assert "gather" in op_names(spec)
    g = group_of(spec, "lin1.weight", 0)
    assert g is not None and g.size == 6
    assert ("lin2.weight", 1) in {(m.name, m.axis) for m in g.params}
    assert not [f for f in spec.fixed if "no rule" in f.reason]
    assert RULES["gather"] is RULES["take_along_dim"]


@pytest.mark.parametrize("on", ["channels", "short"])
@pytest.mark.parametrize("form", ["fx", "export"])
def test_gather_fixes_what_it_reads_by_position(on, form):
    spec = discover_checked(Gathered(on, form), torch.randn(2, 5, 4))
    assert group_of(spec, "lin1.weight", 0) is None
    reason = "gathered by position" if on == "channels" else "reads a leading part"
    assert any(reason in f.reason for f in spec.fixed)


# -- mixture of experts: grouped_mm_fallback -------------------------------------------------------


class Experts(nn.Module):
    """Mixtral's experts in miniature: tokens sorted by expert, two grouped products."""

    def __init__(self, form: str = "fx"):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.w1 = nn.Parameter(torch.randn(3, 4, 6))  # (experts, in, hidden)
        self.w2 = nn.Parameter(torch.randn(3, 6, 5))
        self.head = nn.Linear(5, 2)
        self.register_buffer("offs", torch.tensor([2, 3, 6], dtype=torch.int32))
        self.form = form

    def forward(self, x):
        if self.form == "export":
            export_only(x)
        mm = torch.ops.transformers.grouped_mm_fallback
        h = self.inp(x)  # (S, 4), already sorted by expert
        h = torch.relu(mm(h, self.w1, self.offs))
        return self.head(mm(h, self.w2, self.offs))


@pytest.mark.parametrize("form", ["fx", "export"])
def test_grouped_mm_shares_one_permutation_across_experts(form):
    pytest.importorskip("transformers")
    import transformers.integrations.moe  # noqa: F401  (registers the op)

    spec = discover_checked(Experts(form=form), torch.randn(6, 3))
    assert "grouped_mm_fallback" in op_names(spec)
    assert RULES["grouped_mm_fallback"] is RULES["_grouped_mm"]
    g_in, g_hidden = group_of(spec, "inp.weight", 0), group_of(spec, "w1", 2)
    assert g_in is not None and g_in.size == 4 and ("w1", 1) in {(m.name, m.axis) for m in g_in.params}
    assert g_hidden is not None and g_hidden.size == 6
    assert ("w2", 1) in {(m.name, m.axis) for m in g_hidden.params}
    assert group_of(spec, "w1", 0) is None  # the experts' order is fixed
    assert any("run-time offsets" in f.reason for f in spec.fixed)
    assert spec.num_free == 4 + 6 + 5


def test_moving_the_experts_is_refused():
    """Why the experts' axis is fixed: the offsets give rows to experts by position, so the
    experts' weights moved together (w1 and w2 along axis 0) change the function."""
    pytest.importorskip("transformers")
    import transformers.integrations.moe  # noqa: F401

    model = Experts().eval()
    x = torch.randn(6, 3)
    spec = gr.discover(model, x)
    g = group_of(spec, "w1", 2)
    moved = rows_moved(model, [1, 0, 2], "w1", "w2")
    with pytest.raises(CheckError, match=r"changes? the output"):
        spec.prove(model, moved, x, {g.name: torch.arange(g.size)})
