"""Discovery rules, three ways each: structural (the groups hold what they should), numeric (the
spec keeps the function), negative (the rule must not free what is not free)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphrepair as gr
from graphrepair.discovery import rules
from tests.helpers import ZeroHead, discover_checked, group_of



class Functional(nn.Module):
    """Weights used through F.linear / F.conv2d / torch.addmm (weights as get_attr nodes)."""

    def __init__(self, transposed_weight=False):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(6))
        self.transposed = transposed_weight
        self.w2 = nn.Parameter(torch.randn(6, 5) if transposed_weight else torch.randn(5, 6))
        self.b2 = nn.Parameter(torch.randn(5))
        self.w3 = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)).mean((2, 3))
        h = torch.addmm(self.b2, h, self.w2) if self.transposed else F.linear(h, self.w2, self.b2)
        return F.linear(torch.tanh(h), self.w3)


@pytest.mark.parametrize("transposed", [False, True])
def test_functional_linear_conv_addmm(transposed):
    spec = discover_checked(Functional(transposed), torch.randn(2, 3, 5, 5))
    assert spec.num_free == 6 + 5
    g = group_of(spec, "w2", 1 if transposed else 0)
    assert g is not None and g.size == 5
    assert {(m.name, m.axis) for m in g.params} >= {("b2", 0), ("w3", 1)}


# -- grouped convolutions: each input group and each output group permuted on its own --------------


def grouped(groups: int, transposed: bool = False, bias: bool = True, c: int = 64) -> nn.Sequential:
    """1x1 producer of c channels, a grouped conv (or transposed conv) c -> c, a 1x1 reader."""
    conv = (nn.ConvTranspose2d(c, c, 2, stride=2, groups=groups, bias=bias) if transposed
            else nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=bias))
    return nn.Sequential(nn.Conv2d(3, c, 1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(c, 4, 1))


class FunctionalGrouped(nn.Module):
    """``grouped``'s layers, the grouped conv called as F.conv2d / F.conv_transpose2d (its
    weight a get_attr node)."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        conv = self.seq[2]
        if isinstance(conv, nn.ConvTranspose2d):
            y = F.conv_transpose2d(torch.relu(self.seq[0](x)), conv.weight, conv.bias, stride=2, groups=conv.groups)
        else:
            y = F.conv2d(torch.relu(self.seq[0](x)), conv.weight, conv.bias, padding=1, groups=conv.groups)
        return self.seq[4](torch.relu(y))


def members(g) -> set:
    return {(m.name, m.axis) for m in g.params}


