"""passes.fold_affine: folding apply-mode resets / ChannelAffine into their producer.

Parameterised over layer type (Linear, Conv1d/2d, ConvTranspose2d, BatchNorm), bias, groups and
graph form: call_module (symbolic_trace), ATen (torch.export), decomposed ATen
(run_decompositions: addmm/mm, convolution, tuple-returning batch norm).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes import (
    ChannelAffine,
    PassError,
    Reset,
    ResetSpec,
    fold_affines,
    refold,
    insert_resets,
    producer_kind,
    resets,
    set_mode,
)
from tests.helpers import Head, graph_of, random_bn

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

HOWS = ["fx", "aten", "aten_decomposed"]


def with_reset(gm, node_name: str, dim: int, channels: int, x: torch.Tensor, seed: int = 0):
    """gm with an apply-mode reset after ``node_name``, statistics collected on two batches."""
    g = torch.Generator().manual_seed(seed)
    spec = ResetSpec(dim, torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5)
    out = insert_resets(gm, {node_name: spec}).graph_module
    for k in range(2):
        out(x + 0.1 * k)
    set_mode(out, "apply")
    return out


def last_producer(gm) -> str:
    return [n.name for n in gm.graph.nodes if producer_kind(gm, n) is not None][-1]


def affine_modules(gm):
    return [m for m in gm.modules() if isinstance(m, (Reset, ChannelAffine))]


# (id, model factory(bias, groups), input shape, reset dim, channels)
CASES = [
    ("linear", lambda bias, g: Head(nn.Linear(6, 8, bias=bias)), (4, 6), -1, 8),
    ("linear3d", lambda bias, g: Head(nn.Linear(6, 8, bias=bias)), (4, 5, 6), -1, 8),
    ("conv1d", lambda bias, g: Head(nn.Conv1d(4, 6, 3, groups=g, bias=bias)), (3, 4, 9), 1, 6),
    ("conv2d", lambda bias, g: Head(nn.Conv2d(4, 6, 3, groups=g, bias=bias)), (3, 4, 7, 7), 1, 6),
    (
        "conv_transpose2d",
        lambda bias, g: Head(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=g, bias=bias)),
        (3, 4, 5, 5),
        1,
        6,
    ),
    ("batchnorm2d", lambda bias, g: Head(nn.Conv2d(4, 6, 3, groups=g, bias=bias), random_bn(6)), (3, 4, 7, 7), 1, 6),
]


GROUPED = [(c, g) for c in CASES for g in (1, 2) if not (g == 2 and c[0].startswith("linear"))]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case,groups", GROUPED, ids=[f"{c[0]}-groups{g}" for c, g in GROUPED])
def test_fold_equals_unfolded(case, groups, bias, how):
    name, factory, shape, dim, channels = case
    torch.manual_seed(0)
    model = factory(bias, groups)
    x = torch.randn(*shape)
    traced = graph_of(model, x, how)
    gm = with_reset(traced, last_producer(traced), dim, channels, x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    expected = gm(x)

    result = fold_affines(gm)
    folded = result.graph_module

    # structural: the reset is gone, nothing kept, the input module untouched
    assert result.counts == {"folded": 1, "kept": 0}, result.notes
    assert result.modified
    assert affine_modules(folded) == []
    assert not any(n.op == "call_module" and "_gr_reset" in str(n.target) for n in folded.graph.nodes)
    assert len(affine_modules(gm)) == 1
    for k, v in gm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # state_dict keys: the original model's, plus a bias where one had to be created
    keys = {k for k in folded.state_dict()}
    original = {k for k in gm.state_dict() if not k.startswith("_gr_reset")}
    created = keys - original
    assert original <= keys
    if name == "batchnorm2d" or bias:
        assert created == set(), created
    else:
        assert len(created) == 1 and any("created parameter" in n for n in result.notes)
    if name == "batchnorm2d":  # folded into the BN: the conv is untouched
        for k in folded.state_dict():
            if "weight" in k and folded.state_dict()[k].ndim == 4:
                torch.testing.assert_close(folded.state_dict()[k], before[k], rtol=0, atol=0)
    # numeric
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.tanh(y) + y


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_conv_with_two_users_is_kept_with_a_reason(how):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    gm = graph_of(TwoUsers(), x, how)
    conv = last_producer(gm)
    gm = with_reset(gm, conv, 1, 3, x)
    expected = gm(x)
    # the reset now reads the conv and feeds both users; add a second direct user of the conv
    reset_node = next(n for n in gm.graph.nodes if n.op == "call_module" and "_gr_reset" in str(n.target))
    conv_node = reset_node.args[0]
    with gm.graph.inserting_after(reset_node):
        extra = gm.graph.call_function(torch.mul, (conv_node, 0.0))
    out_node = next(iter(reversed(gm.graph.nodes)))
    with gm.graph.inserting_before(out_node):
        total = gm.graph.call_function(torch.add, (out_node.args[0][0] if how != "fx" else out_node.args[0], extra))
    if how == "fx":
        out_node.args = (total,)
    else:
        out_node.args = ((total,),)
    gm.recompile()

    result = fold_affines(gm)
    kept = result.graph_module
    assert result.counts == {"folded": 0, "kept": 1}
    assert len(result.notes) == 1 and result.notes[0].startswith(f"{reset_node.name}: ")
    assert "2 users" in result.notes[0]
    assert [type(m) for m in affine_modules(kept)] == [ChannelAffine]
    torch.testing.assert_close(kept(x), expected, rtol=1e-5, atol=1e-5)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


class Computed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.tanh(F.linear(x, self.w * 2))


class WrongAxis(nn.Module):
    """Linear on (N, 4, 4): channels on the last axis, the reset normalises axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.a(x))