@pytest.mark.parametrize("form", ["module", "functional"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_conv_frees_every_group(groups, transposed, bias, form):
    """Input group j (producer channels j*n ..) and output group j each take their own permutation,
    and whole groups move, input and output group together (one order of the g groups); the
    weight's per-group axis follows the one of its row block (a PerBlock over axis 0)."""
    c = 64
    x = torch.randn(2, 3, 4, 4)
    model = grouped(groups, transposed, bias, c)
    prefix = ""
    if form == "functional":
        model, prefix = FunctionalGrouped(model), "seq."
    spec = discover_checked(model, x)
    key = next(k for k, t in model.state_dict().items() if t.ndim == 4 and t.shape[2] > 1)  # the grouped conv
    if groups == 1:
        assert spec.num_free == 2 * c
        assert sorted(g.size for g in spec.groups) == [c, c]
        return
    # before: c/groups (one permutation in every input group) + c; then 2c (groups kept in place)
    assert spec.num_free == 2 * c + groups
    order = [g for g in spec.groups if g.name.endswith(".o")]
    assert [g.size for g in order] == [groups]
    # the order of the groups moves the producer's rows, the grouped conv's rows and the reader's columns
    assert {(prefix + "0.weight", 0), (key, 0), (prefix + "4.weight", 1)} <= members(order[0])
    assert all(m.layout.startswith("wreath(") for m in order[0].params)
    inside = [g for g in spec.groups if g not in order]
    assert sorted(g.size for g in inside) == [c // groups] * (2 * groups)
    per_group_axis = [g for g in inside if (key, 1) in members(g)]
    rows = [g for g in inside if (key, 0) in members(g)]
    assert len(per_group_axis) == len(rows) == groups
    assert all(m.layout.startswith("per_block(axis 0:") for g in per_group_axis for m in g.params
               if (m.name, m.axis) == (key, 1))
    producer = [g for g in inside if any(m.name.startswith(prefix + "0.") for m in g.params)]
    assert len(producer) == groups
    # a conv's per-group axis reads the input groups; a transposed conv's permutes the output groups
    assert (producer == per_group_axis) != transposed and (producer == rows) == transposed


def test_moving_whole_groups_moves_weight_blocks_with_their_part():
    """The order of the groups alone moves whole row blocks of the grouped conv's weight and whole
    blocks of the producer's rows; a group's own permutation then reorders the columns of the
    block at its new place."""
    model = grouped(4, c=16)
    spec = discover_checked(model, torch.randn(2, 3, 4, 4))
    order = next(g for g in spec.groups if g.name.endswith(".o"))
    w, w0 = model.state_dict()["2.weight"], model.state_dict()["0.weight"]
    swap = torch.tensor([2, 0, 3, 1])
    got = spec.permute_state_dict(model.state_dict(), {order.name: swap})
    blocks = torch.cat([torch.arange(4) + 4 * j for j in swap])
    torch.testing.assert_close(got["2.weight"], w[blocks], rtol=0, atol=0)
    torch.testing.assert_close(got["0.weight"], w0[blocks], rtol=0, atol=0)
    first = next(g for g in spec.groups if g.name.endswith("[0].0"))  # the producer's new group 0
    p = torch.tensor([3, 1, 0, 2])
    got = spec.permute_state_dict(model.state_dict(), {order.name: swap, first.name: p})
    torch.testing.assert_close(got["0.weight"][:4], w0[8:12][p], rtol=0, atol=0)
    torch.testing.assert_close(got["2.weight"][:4], w[8:12][:, p], rtol=0, atol=0)
    torch.testing.assert_close(got["2.weight"][4:], w[blocks][4:], rtol=0, atol=0)


def test_grouped_weight_is_gathered_per_row_block():
    """Permuting one input group changes only the weight rows of the output group that reads it,
    and only along axis 1."""
    model = grouped(4)
    spec = discover_checked(model, torch.randn(2, 3, 4, 4))
    g = next(g for g in spec.groups if ("0.weight", 0) in members(g) and g.name.endswith(".2"))
    p = torch.randperm(16)
    w = model.state_dict()["2.weight"]
    got = spec.permute_state_dict(model.state_dict(), {g.name: p})["2.weight"]
    torch.testing.assert_close(got[32:48], w[32:48, p], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([got[:32], got[48:]]), torch.cat([w[:32], w[48:]]), rtol=0, atol=0)


class TwoReaders(nn.Module):
    """One input read by a grouped conv and by ``other``: a plain conv, or the residual stream."""

    def __init__(self, other: str, groups: int = 4, c: int = 32):
        super().__init__()
        self.other = other
        self.stem = nn.Conv2d(3, c, 1)
        self.gconv = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.plain = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.gconv(h))
        y = y + (self.plain(h) if self.other == "plain conv" else h)
        return self.head(torch.relu(y))


@pytest.mark.parametrize("other", ["plain conv", "residual"])
def test_grouped_conv_input_read_elsewhere_keeps_its_groups(other):
    """A plain conv or a residual add reading the grouped conv's input reads it through an
    ordinary index_select (the plain conv's input axis is cat(p_1..p_g)): nothing there asks for
    one permutation in every group, and the check proves that the groups may differ."""
    spec = discover_checked(TwoReaders(other), torch.randn(2, 3, 6, 6))
    stem = [g for g in spec.groups if ("stem.weight", 0) in members(g) and not g.name.endswith(".o")]
    assert [g.size for g in stem] == [8] * 4
    assert all(("gconv.weight", 1) in members(g) for g in stem)
    # the order of the 4 groups: one, shared by the stem's and gconv's output groups
    order = [g for g in spec.groups if g.name.endswith(".o")]
    assert [g.size for g in order] == [4] and {("stem.weight", 0), ("gconv.weight", 0)} <= members(order[0])
    if other == "plain conv":  # stem 4 x 8; gconv's output groups, joined with plain's output
        assert all(("plain.weight", 1) in members(g) for g in stem)
        assert spec.num_free == 32 + 32 + 4
    else:  # one stream: the stem's, gconv's and the add's channels, in 4 groups of 8
        assert all(("gconv.weight", 0) in members(g) for g in stem)
        assert spec.num_free == 32 + 4


class SharedPermutation(nn.Module):
    """A grouped conv whose input groups must carry one permutation: its input is ``h`` repeated
    per group, or the same tensor concatenated per group; or its weight is computed (``w * s``),
    so along axis 1 the conv reads an activation, not its parameter."""

    def __init__(self, how: str, groups: int = 4, n: int = 8):
        super().__init__()
        self.how, self.groups = how, groups
        self.stem = nn.Conv2d(3, n if how in ("repeat", "cat") else groups * n, 1)
        self.gconv = nn.Conv2d(groups * n, groups * n, 3, padding=1, groups=groups)
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Conv2d(groups * n, 2, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.how == "repeat":
            y = self.gconv(h.repeat(1, self.groups, 1, 1))
        elif self.how == "cat":
            y = self.gconv(torch.cat([h] * self.groups, 1))
        else:
            y = F.conv2d(h, self.gconv.weight * self.scale, self.gconv.bias, padding=1, groups=self.groups)
        return self.head(torch.relu(y))


@pytest.mark.parametrize("how", ["repeat", "cat", "computed weight"])
def test_grouped_conv_gets_no_freedom_where_groups_share_a_permutation(how):
    spec = discover_checked(SharedPermutation(how), torch.randn(2, 3, 6, 6))
    stem = [g for g in spec.groups if ("stem.weight", 0) in members(g) and not g.name.endswith(".o")]
    assert [g.size for g in stem] == [8]  # one permutation of 8, the same in every input group
    layouts = [m.layout for g in spec.groups for m in g.params if (m.name, m.axis) == ("gconv.weight", 1)]
    assert layouts and not any("per_block" in lay for lay in layouts)
    # a repeated or concatenated input pins the groups in place; a computed weight still lets
    # whole groups move (its rows and the stem's blocks of 8, one order of 4)
    order = [g.size for g in spec.groups if g.name.endswith(".o")]
    assert order == ([4] if how == "computed weight" else [])
    assert spec.num_free == 8 + 32 + sum(order)


def test_grouped_conv_applied_twice_ties_input_and_output_groups():
    """The same grouped conv applied twice (its output is its input): input group j and output
    group j take one permutation, still a different one per group."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1)
            self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)

        def forward(self, x):
            return self.head(torch.relu(self.g(torch.relu(self.g(torch.relu(self.stem(x)))))))

    spec = discover_checked(Twice(), torch.randn(2, 3, 6, 6))
    assert sorted(g.size for g in spec.groups) == [4] * 5  # 4 groups of 4 and their order
    assert all({("stem.weight", 0), ("g.weight", 0)} <= members(g) for g in spec.groups)
    assert all(("g.weight", 1) in members(g) for g in spec.groups if not g.name.endswith(".o"))


@pytest.mark.parametrize("transposed", [False, True])
def test_depthwise_follows_its_input(transposed):
    """Depthwise (one input channel per group): the input moves freely and whole groups with it;
    the multiplier permutation inside each output group is shared by all groups (unchanged)."""
    conv = (nn.ConvTranspose2d(8, 16, 2, stride=2, groups=8) if transposed
            else nn.Conv2d(8, 16, 3, padding=1, groups=8))
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(16, 4, 1))
    spec = discover_checked(m, torch.randn(2, 3, 6, 6))
    g = group_of(spec, "0.weight")
    assert any(p.name == "2.weight" for p in g.params)  # the depthwise conv moves with its input
    assert sorted(g.size for g in spec.groups) == [2, 8]  # + the multiplier permutation (16 = 8 x 2)
    assert not any("per_block" in m.layout for g in spec.groups for m in g.params)


@pytest.mark.parametrize("num_groups,free", [(1, 8), (2, 8 + 2), (8, 8)])
def test_group_norm_keeps_channels_in_their_groups(num_groups, free):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(num_groups, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    spec = discover_checked(m, torch.randn(2, 3, 6, 6))
    assert spec.num_free == free
    if 1 < num_groups < 8:  # permutations inside each block of 8 / G channels, and of whole blocks
        assert sorted(g.size for g in spec.groups) == [num_groups] + [8 // num_groups] * num_groups
        order = next(g for g in spec.groups if g.name.endswith(".o"))
        assert ("1.weight", 0) in members(order) and ("3.weight", 1) in members(order)


def test_layer_norm_channels_last():
    class CL(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)))

    spec = discover_checked(CL(), torch.randn(2, 3, 5, 5))
    g = group_of(spec, "conv.weight")
    assert {("norm.weight", 0), ("norm.bias", 0), ("fc.weight", 1)} <= {(m.name, m.axis) for m in g.params}


def test_flatten_merges_channels_with_spatial_blocks():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 3 * 3, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))

    spec = discover_checked(Flat(), torch.randn(2, 1, 5, 5))
    g = group_of(spec, "conv.weight")
    fc = next(m for m in g.params if m.name == "fc.weight")
    assert fc.axis == 1 and fc.layout.startswith("kron(") and "fixed[9]" in fc.layout


def test_concat_carries_each_block():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(9, 2)

        def forward(self, x):
            return self.fc(torch.relu(torch.cat([self.a(x), self.b(x)], dim=-1)))

    spec = discover_checked(C(), torch.randn(2, 3))
    assert sorted(g.size for g in spec.groups) == [4, 5]
    assert all("concat" in g.joins for g in spec.groups)


def test_split_and_chunk():
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x):
            p, q = torch.split(self.a(x), [3, 5], dim=-1)
            return self.fc1(torch.relu(p)) + self.fc2(q)

    spec = discover_checked(S(), torch.randn(2, 3))
    assert sorted(g.size for g in spec.groups) == [3, 5]


def test_se_gate_joins_group():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc1, self.fc2, self.head = nn.Linear(8, 2), nn.Linear(2, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.conv(x)
            gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
            return self.head((h * gate[:, :, None, None]).mean((2, 3)))

    spec = discover_checked(SE(), torch.randn(2, 3, 6, 6))
    g = group_of(spec, "conv.weight")
    assert ("fc2.weight", 0) in {(m.name, m.axis) for m in g.params}
    assert "gate" in g.joins
    assert spec.num_free == 8 + 2


def test_tied_embedding_head():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.relu(self.mix(self.emb(t))) + self.emb(t))

    spec = discover_checked(LM(), torch.randint(0, 11, (2, 5)))
    g = group_of(spec, "emb.weight", 1)
    assert ("head.weight", 1) in {(m.name, m.axis) for m in g.params}
    assert any(f.name == "emb.weight" and f.axis == 0 for f in spec.fixed)
    assert spec.num_free == 6


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_module(batch_first):
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0] + h)

    spec = discover_checked(A(), torch.randn(4, 5, 3))
    # stream 8 (in -> attention -> residual), per-head q/k 2 x 4 and v 2 x 4
    assert spec.num_free == 8 + 8 + 8


def test_sdpa_heads():
    class H(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(b, t, 8))

    spec = discover_checked(H(), torch.randn(2, 5, 8))
    assert sorted(g.size for g in spec.groups) == [2, 4, 4]  # heads, q/k dims, v dims


@pytest.mark.parametrize("op", ["cumsum", "argmax_gather", "slice", "unknown"])
def test_order_dependent_ops_fix_their_axis(op):
    class O(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            if op == "cumsum":
                h = h.cumsum(-1)
            elif op == "argmax_gather":
                h = h * h.argmax(-1, keepdim=True).float()
            elif op == "slice":
                h = torch.cat([h[:, ::2], h[:, 1::2]], dim=-1)  # interleaved positions
            else:
                h = torch.fft.fft(h).real
            return self.b(h)

    spec = discover_checked(O(), torch.randn(2, 3))
    assert spec.num_free == 0
    assert any(not f.structural and f.kind == "node" for f in spec.fixed)


def test_reductions_and_softmax_over_channels_are_invariant():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.softmax(h, -1) * h.mean(-1, keepdim=True) + h.amax(-1, keepdim=True))

    spec = discover_checked(R(), torch.randn(2, 3))
    assert spec.num_free == 6


def test_unknown_module_fixes_everything_it_touches():
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.LSTM(6, 4, proj_size=2))  # (projections: no rule)
    x = torch.randn(5, 2, 3)
    spec = gr.discover(m, x)
    assert spec.num_free == 0
    assert any("LSTM" in f.reason for f in spec.fixed)


class _TupleOut(nn.Module):
    """Returns what an op returning several tensors gives, as it is: chunk's halves, or an LSTM's
    (output, (h_n, c_n))."""

    def __init__(self, lstm: bool):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 4) if lstm else None

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.rnn(h) if self.rnn is not None else h.chunk(2, -1)


@pytest.mark.parametrize("lstm", [False, True])
def test_tensors_a_model_returns_inside_an_ops_tuple_are_model_outputs(lstm):
    """Before: the axes of a tuple-valued node the model returned as it is were not fixed as model
    outputs, so the chunked layer's units moved and the proof failed, calling it a discovery bug."""
    m, x = _TupleOut(lstm), torch.randn(5, 2, 3)
    spec = discover_checked(m, x)
    assert group_of(spec, "rnn.weight_hh_l0" if lstm else "a.weight", 1 if lstm else 0) is None
    if lstm:
        assert group_of(spec, "a.weight", 0).size == 8  # what feeds the LSTM still moves


# -- arguments by name, failing rules, grouped-query attention, stochastic depth ---------------------


class NormOver(nn.Module):
    """h / ||h|| over axis ``dim`` with ``p`` as argument 1: ``norm(h, 2, 1)`` reduces axis 1."""

    def __init__(self, call):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        self.call = call

    def forward(self, x):
        h = self.a(x).view(2, 3, 6)  # (batch, tokens, channels)
        if self.call == "positional":
            n = torch.norm(h, 2, 1, True)
        elif self.call == "keywords":
            n = torch.norm(h, p=2, dim=1, keepdim=True)
        elif self.call == "vector_norm":
            n = torch.linalg.vector_norm(h, 2, 1, True)
        else:
            n = h.norm(2, 1, keepdim=True)
        return self.b(h / n).sum(1)


@pytest.mark.parametrize("call", ["positional", "keywords", "vector_norm", "method"])
def test_reduction_reads_dim_by_name_not_position(call):
    """Argument 1 of norm is p (2): read as a dim it would say the channel axis 2 is reduced, a
    wrong spec. By name, the token axis 1 is reduced and the channels pass through."""
    spec = discover_checked(NormOver(call), torch.randn(6, 3))
    assert spec.num_free == 6
    assert group_of(spec, "a.weight").size == 6


def test_a_failing_rule_fixes_what_it_touches(monkeypatch):
    """A rule that raises (here a broken layer-norm rule) does not crash discovery: the node's
    inputs, output and the module's parameters are fixed with the rule's failure as reason."""
    from graphrepair.discovery.rules import registry

    def broken(ctx):
        raise IndexError("tuple index out of range")

    patched = [(types, broken if nn.LayerNorm in types else rule) for types, rule in registry.MODULE_RULES]
    monkeypatch.setattr(registry, "MODULE_RULES", patched)
    import graphrepair.discovery.rules as rules
    monkeypatch.setattr(rules, "MODULE_RULES", patched)
    m = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = discover_checked(m, torch.randn(2, 3))
    assert spec.num_free == 4  # only the group after the broken node
    reasons = [f.reason for f in spec.fixed if not f.structural]
    assert any("cannot handle node" in r and "tuple index out of range" in r for r in reasons)
    norm_w = [f for f in spec.fixed if f.name == "1.weight"]
    assert norm_w and "cannot handle" in norm_w[0].reason


def test_axes_of_different_sizes_are_a_rejection_not_a_crash():
    """A functional call whose weight does not match the rule's reading (a weight stored
    transposed for F.linear with a square input) makes the solver meet axes of different sizes:
    the node is fixed with the reason."""
    from graphrepair.discovery.solver import AxisError, AxisSolver

    solver = AxisSolver()
    with pytest.raises(AxisError, match="sizes differ"):
        solver.unify(solver.fresh(3), solver.fresh(4), "test")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.w = nn.Parameter(torch.randn(4, 5))

        def forward(self, x):
            return torch.mm(self.a(x), self.w)

    from graphrepair.discovery.rules import layers
    original = layers._matmul

    def mismatched(ctx, a, b):  # a rule that unifies the wrong axes
        ctx.unify(ctx.axes(a)[-1], ctx.axes(b)[-1])
        return original(ctx, a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "_matmul", mismatched)
        spec = discover_checked(Odd(), torch.randn(2, 3))
    assert spec.num_free == 0
    assert any("sizes differ" in f.reason for f in spec.fixed)


def test_grouped_query_attention_moves_query_heads_with_their_key_value_head():
    class GQA(nn.Module):
        def __init__(self, heads=4, kv_heads=2, dim=3):
            super().__init__()
            self.h, self.kv, self.d = heads, kv_heads, dim
            self.q = nn.Linear(12, heads * dim)
            self.k = nn.Linear(12, kv_heads * dim)
            self.v = nn.Linear(12, kv_heads * dim)
            self.o = nn.Linear(heads * dim, 12)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
            k = self.k(x).view(b, t, self.kv, self.d).transpose(1, 2)
            v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(b, t, self.h * self.d)) + x

    spec = discover_checked(GQA(), torch.randn(2, 5, 12))
    sizes = sorted(g.size for g in spec.groups)
    # key/value heads (2), the query heads inside each group (2), q/k dims (3), v dims (3)
    assert sizes == [2, 2, 3, 3]


def stochastic_depth(x, p: float, mode: str, training: bool = True):
    """A stand-in with torchvision's signature and semantics (torchvision is optional here)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")  # as torchvision does: a call_function node in the trace


class DropPathBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.f, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + stochastic_depth(torch.relu(self.f(h)), 0.1, "row", self.training)
        return self.out(h)


@pytest.mark.parametrize("where, free", [("torchvision.ops.stochastic_depth", 6),  # the stream
                                         ("my_project.layers", 0)])
def test_stochastic_depth_lets_the_residual_stream_move(monkeypatch, where, free):
    """torchvision's ``stochastic_depth`` (fx-wrapped, so a call_function node) is the identity in
    eval and a per-sample scale in training: channels follow it. A function of the same name from
    another module is not trusted: it fixes what it touches."""
    monkeypatch.setattr(stochastic_depth, "__module__", where)
    spec = discover_checked(DropPathBlock(), torch.randn(4, 3))
    assert spec.num_free == free
    if free == 0:
        assert any("my_project.layers.stochastic_depth" in f.reason for f in spec.fixed)


# --------------------------------------------------------------------------------------------
# Tensors outside the state dict (regression)


class RelativePositionBias(nn.Module):
    """maxvit-style: a non-persistent buffer of coordinates read by an MLP whose output is added to
    the attention-like logits."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.randn(49, 5), persistent=False)
        self.fc1 = nn.Linear(5, 16)
        self.fc2 = nn.Linear(16, 4)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):  # (B, 49, 8)
        return self.proj(x) + self.fc2(F.relu(self.fc1(self.coords)))


def test_non_persistent_buffer_axes_are_fixed_and_the_spec_holds():
    m = RelativePositionBias()
    spec = discover_checked(m, torch.randn(2, 49, 8))
    assert group_of(spec, "fc1.weight", 1) is None  # the buffer's columns cannot move
    assert group_of(spec, "fc1.weight", 0).size == 16  # the hidden units still can
    assert any(f.name == "coords" and "not in the state dict" in f.reason for f in spec.fixed)
    for seed in range(4):
        spec.check(m, torch.randn(2, 49, 8), seed=seed)


class _ListedLayers(nn.Module):
    """Its only hidden layer in a plain list (a common slip): no state dict holds it, and tracing
    falls back to torch.export, which calls its weights ``lifted_tensor_N``."""

    def __init__(self, listed: bool = True):
        super().__init__()
        self.layers = [nn.Linear(8, 16), nn.Linear(16, 4)]
        self.register_buffer("shift", torch.linspace(0, 1, 16), persistent=False)
        self.scale = torch.full((4,), 2.0)  # a tensor attribute

    def forward(self, x):
        return self.layers[1](F.relu(self.layers[0](x) + self.shift)) * self.scale


def test_tensors_in_no_state_dict_are_named_as_the_model_holds_them():
    """What discovery fixes because no state dict holds it is named by the model's own path to it
    (``layers[0].weight``, ``shift``, ``scale``), not by the tracer's name, with what to do about
    a layer in a plain list; a merge refuses the model saying so."""
    torch.manual_seed(0)
    m, x = _ListedLayers(), torch.randn(2, 8)
    spec = gr.discover(m, x)
    reasons = " | ".join(f.reason for f in spec.fixed)
    assert "lifted_tensor" not in reasons and "_tensor_constant" not in reasons
    for name in ("layers[0].weight", "layers[0].bias", "layers[1].weight"):
        assert (f"'{name}' is in a plain list or dict (no state dict holds it): register it with nn.ModuleList, "
                f"nn.ModuleDict or nn.ParameterList to merge it") in reasons
    assert "'shift' is not in the state dict (a buffer registered with persistent=False)" in reasons
    assert "'scale' is not in the state dict (a tensor attribute)" in reasons
    with pytest.raises(gr.NoGroupsError, match=r"'layers\[0\]\.weight' is in a plain list or dict .*register "
                                               r"it with nn\.ModuleList, nn\.ModuleDict or nn\.ParameterList"):
        gr.merge(m, _ListedLayers(), torch.randn(32, 8))


# --------------------------------------------------------------------------------------------
# Stochastic depth / drop path: identity in eval, a per-sample scale in training (regression)


class ResidualMLP(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
                                    for _ in range(2))
        self.drops = nn.ModuleList(drop(0.1) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for block, drop in zip(self.blocks, self.drops):
            x = x + drop(block(x))
        return self.head(x)


def _residual_stream(spec):
    g = group_of(spec, "stem.weight")
    assert g is not None and "residual" in g.joins
    assert {("head.weight", 1), ("blocks.1.3.weight", 0)} <= {(m.name, m.axis) for m in g.params}
    return g


def test_torchvision_stochastic_depth_if_installed():
    try:
        from torchvision.ops import StochasticDepth as TVStochasticDepth
    except Exception:  # noqa: BLE001 - not installed, or its operators do not load with this torch
        pytest.skip("torchvision is not importable")
    spec = discover_checked(ResidualMLP(lambda p: TVStochasticDepth(p, "row")), torch.randn(3, 6))
    _residual_stream(spec)


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin_attention_and_patch_merging_keep_the_stream_free(version):
    """torchvision's Swin calls fx-wrapped functions (``shifted_window_attention``,
    ``_patch_merging_pad``) that the trace keeps whole; their rules free the residual stream
    (swin_t: 17,664 -> 27,936 free channels), the head dims and the MLPs, and the check holds with
    random weights, stochastic depth and the v2 cosine attention included."""
    try:
        from fixtures.torchvision_compat import import_torchvision
        import_torchvision()
    except Exception:  # noqa: BLE001 - not installed, or its operators do not load with this torch
        pytest.skip("torchvision is not importable")
    from torchvision.models import swin_transformer as st

    extra = {} if version == 1 else {"block": st.SwinTransformerBlockV2, "downsample_layer": st.PatchMergingV2}
    torch.manual_seed(0)
    model = st.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                               window_size=[2, 2], stochastic_depth_prob=0.2, num_classes=5, **extra)
    spec = discover_checked(model, torch.randn(2, 3, 32, 32))
    stream = group_of(spec, "features.0.0.weight")  # the patch embedding's channels: stage 1's stream
    assert stream is not None and stream.size == 16
    assert ("features.1.1.attn.proj.weight", 0) in {(m.name, m.axis) for m in stream.params}
    assert ("features.2.reduction.weight", 1) in {(m.name, m.axis) for m in stream.params}  # kron(4, C)
    assert group_of(spec, "features.1.0.mlp.0.weight") is not None  # the MLP's hidden channels
    qkv = [g for g in spec.groups if any(m.name == "features.1.0.attn.qkv.weight" and m.axis == 0
                                         for m in g.params)]
    assert sorted(g.size for g in qkv) == [8] * 4  # per head: q/k dims and v dims, 2 heads


class EinsumAttention(nn.Module):
    def __init__(self, eq_scores: str, eq_mix: str):
        super().__init__()
        self.eqs = eq_scores, eq_mix
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):  # (B, T, 6)
        s = torch.einsum(self.eqs[0], self.q(x), self.k(x)).softmax(-1)
        return self.out(torch.einsum(self.eqs[1], s, self.v(x)).swapaxes(1, 2).swapaxes(1, 2))


@pytest.mark.parametrize("eqs, free", [
    (("bid,bjd->bij", "bij,bjd->bid"), True),
    (("B I D, B J D -> B I J", "B I J, B J D -> B I D"), True),  # spaces, capitals (torchvision's MaxViT)
    (("...id,...jd->...ij", "...ij,...jd->...id"), False),  # ellipsis: not read, fixed
], ids=["explicit", "spaced", "ellipsis"])
def test_einsum_attention_and_swapaxes(eqs, free):
    """einsum: every axis of one letter shares a permutation (q and k's features cancel in the
    contraction, v's pass to the output); swapaxes reads axis0/axis1 (torchvision's MaxViT
    lost its stream to both)."""
    spec = discover_checked(EinsumAttention(*eqs), torch.randn(2, 5, 6))
    qk, v = group_of(spec, "q.weight"), group_of(spec, "v.weight")
    if free:
        assert qk is not None and qk is group_of(spec, "k.weight") and qk.size == 8
        assert v is not None and ("out.weight", 1) in {(m.name, m.axis) for m in v.params}
    else:
        assert qk is None and v is None
        assert any("einsum" in f.reason for f in spec.fixed)


class EinsumLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # implicit output: the letters that occur once, alphabetical: "ik"
        return self.fc(torch.relu(torch.einsum("ij,kj", x, self.w)))