class Identity(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


NEGATIVE = [
    ("tied", Tied, (3, 4), -1, "a", "tied"),
    ("called_twice", Twice, (3, 4), -1, "a", "called 2 times"),
    ("computed_weight", Computed, (3, 4), -1, "linear", "computed by"),
    ("wrong_axis", WrongAxis, (3, 4, 4), 1, "a", "on axis 2"),
    ("graph_input", Identity, (3, 4), -1, "x", "graph input"),
]


@pytest.mark.parametrize("case", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_unfoldable_resets_are_kept_as_channel_affines(case):
    _, cls, shape, dim, node, reason = case
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = cls()
    gm = with_reset(torch.fx.symbolic_trace(model), node, dim, 4, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = gm(x)
    result = fold_affines(gm)
    assert result.counts == {"folded": 0, "kept": 1}
    assert reason in result.notes[0], result.notes
    assert [type(m) for m in affine_modules(result.graph_module)] == [ChannelAffine]
    for k, v in result.graph_module.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_tied_weights_are_refused_in_aten_graphs_too():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    gm = graph_of(Tied(), x, "aten")
    first = [n.name for n in gm.graph.nodes if producer_kind(gm, n) == "linear"][0]
    result = fold_affines(with_reset(gm, first, -1, 4, x))
    # torch.export deduplicates the tied parameter: one get_attr node read by both linears
    assert result.counts == {"folded": 0, "kept": 1}
    assert "'b.weight' is read by 2 ops" in result.notes[0], result.notes


class Residual(nn.Module):
    def __init__(self, project: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = random_bn(4)
        self.short = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), random_bn(4)) if project else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.short(x))


@pytest.mark.parametrize("how", HOWS)
def test_reset_after_add_of_two_batchnorms_folds_into_both(how):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    gm = graph_of(Residual(project=True), x, how)
    add = next(n.name for n in gm.graph.nodes if "add" in n.name)
    gm = with_reset(gm, add, 1, 4, x)
    expected = gm(x)
    result = fold_affines(gm)
    assert result.counts == {"folded": 1, "kept": 0}, result.notes
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_reset_after_identity_shortcut_is_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    gm = with_reset(torch.fx.symbolic_trace(Residual(project=False)), "add", 1, 4, x)
    expected = gm(x)
    result = fold_affines(gm)
    assert result.counts == {"folded": 0, "kept": 1}
    assert "add" in result.notes[0] and "short is not produced" in result.notes[0]
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_chain_of_affines_and_inplace():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    model = Head(nn.Linear(6, 8))
    gm = torch.fx.symbolic_trace(model)
    gm = with_reset(gm, "body_0", -1, 8, x)
    reset_node = next(n for n in gm.graph.nodes if n.op == "call_module" and "_gr_reset" in str(n.target))
    second = ChannelAffine(torch.rand(8) + 0.5, torch.randn(8), dim=-1)
    from passes import insert_module_after

    insert_module_after(gm, reset_node, second, "_gr_affine")
    gm.recompile()
    expected = gm(x)
    result = fold_affines(gm, inplace=True)
    assert result.graph_module is gm
    assert result.counts == {"folded": 2, "kept": 0}
    assert affine_modules(gm) == []
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_rank_from_example_inputs_when_the_reset_never_saw_data():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    gm = torch.fx.symbolic_trace(Head(nn.Linear(6, 8)))
    gm = insert_resets(gm, {"body_0": ResetSpec(1, torch.zeros(8), torch.ones(8))}).graph_module
    resets(gm)["body_0"].set_running(torch.randn(8), torch.rand(8) + 0.5)
    set_mode(gm, "apply")
    expected = gm(x)
    unknown = fold_affines(gm)
    assert unknown.counts == {"folded": 0, "kept": 1} and "rank is" in unknown.notes[0]
    known = fold_affines(gm, example_inputs=(x,))
    assert known.counts == {"folded": 1, "kept": 0}
    torch.testing.assert_close(known.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_collect_mode_reset_is_an_error():
    gm = torch.fx.symbolic_trace(Head(nn.Linear(6, 8)))
    gm = insert_resets(gm, {"body_0": ResetSpec(-1, torch.zeros(8), torch.ones(8))}).graph_module
    with pytest.raises(PassError, match="collect mode.*set_mode"):
        fold_affines(gm)


class Functional(nn.Module):
    """Parameters used through torch.nn.functional: get_attr weights under symbolic_trace."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 1))  # conv1d without bias
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)  # batch norm without beta
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w2 = nn.Parameter(torch.randn(5, 4))
        self.b2 = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = torch.tanh(F.conv1d(x, self.w1))
        y = torch.tanh(F.batch_norm(y, self.rm, self.rv, self.gamma, None, False))
        return torch.tanh(F.linear(y.mean(-1), self.w2, self.b2))


def test_functional_forms_under_symbolic_trace_fold_and_get_biases():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6)
    gm = torch.fx.symbolic_trace(Functional())
    points = {
        "conv1d": ResetSpec(1, torch.randn(4), torch.rand(4) + 0.5),
        "batch_norm": ResetSpec(1, torch.randn(4), torch.rand(4) + 0.5),
        "linear": ResetSpec(-1, torch.randn(5), torch.rand(5) + 0.5),
    }
    gm = insert_resets(gm, points).graph_module
    gm(x)
    set_mode(gm, "apply")
    expected = gm(x)
    result = fold_affines(gm)
    assert result.counts == {"folded": 3, "kept": 0}, result.notes
    assert sorted(n.split(": ")[1] for n in result.notes) == ["created parameter gamma_bias", "created parameter w1_bias"]
    targets = {n.target for n in result.graph_module.graph.nodes if n.op == "get_attr"}
    assert {"gamma_bias", "w1_bias"} <= targets
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fold_without_recompiling_folds_the_same_and_runs_once_recompiled():
    """``recompile=False``: the parameters and the graph are those of a full fold; the module's
    code is regenerated only by ``gm.recompile()`` (a caller that only reads the parameters)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    gm = with_reset(torch.fx.symbolic_trace(Head(nn.Linear(6, 8))), "body_0", -1, 8, x)
    expected, code = gm(x), gm.code
    full = fold_affines(gm).graph_module
    lazy = fold_affines(gm, recompile=False).graph_module
    assert lazy.code == code and "_gr_reset" in lazy.code  # the old code, not regenerated
    assert str(lazy.graph) == str(full.graph) and affine_modules(lazy) == []
    assert lazy.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in lazy.state_dict().items())
    lazy.recompile()
    assert lazy.code == full.code
    torch.testing.assert_close(lazy(x), expected, rtol=1e-5, atol=1e-5)


def _new_weights(gm, seed: int) -> None:
    """Every parameter of ``gm`` (not its resets' buffers) given other values, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


REFOLD = [(c, g) for c, g in GROUPED] + [("residual_add", 1)]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("case,groups", REFOLD, ids=[f"{c if isinstance(c, str) else c[0]}-groups{g}" for c, g in REFOLD])
def test_refold_plays_the_fold_again_on_new_weights_bit_for_bit(case, groups, how):
    """``fold_affines(steps=...)`` records what it rewrote; ``refold`` on the unfolded graph, its
    weights and statistics changed since, gives the parameters a fold of it gives now, exactly,
    and leaves the graph as it is (the reset stays, the code runs it)."""
    torch.manual_seed(0)
    if case == "residual_add":  # one affine folded into both inputs of an add (the shift into one)
        shape, dim, channels = (2, 4, 5, 5), 1, 4
        x = torch.randn(*shape)
        traced = graph_of(Residual(project=True), x, how)
        point = next(n.name for n in traced.graph.nodes if "add" in n.name)
    else:
        name, factory, shape, dim, channels = case
        x = torch.randn(*shape)
        traced = graph_of(factory(True, groups), x, how)
        point = last_producer(traced)
    gm = with_reset(traced, point, dim, channels, x)
    steps = []
    first = fold_affines(gm, steps=steps)
    assert first.counts == {"folded": 1, "kept": 0} and len(steps) == 1
    path, producers = steps[0]
    assert isinstance(gm.get_submodule(path), Reset)
    assert len(producers) == (2 if case == "residual_add" else 1)
    assert sum(p.shifted for p in producers) == 1  # an add's shift goes to one input only

    _new_weights(gm, seed=1)  # another merge's weights and statistics, on the same graph
    (reset,) = resets(gm).values()
    set_mode(gm, "collect")
    reset.reset_stats()
    gm(x * 2.0 + 0.5)
    set_mode(gm, "apply")
    expected = fold_affines(gm).graph_module.state_dict()  # a fold made now (on a copy)
    code, nodes = gm.code, len(gm.graph.nodes)
    assert refold(gm, steps)
    got = gm.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert gm.code == code and len(gm.graph.nodes) == nodes and resets(gm)


def test_refold_declines_a_shift_for_a_producer_without_bias():
    """A scale-only reset folds into a bias-free linear without creating a bias; asked to fold
    a shift there later, ``refold`` changes nothing and says so (``fold_affines`` must create it)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    traced = graph_of(Head(nn.Linear(6, 8, bias=False)), x, "fx")
    gm = with_reset(traced, last_producer(traced), -1, 8, x)
    (reset,) = resets(gm).values()
    reset.scale_only = True
    steps = []
    assert fold_affines(gm, steps=steps).counts == {"folded": 1, "kept": 0} and len(steps) == 1
    reset.scale_only = False  # a shift now
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert not refold(gm, steps)
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    steps = []  # and a fold that creates a bias records nothing to play again
    result = fold_affines(gm, steps=steps)
    assert any("created parameter" in n for n in result.notes) and steps == []