def test_einsum_with_an_implicit_output():
    spec = discover_checked(EinsumLinear(), torch.randn(4, 6))
    g = group_of(spec, "w")
    assert g is not None and g.size == 8 and ("fc.weight", 1) in {(m.name, m.axis) for m in g.params}


# --------------------------------------------------------------------------------------------
# Op arguments by name: positional and keyword calls mean the same (regression)


class Reduce(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):  # x (B, 5, 4): reduce the 5 positions, keep the 8 channels
        h = torch.tanh(self.fc1(x))
        return self.fc2(self.how(h))


@pytest.mark.parametrize("how", [
    lambda h: h.norm(2, 1),  # argument 1 is p, not dim
    lambda h: torch.norm(h, 2, 1),
    lambda h: h.norm(p=2, dim=1),
    lambda h: torch.linalg.vector_norm(h, 2, 1),  # argument 1 is ord
    lambda h: torch.linalg.vector_norm(h, ord=2, dim=1),
    lambda h: h.sum(1),
    lambda h: torch.sum(h, dim=1),
    lambda h: h.std(1),
    lambda h: torch.transpose(h, dim0=1, dim1=2).mean(-1),  # keyword dims
    lambda h: torch.roll(h, 2, 1).mean(1),  # argument 1 is the shift
    lambda h: torch.topk(h, 2, 1).values.mean(1),  # argument 1 is k
], ids=["method_norm", "torch_norm", "norm_kw", "vector_norm", "vector_norm_kw", "sum", "sum_kw", "std",
        "transpose_kw", "roll", "topk"])
def test_reductions_read_dim_by_name(how):
    spec = discover_checked(Reduce(how), torch.randn(3, 5, 4))
    g = group_of(spec, "fc1.weight")
    assert g is not None and g.size == 8 and ("fc2.weight", 1) in {(m.name, m.axis) for m in g.params}


def test_roll_over_channels_fixes_them():
    spec = discover_checked(Reduce(lambda h: torch.roll(h, 1, 2).mean(1)), torch.randn(3, 5, 4))
    assert group_of(spec, "fc1.weight") is None


def test_std_with_a_bool_reduces_everything():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h / h.std(True))  # std(unbiased: bool) has no dim

    spec = discover_checked(M(), torch.randn(3, 4))
    assert group_of(spec, "fc.weight").size == 8


# --------------------------------------------------------------------------------------------
# An op its rule cannot handle fixes its axes with the reason; discovery goes on (regression)


class SharedMemoryAttention(nn.Module):
    """Attention over one memory shared by the batch: key and value broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x, mem):  # x (B, T, 8), mem (1, S, 8)
        q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
        k, v = self.kv(mem).unflatten(-1, (2, 8)).transpose(1, 2).chunk(2, -1)
        h = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return self.head(torch.relu(self.fc(h)))


def test_a_rule_that_cannot_handle_an_op_fixes_its_axes():
    m = SharedMemoryAttention()
    spec = discover_checked(m, torch.randn(3, 5, 8), torch.randn(1, 6, 8))
    reasons = [f.reason for f in spec.fixed if f.name == "o.weight" and f.axis == 1]
    assert reasons and "cannot handle" in reasons[0] and "scaled_dot_product_attention" in reasons[0]
    assert group_of(spec, "fc.weight").size == 6  # the rest of the graph is still understood


def test_a_failing_rule_is_recorded_not_raised(monkeypatch):
    def broken(ctx):
        raise ValueError("boom")

    monkeypatch.setitem(rules.RULES, "tanh", broken)
    spec = discover_checked(ZeroHead(), torch.randn(4, 6))
    assert not spec.groups
    assert any("boom" in f.reason and "tanh" in f.reason for f in spec.fixed)


def _three_linears() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("kind", ["pre-hook", "hook"])
def test_a_module_with_forward_hooks_fixes_its_axes_naming_them(kind):
    """A traced graph calls a module hooks and all; a hook that scales the channels changes what
    the module computes. Before: Linear's rule alone, and the merge's proof reported "a discovery
    bug". A module without hooks keeps its groups."""
    torch.manual_seed(0)
    net = _three_linears()
    scale = torch.linspace(0.5, 2.0, 16)

    def scaled_input(module, args):
        return (args[0] * scale,)

    def scaled_output(module, args, out):
        return out * scale

    handle = (net[2].register_forward_pre_hook(scaled_input) if kind == "pre-hook"
              else net[2].register_forward_hook(scaled_output))
    x = torch.randn(4, 8)
    spec = discover_checked(net, x)
    assert group_of(spec, "0.weight", 0) is None and group_of(spec, "2.weight", 0) is None
    hook = "scaled_input" if kind == "pre-hook" else "scaled_output"
    assert any(f"module '2' has forward hooks (test_a_module_with_forward_hooks_fixes_its_axes_naming_them."
               f"<locals>.{hook})" in f.reason and "handle.remove()" in f.reason for f in spec.fixed)
    handle.remove()
    spec = gr.discover(net, x, reuse_spec=False)
    assert group_of(spec, "0.weight", 0) is not None and group_of(spec, "2.weight", 0) is not None


def test_a_quantization_aware_linear_is_not_read_as_a_linear():
    """torch.ao.nn.qat's Linear subclasses nn.Linear and fake-quantizes its weight with a scale per
    output channel (a buffer no rule links to the channels). Before: Linear's rule, and the merge's
    proof reported "a discovery bug". torch.nn's own subclasses keep their base's rule."""
    from torch.ao import quantization as tq

    torch.manual_seed(0)
    net = _three_linears().train()
    net.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(net, inplace=True)
    x = torch.randn(32, 8)
    net(x)
    net.apply(tq.disable_observer)  # (observing, each forward moves the scales: no two calls agree)
    spec = discover_checked(net.eval(), x)
    assert spec.num_free == 0
    assert any("is a torch.ao.nn.qat.modules.linear.Linear, a Linear with a forward of its own" in f.reason
               for f in spec.fixed)
    sync = nn.Sequential(nn.Linear(8, 16), nn.SyncBatchNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    assert group_of(discover_checked(sync, x), "1.weight", 0) is not None


@pytest.mark.parametrize("op", ["tril", "triu", "tril_"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_triangular_mask_of_a_weight_fixes_the_weights_axes(op, tracer):
    """``w.tril()`` in the forward (an autoregressive layer's mask) keeps entries by their row and
    column: permuting either axis of ``w`` changes what comes out. Before: tril/triu were read as
    constants made from nothing, their output fixed and their input left free, and the proof
    failed ("a discovery bug"). The layer before keeps its group only through the other path."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x):
            if tracer == "export":
                if int(x.shape[-1]) < 0:  # symbolic_trace fails on a Python int of a shape
                    raise ValueError("never")
            w = self.w.clone().tril_() if op == "tril_" else getattr(torch, op)(self.w)
            h = torch.relu(self.a(x))
            return self.b(torch.relu(F.linear(h, w)) + h)

    x = torch.randn(4, 8)
    spec = discover_checked(Masked(), x)
    assert spec.traced.kind == tracer
    assert spec.num_free == 0
    assert any(f"{op} depends on the positions along axis" in f.reason for f in spec.fixed), \
        [f.reason for f in spec.fixed]
    # the same mask on an activation, of a square map: fixed there too, not a crash
    spec = discover_checked(nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)), nn.ReLU()), x)
    assert spec.num_free == 0


@pytest.mark.parametrize("kind", ["pre-hook", "hook"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_forward_hooks_registered_for_every_module_fix_the_modules_axes(kind, tracer):
    """``register_module_forward_hook`` / ``_pre_hook`` hook every module call, those of a traced
    graph included. Before: the rules alone, and the proof reported "a discovery bug"; a spec
    discovered before the hook was registered was reused after it. Removed, the groups are back."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            if tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
                raise ValueError("never")
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    scale = torch.linspace(0.5, 2.0, 16)

    def scaled_input(module, args):
        return (args[0] * scale,) if isinstance(module, nn.Linear) and args[0].shape[-1] == 16 else None

    def scaled_output(module, args, out):
        return out * scale if isinstance(module, nn.Linear) and out.shape[-1] == 16 else None

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 8)
    assert gr.discover(net, x).num_free == 32  # (kept for reuse)
    register = (nn.modules.module.register_module_forward_pre_hook if kind == "pre-hook"
                else nn.modules.module.register_module_forward_hook)
    handle = register(scaled_input if kind == "pre-hook" else scaled_output)
    try:
        spec = gr.discover(net, x)
        spec.check(net, x)
        assert spec.traced.kind == tracer
        if tracer == "fx":  # (torch.export runs the hooks into its graph: the rules read them there)
            hook = "scaled_input" if kind == "pre-hook" else "scaled_output"
            assert spec.num_free == 0
            assert any("forward hooks registered for every module" in f.reason and hook in f.reason
                       and "handle.remove()" in f.reason for f in spec.fixed), [f.reason for f in spec.fixed]
    finally:
        handle.remove()
    assert gr.discover(net, x).num_free == 32


class _EncoderClassifier(nn.Module):
    """Token embedding, torch.nn's TransformerEncoder (eval: its fused fast path), a linear head."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_nn_transformer_layers_are_traced_through(norm_first):
    """torch.nn's own modules are leaves of a symbolic trace, and no rule reads
    nn.TransformerEncoder: every channel of such a model was fixed ("no rule for module
    TransformerEncoder"). Traced through, its layers' attention, feed-forward and the residual
    stream with its LayerNorms move, and a merge comes back in the class. A decoder layer too."""
    tokens = torch.randint(0, 40, (8, 6))
    spec = discover_checked(_EncoderClassifier(norm_first).eval(), tokens)
    # (traced through, the encoder's ``src.is_nested`` stops symbolic tracing: torch.export traces it)
    assert spec.traced.kind == "export" and "control flow" in spec.traced.fx_error
    assert not any("TransformerEncoder" in f.reason for f in spec.fixed)
    for i in range(2):
        assert group_of(spec, f"encoder.layers.{i}.linear1.weight", 0).size == 32
    stream = group_of(spec, "embed.weight", 1)
    assert stream is not None and stream.size == 16
    assert any(m.name == "encoder.layers.1.norm2.weight" for m in stream.params)
    torch.manual_seed(1)
    a, b = _EncoderClassifier(norm_first).eval(), _EncoderClassifier(norm_first).eval()
    merged = gr.merge(a, b, torch.randint(0, 40, (64, 6)))
    assert isinstance(merged, _EncoderClassifier) and torch.isfinite(merged(tokens)).all()

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.layer(x, x))

    spec = discover_checked(Decoder(), torch.randn(4, 6, 16))
    assert not any("TransformerDecoderLayer" in f.reason for f in spec.fixed)
    assert group_of(spec, "layer.linear1.weight", 0).size == 32


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_an_index_tensor_stored_as_a_buffer_keeps_its_order(tracer):
    """``h[:, self.ids]`` with ``ids`` a buffer: the index's positions order the output's columns,
    which come out fixed. Before: ``ids``' own axis was left free, a group of its own, and permuting
    it reordered the columns the next layer reads (the proof: "a discovery bug")."""

    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
            self.register_buffer("ids", torch.arange(16).roll(5))

        def forward(self, x):
            if tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
                raise ValueError("never")
            return self.b(torch.relu(self.a(x))[:, self.ids])

    spec = discover_checked(Picked(), torch.randn(4, 8))
    assert spec.traced.kind == tracer
    assert spec.num_free == 0
    assert any(f.reason.startswith("index tensor of node") for f in spec.fixed), [f.reason for f in spec.fixed]


@pytest.mark.parametrize("op", ["cosine_similarity", "pairwise_distance", "cdist"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_similarities_over_the_channels_let_them_move(op, tracer):
    """cosine_similarity / pairwise_distance of two branches and cdist to learned prototypes
    reduce over the features: invariant under a permutation both inputs carry. Before: no rule,
    every axis they touch fixed. cdist's prototypes move too, with the layer that reads the
    distances."""

    class Similar(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
            self.prototypes = nn.Parameter(torch.randn(5, 16))
            self.head = nn.Linear(5 if op == "cdist" else 1, 3)

        def forward(self, x):
            if tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
                raise ValueError("never")
            u, v = torch.relu(self.a(x)), torch.relu(self.b(x))
            if op == "cdist":
                return self.head(torch.cdist(u, self.prototypes))
            d = F.cosine_similarity(u, v, dim=1) if op == "cosine_similarity" else F.pairwise_distance(u, v)
            return self.head(d[:, None])

    spec = discover_checked(Similar(), torch.randn(6, 8))
    assert spec.traced.kind == tracer
    features = group_of(spec, "a.weight", 0)
    assert features is not None and features.size == 16
    if op == "cdist":
        assert group_of(spec, "prototypes", 1) is features
        assert group_of(spec, "prototypes", 0).size == 5 and group_of(spec, "head.weight", 1).size == 5
    else:
        assert group_of(spec, "b.weight", 0) is features


@pytest.mark.parametrize("op", ["F.glu", "nn.GLU", "F.normalize"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_gated_units_and_normalize_let_channels_move(op, tracer):
    """glu gates one half of the channels by the other: both halves carry the output's
    permutation. F.normalize divides by the norm along the channels: equivariant. Before: no rule
    for glu, nn.GLU or normalize under symbolic tracing, every axis they touched fixed."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 32 if "glu" in op.lower() else 16), nn.Linear(16, 4)
            self.gate = nn.GLU(-1)

        def forward(self, x):
            if tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
                raise ValueError("never")
            h = self.a(x)
            h = {"F.glu": lambda: F.glu(h, -1), "nn.GLU": lambda: self.gate(h),
                 "F.normalize": lambda: F.normalize(torch.relu(h), dim=1)}[op]()
            return self.b(h)

    spec = discover_checked(Gated(), torch.randn(6, 8))
    assert spec.traced.kind == tracer
    g = group_of(spec, "b.weight", 1)
    assert g is not None and g.size == 16
    if op != "F.normalize":  # the two halves of a's outputs move alike
        assert len([m for m in g.params if m.name == "a.weight"]) == 1 and spec.num_free == 16
    else:
        assert group_of(spec, "a.weight", 0) is g


class _RepeatedKV(nn.Module):
    """Grouped-query attention whose key/value heads are repeated for their query heads with
    ``repeat_interleave`` (8 query heads, 2 key/value heads, head dim 4)."""

    def __init__(self, tracer: str):
        super().__init__()
        self.tracer = tracer
        self.emb, self.head = nn.Linear(6, 32), nn.Linear(32, 3)
        self.q, self.k, self.v, self.o = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8), nn.Linear(32, 32)

    def forward(self, x):
        if self.tracer == "export" and int(x.shape[-1]) < 0:  # symbolic_trace fails on it
            raise ValueError("never")
        z = self.emb(x)
        b, t, _ = z.shape
        q = self.q(z).view(b, t, 8, 4).transpose(1, 2)
        k = self.k(z).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)
        v = self.v(z).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(4, dim=1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 32)
        return self.head((z + self.o(y)).mean(1))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_repeat_interleave_repeats_each_position_as_one(tracer):
    """repeat_interleave(r, dim) makes r copies of each position in a row: the key/value heads
    move, each with the query heads it serves, and so do the head dims. Before: no rule, and
    attention's heads and head dims were all fixed. Repeats given per position stay fixed."""
    spec = discover_checked(_RepeatedKV(tracer), torch.randn(4, 5, 6))
    assert spec.traced.kind == tracer
    kv_heads = group_of(spec, "k.weight", 0)
    assert kv_heads is not None and sorted(g.size for g in spec.groups) == [2, 4, 4, 32]
    assert group_of(spec, "q.weight", 0) is not None and group_of(spec, "v.weight", 0) is not None

    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)
            self.register_buffer("r", torch.tensor([1, 3, 2, 2]))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).repeat_interleave(self.r, dim=-1))

    assert discover_checked(PerPosition(), torch.randn(4, 8)).num_free == 0


def test_a_transformer_model_torch_export_cannot_trace_keeps_its_layers_whole(monkeypatch):
    """Where torch.export fails on a model holding nn.TransformerEncoder, symbolic tracing keeps
    the encoder whole as before (its channels fixed, "no rule"), the rest is discovered, and the
    trace's notes say why."""
    from graphrepair.discovery import trace as tr

    def fails(model, inputs):
        raise RuntimeError("export says no")

    monkeypatch.setattr(tr, "_export", fails)
    tokens = torch.randint(0, 40, (8, 6))
    spec = discover_checked(_EncoderClassifier(), tokens)
    assert spec.traced.kind == "fx"
    assert any("torch.export failed (RuntimeError: export says no): traced with torch.nn's transformer "
               "layers kept whole" in n for n in spec.traced.notes)
    assert any("no rule for module TransformerEncoder" in f.reason for f in spec.fixed)
    with pytest.raises(gr.TraceError, match="export says no"):  # a model without such layers: as before
        gr.trace(_RepeatedKV("export"), torch.randn(4, 5, 6))


class _Bags(nn.Module):
    """A recommender's pooled embeddings (nn.EmbeddingBag, and F.embedding_bag with per-sample
    weights) feeding an MLP."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.bag = nn.EmbeddingBag(50, 12, mode="mean")
        self.table = nn.Parameter(torch.randn(50, 12))
        self.fc = nn.Linear(12, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        if self.functional:
            pooled = F.embedding_bag(ids, self.table, per_sample_weights=torch.ones(ids.shape) * 0.5, mode="sum")
        else:
            pooled = self.bag(ids)
        return self.out(torch.relu(self.fc(torch.relu(pooled))))


class _Bilinear(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 8)
        self.bil = nn.Bilinear(16, 8, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h1, h2 = torch.relu(self.a(x)), torch.tanh(self.b(x))
        y = F.bilinear(h1, h2, self.bil.weight, self.bil.bias) if self.functional else self.bil(h1, h2)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("functional", [False, True])
def test_embedding_bags_and_bilinear_layers_move_their_channels(functional):
    """Before: "no rule for module EmbeddingBag / Bilinear", every axis around them fixed (a model
    built on them had no group at all). An embedding bag's dim axis moves as an embedding's, a
    bilinear layer reads each input's channels on its own weight axis; the proofs hold."""
    bags = _Bags(functional)
    spec = discover_checked(bags, torch.randint(0, 50, (4, 5)))
    table = "table" if functional else "bag.weight"
    assert group_of(spec, table, 1).size == 12 and group_of(spec, table, 0) is None
    assert group_of(spec, table, 1) is group_of(spec, "fc.weight", 1)
    bil = _Bilinear(functional)
    spec = discover_checked(bil, torch.randn(4, 6))
    assert group_of(spec, "bil.weight", 1) is group_of(spec, "a.weight", 0)
    assert group_of(spec, "bil.weight", 2) is group_of(spec, "b.weight", 0)
    assert group_of(spec, "bil.weight", 0) is group_of(spec, "out.weight", 1)
    assert group_of(spec, "bil.bias", 0) is group_of(spec, "bil.weight", 0)
    assert sorted(g.size for g in spec.groups) == [8, 10, 16]
    torch.manual_seed(1)
    other = _Bilinear(functional).eval()
    x = torch.randn(256, 6)
    merged = gr.merge(bil, other, x, num_examples=256)
    assert type(merged) is _Bilinear and torch.isfinite(merged(x)).all()


class _Recurrent(nn.Module):
    """A feature layer, a recurrent layer, a head on its last step (or on its final state)."""

    def __init__(self, cell: nn.Module, state: bool = False):
        super().__init__()
        self.inp, self.rnn, self.state = nn.Linear(6, 16), cell, state
        width = cell.hidden_size * (1 if state else 2 if cell.bidirectional else 1)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h, last = self.rnn(torch.relu(self.inp(x)))
        if self.state:
            return self.out((last[0] if isinstance(last, tuple) else last)[-1])
        return self.out(h[:, -1] if self.rnn.batch_first else h[-1])


@pytest.mark.parametrize("make, cells", [
    (lambda: nn.LSTM(16, 12, num_layers=2, bidirectional=True, batch_first=True), ["l0", "l0_reverse", "l1", "l1_reverse"]),
    (lambda: nn.GRU(16, 12, num_layers=2), ["l0", "l1"]),
    (lambda: nn.RNN(16, 12, bidirectional=True, nonlinearity="relu", batch_first=True), ["l0", "l0_reverse"]),
])
def test_recurrent_layers_move_each_cells_units(make, cells):
    """Before: "no rule for module LSTM" fixed every axis around it, the layer feeding it too (a
    recurrent model had no group). Each layer and direction's hidden units move with all its gates'
    rows, its recurrent weight's columns and the next layer's input columns; the proofs hold."""
    model = _Recurrent(make())
    x = torch.randn(4, 7, 6) if model.rnn.batch_first else torch.randn(7, 4, 6)
    spec = discover_checked(model, x)
    units = [group_of(spec, f"rnn.weight_hh_{c}", 1) for c in cells]
    assert all(g is not None and g.size == 12 for g in units) and len({g.name for g in units}) == len(cells)
    for c, g in zip(cells, units):
        assert group_of(spec, f"rnn.weight_ih_{c}", 0) is g and group_of(spec, f"rnn.bias_hh_{c}", 0) is g
    assert group_of(spec, "rnn.weight_ih_l0", 1) is group_of(spec, "inp.weight", 0)  # the layer feeding it moves
    assert group_of(spec, "out.weight", 1).name in {g.name for g in units[-2:]}  # the head reads the last layer


def test_a_recurrent_layers_final_state_carries_its_units_only_when_it_has_one_cell():
    """h_n holds every layer and direction along one axis: read from a one-layer LSTM it carries
    that cell's units; read from a two-layer one the layer stays fixed, saying why."""
    one = discover_checked(_Recurrent(nn.LSTM(16, 12, batch_first=True), state=True), torch.randn(4, 7, 6))
    assert group_of(one, "out.weight", 1) is group_of(one, "rnn.weight_hh_l0", 1) is not None
    two = gr.discover(_Recurrent(nn.LSTM(16, 12, num_layers=2, batch_first=True), state=True), torch.randn(4, 7, 6))
    assert two.groups == () or all(group_of(two, f"rnn.weight_hh_l{k}", 1) is None for k in (0, 1))
    assert any("the final state of LSTM at node 'rnn'" in f.reason for f in two.fixed)


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_recurrent_models_merge_into_their_class(method):
    torch.manual_seed(0)
    a = _Recurrent(nn.LSTM(16, 12, num_layers=2, batch_first=True)).eval()
    torch.manual_seed(1)
    b = _Recurrent(nn.LSTM(16, 12, num_layers=2, batch_first=True)).eval()
    x = torch.randn(512, 7, 6)
    merged = gr.merge(a, b, x, method=method, num_examples=512)
    assert type(merged) is _Recurrent and torch.isfinite(merged(x)).all()
    # the features feeding the LSTM are observed where it reads them (its input weights mix them)
    from graphrepair.merging.points import observation_points

    spec = gr.discover(a, x[:2])
    assert [p.node for p in observation_points(spec)[group_of(spec, "inp.weight", 0).name]] == ["relu"]
    same = gr.merge(a, b, x, method=method, num_examples=512, alpha=0.0, repair=None)
    torch.testing.assert_close(same(x), a(x))


@pytest.mark.parametrize("make, conv", [
    (lambda: nn.Threshold(0.1, -1.0), False), (lambda: nn.Hardshrink(0.3), False), (lambda: nn.Softshrink(0.3), False),
    (lambda: nn.RReLU(), False), (lambda: nn.Softmax2d(), True), (lambda: nn.LPPool2d(2, 2), True),
    (lambda: nn.LPPool1d(3, 2), "1d"),
])
def test_channelwise_modules_let_their_channels_move(make, conv):
    """Before: "no rule for module Threshold" (and Hardshrink, Softshrink, RReLU, Softmax2d,
    LPPool): every channel around them fixed. Each acts channel by channel (Softmax2d normalises
    over the channels, which permuting them reorders alike); the proofs hold."""
    if conv == "1d":
        model, x = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), make(), nn.Conv1d(8, 4, 1)), torch.randn(4, 3, 12)
    elif conv:
        model, x = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(), nn.Conv2d(8, 4, 1)), torch.randn(4, 3, 8, 8)
    else:
        model, x = nn.Sequential(nn.Linear(8, 16), make(), nn.Linear(16, 4)), torch.randn(4, 8)
    spec = discover_checked(model, x)
    assert spec.num_free == (8 if conv else 16)
    assert group_of(spec, "0.weight", 0) is group_of(spec, "2.weight", 1)


class _SubPixel(nn.Module):
    """ESPCN-style upsampling (a conv to C r^2 channels, PixelShuffle) and its inverse."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(3, 8 * 4, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6 * 4, 2, 1)

    def forward(self, x):
        if self.functional:
            up = F.pixel_shuffle(torch.relu(self.a(x)), 2)
            return self.c(F.pixel_unshuffle(torch.relu(self.b(up)), 2))
        up = nn.PixelShuffle(2)(torch.relu(self.a(x)))
        return self.c(nn.PixelUnshuffle(2)(torch.relu(self.b(up))))


@pytest.mark.parametrize("functional", [False, True])
def test_pixel_shuffles_move_whole_blocks_of_sub_pixels(functional):
    """Before: "no rule" fixed the channels on both sides. A pixel shuffle's input channels are
    blocks of r^2 sub-pixels of one output channel: the blocks move with that channel."""
    spec = discover_checked(_SubPixel(functional), torch.randn(2, 3, 6, 6))
    a, b = group_of(spec, "a.weight", 0), group_of(spec, "b.weight", 0)
    assert a.size == 8 and b.size == 6
    assert group_of(spec, "b.weight", 1) is a and group_of(spec, "c.weight", 1) is b


class _Sampled(nn.Module):
    """A spatial transformer's sampling (F.grid_sample on a grid from the network) and a soft
    split (nn.Unfold, as T2T-ViT tokenises) folded back (nn.Fold / F.fold)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.loc = nn.Linear(3 * 8 * 8, 6)
        self.b = nn.Conv2d(8, 5, 1)
        self.mix = nn.Linear(5 * 9, 5 * 9)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        theta = self.loc(x.flatten(1)).view(-1, 2, 3) * 0.1 + torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
        h = F.grid_sample(torch.relu(self.a(x)), F.affine_grid(theta, (x.shape[0], 8, 8, 8), align_corners=False),
                          align_corners=False)
        h = torch.relu(self.b(h))
        cols = F.unfold(h, 3, padding=1) if self.functional else nn.Unfold(3, padding=1)(h)
        cols = self.mix(cols.transpose(1, 2)).transpose(1, 2)
        back = F.fold(cols, (8, 8), 3, padding=1) if self.functional else nn.Fold((8, 8), 3, padding=1)(cols)
        return self.c(back)


@pytest.mark.parametrize("functional", [False, True])
def test_grid_sampling_and_unfold_fold_let_channels_move(functional):
    """Before: "no rule for grid_sampler / unfold / fold" fixed the channels around them. Grid
    sampling passes channels through; unfold's rows are kron(channels, kernel positions), fold's
    input the same; the proofs hold."""
    spec = discover_checked(_Sampled(functional), torch.randn(2, 3, 8, 8))
    assert group_of(spec, "a.weight", 0).size == 8 and group_of(spec, "b.weight", 1) is group_of(spec, "a.weight", 0)
    assert group_of(spec, "mix.weight", 1) is group_of(spec, "b.weight", 0)  # kron(b's channels, 9 positions)
    assert group_of(spec, "c.weight", 1) is group_of(spec, "mix.weight", 0)
    assert group_of(spec, "loc.weight", 0) is None  # the grid's parameters mean places


def test_tensor_unfold_is_a_sliding_window_not_im2col():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    spec = gr.discover(_Windowed(m), torch.randn(2, 10, 4))
    spec.check(_Windowed(m), torch.randn(2, 10, 4))


class _Windowed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.out = inner, nn.Linear(6 * 3, 2)

    def forward(self, x):  # (B, T, 4) -> windows of 3 steps along T
        h = self.inner(x).unfold(1, 3, 1)  # (B, T-2, 6, 3)
        return self.out(h.flatten(2))


_SHIFT = torch.linspace(-1, 1, 16)  # a module-level tensor: no model holds it


class _ReadsAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + _SHIFT) + torch.zeros(16).fill_(0.5))


def test_constants_no_model_holds_are_said_to_come_from_the_forward():
    """A tensor the forward reads from outside the model, or makes itself, is the graph's constant
    (``_tensor_constant0``): the reason says where such a tensor comes from, not that it may be a
    non-persistent buffer or a tensor attribute (those are named by their own paths)."""
    spec = gr.discover(_ReadsAGlobal(), torch.randn(2, 4))
    reasons = {f.reason for f in spec.fixed if "_tensor_constant" in f.reason}
    assert reasons and all("is not in the state dict (a tensor the forward makes, or reads from outside the "
                           "model): permutations and merges cannot carry it" in r for r in reasons)
