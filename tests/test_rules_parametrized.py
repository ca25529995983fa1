"""Parametrised weights (weight norm, spectral norm, any ``register_parametrization``): discovery
permutes the originals a weight is computed from when the parametrisation is known to commute
with permutations, and fixes the axes with the reason otherwise. Three ways each: structural (the
groups hold the originals), numeric (random permutations keep the function, state-dict keys
stay), negative (an unknown parametrisation, or a grouped conv's per-group axis under the norm,
is never freed). The aten ``_weight_norm`` rule (torch.export's form) likewise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as pz
from torch.nn.utils import parametrize

import graphrepair as gr
from tests.helpers import discover_checked, group_of


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class Net(nn.Module):
    """conv -> relu -> (parametrised) conv -> relu -> mean -> (parametrised) linear -> tanh -> linear."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.l1 = nn.Linear(8, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        return self.l2(torch.tanh(self.l1(h)))


KNOWN = {
    "weight_norm": lambda m: pz.weight_norm(m),
    "weight_norm_dim1": lambda m: pz.weight_norm(m, dim=1),
    "weight_norm_whole": lambda m: pz.weight_norm(m, dim=None),
    "legacy_weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "spectral_norm": lambda m: pz.spectral_norm(m),
    "legacy_spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
}

ORIGINALS = {  # state-dict keys of a parametrised ``weight`` (the ones of its value, in order)
    "weight_norm": ("parametrizations.weight.original1",),
    "weight_norm_dim1": ("parametrizations.weight.original1",),
    "weight_norm_whole": ("parametrizations.weight.original1",),
    "legacy_weight_norm": ("weight_v",),
    "spectral_norm": ("parametrizations.weight.original",),
    "legacy_spectral_norm": ("weight_orig",),
}


def build(kind: str, groups: int = 1) -> Net:
    torch.manual_seed(0)
    net = Net(groups)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm's deprecation
        for m in (net.c2, net.l1):
            KNOWN[kind](m) if kind in KNOWN else parametrize.register_parametrization(m, "weight", Double())
    return net


X = torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("kind", list(KNOWN))
def test_known_parametrisations_move_their_originals(kind):
    net = build(kind)
    spec = discover_checked(net, X)  # random permutations of every group keep the output
    (v,) = ORIGINALS[kind]
    # c1's output channels move c2's input axis of the original, c2's output its output axis
    g1, g2 = group_of(spec, "c1.weight", 0), group_of(spec, f"c2.{v}", 0)
    assert g1 is not None and g1.size == 8 and (f"c2.{v}", 1) in {(m.name, m.axis) for m in g1.params}
    assert g2 is not None and g2.size == 8 and (f"l1.{v}", 1) in {(m.name, m.axis) for m in g2.params}
    g3 = group_of(spec, f"l1.{v}", 0)
    assert g3 is not None and g3.size == 6 and ("l2.weight", 1) in {(m.name, m.axis) for m in g3.params}
    assert spec.num_free == 8 + 8 + 6
    # the norm's other tensors move along: g on dim 0, spectral norm's u (rows) and v (the rest)
    names = {(m.name, m.axis) for m in g2.params}
    if kind == "weight_norm":
        assert ("c2.parametrizations.weight.original0", 0) in names
    if kind == "legacy_weight_norm":
        assert ("c2.weight_g", 0) in names
    if kind == "spectral_norm":
        assert ("c2.parametrizations.weight.0._u", 0) in names
        assert ("c2.parametrizations.weight.0._v", 0) in {(m.name, m.axis) for m in g1.params}
    if kind == "legacy_spectral_norm":
        assert ("c2.weight_u", 0) in names and ("c2.weight_v", 0) in {(m.name, m.axis) for m in g1.params}


@pytest.mark.parametrize("kind", list(KNOWN))
def test_permuted_parametrised_model_keeps_keys_and_function(kind):
    net = build(kind).eval()
    spec = gr.discover(net, X)
    perms = spec.random_permutations(seed=3)
    moved = gr.permute(net, spec, perms)
    assert list(moved.state_dict()) == list(net.state_dict())
    (v,) = ORIGINALS[kind]
    assert not torch.equal(moved.state_dict()[f"c2.{v}"], net.state_dict()[f"c2.{v}"])  # it did move
    with torch.no_grad():
        torch.testing.assert_close(moved(X), net(X), rtol=1e-5, atol=1e-5)
    assert type(moved.c2) is type(net.c2)


def test_unknown_parametrisation_fixes_its_axes_with_the_reason():
    net = build("double")
    spec = discover_checked(net, X)
    assert group_of(spec, "c1.weight", 0) is None  # c2 reads c1's channels through 2 * w
    assert group_of(spec, "c2.bias", 0) is None and group_of(spec, "l1.bias", 0) is None
    reasons = {f.name: f.reason for f in spec.fixed}
    assert "Double" in reasons["c2.parametrizations.weight.original"]
    assert "not known to commute" in reasons["c2.parametrizations.weight.original"]
    assert spec.num_free == 0


def test_weight_norm_over_a_grouped_convs_per_group_axis_is_fixed():
    """Weight norm over dim 1 of a grouped conv: dim 1 is the per-group axis, whose permutation
    depends on the row; not known to commute, so fixed. Over dim 0 the groups stay free."""
    torch.manual_seed(0)
    net = Net(groups=2)
    pz.weight_norm(net.c2, dim=1)
    spec = discover_checked(net, X)
    assert any("grouped convolution" in f.reason for f in spec.fixed)
    assert group_of(spec, "c2.parametrizations.weight.original1", 1) is None
    net = Net(groups=2)
    pz.weight_norm(net.c2, dim=0)
    spec = discover_checked(net, X)
    assert group_of(spec, "c2.parametrizations.weight.original1", 0) is not None


def test_spectral_norm_of_a_grouped_conv_is_fixed():
    net = Net(groups=2)
    pz.spectral_norm(net.c2)
    spec = discover_checked(net, X)
    assert group_of(spec, "c2.parametrizations.weight.original", 0) is None
    assert any("spectral_norm" in f.reason for f in spec.fixed)


def test_a_merge_with_every_axis_fixed_by_an_unknown_parametrisation_is_refused_with_the_reason():
    """A parametrisation not known to commute with permutations (w -> 2w) fixes its axes; with no
    group left, the merge is refused (NoGroupsError, as the CLI does) naming the parametrisation."""
    net = build("double").eval()
    with pytest.raises(gr.NoGroupsError, match=r"computed by the parametrisation Double"):
        gr.merge(net, build("double").eval(), torch.randn(64, 3, 6, 6), repair=None)


@pytest.mark.parametrize("kind, repair", [(k, r) for k in KNOWN for r in (None, "exact")])
def test_merge_with_a_permuted_copy_of_itself_is_the_model(kind, repair):
    """A merge of a parametrised model with a permuted copy of itself is the model, in its class
    with its state-dict keys (before, every merge failed with "This is a discovery bug")."""
    import warnings
    net = build(kind).eval()
    spec = gr.discover(net, X)
    other = gr.permute(net, spec, spec.random_permutations(seed=1))
    data = torch.randn(64, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = gr.merge(net, other, data, repair=repair)
    if repair is None:
        assert type(merged) is Net and list(merged.state_dict()) == list(net.state_dict())
    # exact REPAIR: a reset after a parametrised layer cannot be folded into its computed weight;
    # it stays (the merged graph), the function is the same
    with torch.no_grad():
        torch.testing.assert_close(merged(X), net(X), rtol=1e-4, atol=1e-4)


# -- the aten form (torch.export's graph) ------------------------------------------------------


class PosConv(nn.Module):
    """Wav2Vec2's positional convolution, small: a grouped Conv1d with weight norm over the kernel
    axis (dim 2), between two linear layers."""

    def __init__(self, dim: int = 2, groups: int = 4):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, groups=groups)
        pz.weight_norm(self.conv, dim=dim)
        self.out = nn.Linear(16, 2)

    def forward(self, x):  # x: (batch, time, 5)
        h = torch.relu(self.inp(x)).transpose(1, 2)
        h = torch.nn.functional.gelu(self.conv(h)).transpose(1, 2)
        return self.out(h)


class Untraceable(PosConv):
    """Python control flow on a shape: symbolic tracing fails, discovery reads torch.export's graph,
    where the weight is ``aten._weight_norm(original1, original0, dim)``."""

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError("(batch, time, features)")
        return super().forward(x)


def _checked(model: nn.Module, x: torch.Tensor, form: str):
    if form == "aten":
        model.__class__ = Untraceable
    spec = discover_checked(model, x)
    if form == "aten":
        assert spec.traced.kind == "export"
        assert any(getattr(n.target, "__name__", "").startswith("_weight_norm") for n in spec.traced.gm.graph.nodes)
    return spec


@pytest.mark.parametrize("form", ["module", "aten"])
def test_weight_norm_over_the_kernel_axis_of_a_grouped_conv(form):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    spec = _checked(PosConv(), x, form)
    # the grouped conv's input groups move (whole groups, and inside each), through the weight's axis 1
    inside = [g for g in spec.groups if any((m.name, m.axis) == ("conv.parametrizations.weight.original1", 1)
                                            for m in g.params)]
    # module form: each of the 4 input groups on its own; torch.export's form reads the conv weight
    # through the norm's output node, where a per-group axis is confined to one shared permutation
    # (discover._confine_per_block): one group of 4 moving inside every input group alike
    assert len(inside) == (4 if form == "module" else 1) and all(g.size == 4 for g in inside)
    out = group_of(spec, "conv.parametrizations.weight.original1", 0)
    assert out is not None and ("out.weight", 1) in {(m.name, m.axis) for m in out.params}
    assert group_of(spec, "conv.parametrizations.weight.original0", 2) is None  # the kernel axis


@pytest.mark.parametrize("form", ["module", "aten"])
def test_weight_norm_over_dim_1_of_a_conv_weight_is_not_freed_there(form):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    spec = _checked(PosConv(dim=1), x, form)
    assert group_of(spec, "conv.parametrizations.weight.original1", 1) is None
    assert group_of(spec, "inp.weight", 0) is None


def test_weight_norm_interface_returns_the_norms_axes():
    """``aten._weight_norm_interface`` (weight, norms): the weight keeps v's axes, the norms g's."""

    class Interface(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.v = nn.Parameter(torch.randn(6, 6))
            self.g = nn.Parameter(torch.rand(6, 1) + 0.5)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            w, norms = torch._weight_norm_interface(self.v, self.g, 0)
            return self.b(torch.tanh(torch.nn.functional.linear(torch.relu(self.a(x)), w))) + norms.sum()

    spec = discover_checked(Interface(), torch.randn(3, 4))
    g = group_of(spec, "v", 0)  # the norms are only summed: their axis moves with v's rows and g
    assert g is not None and {("g", 0), ("b.weight", 1)} <= {(m.name, m.axis) for m in g.params}
    g = group_of(spec, "a.weight", 0)
    assert g is not None and ("v", 1) in {(m.name, m.axis) for m in g.params}


@pytest.mark.parametrize("twice", [False, True])
def test_a_pruned_weight_is_fixed_saying_how_to_make_it_permanent(twice):
    """torch.nn.utils.prune keeps ``weight_orig`` and ``weight_mask`` and makes ``weight`` in a
    forward pre-hook. Before, ``c2.weight`` (in no state dict) took free axes while its originals,
    read by no node, were fixed apart: the permutation moved c1 and c2's bias but not c2's weight,
    and the merge's proof stopped it as "a discovery bug". The other groups stay free; with the
    pruning made permanent, c2's groups are free again."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = Net()
    prune.l1_unstructured(net.c2, "weight", amount=0.5)
    if twice:  # a PruningContainer
        prune.random_unstructured(net.c2, "weight", amount=0.2)
    spec = discover_checked(net, X)
    for key in ("c2.weight_orig", "c2.weight_mask"):
        assert group_of(spec, key, 0) is None and group_of(spec, key, 1) is None
    assert group_of(spec, "c1.weight", 0) is None and group_of(spec, "c2.bias", 0) is None
    assert group_of(spec, "l1.weight", 0) is not None  # l1 -> tanh -> l2: not pruned, free
    reasons = {f.name: f.reason for f in spec.fixed}
    assert "'c2.weight' is pruned (torch.nn.utils.prune" in reasons["c2.weight_orig"]
    assert "torch.nn.utils.prune.remove(module, 'weight')" in reasons["c2.weight_orig"]
    prune.remove(net.c2, "weight")
    spec = discover_checked(net, X)
    assert group_of(spec, "c2.weight", 0) is not None and group_of(spec, "c2.weight", 1) is not None


class Attribute(nn.Module):
    """A linear layer whose weight is a plain tensor attribute made from a buffer (in no state dict
    under the name the rule reads)."""

    def __init__(self):
        super().__init__()
        self.c1, self.lin, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.lin.register_buffer("stored", self.lin.weight.detach().clone())
        del self.lin.weight
        self.lin.weight = 1.5 * self.lin.stored

    def forward(self, x):
        return self.out(torch.relu(self.lin(torch.relu(self.c1(x)))))


def test_a_module_tensor_in_no_state_dict_fixes_its_axes():
    net = Attribute()
    x = torch.randn(3, 4)
    spec = discover_checked(net, x)
    assert group_of(spec, "lin.bias", 0) is None and group_of(spec, "c1.bias", 0) is None
    assert any("'lin.weight' is not in the state dict" in f.reason for f in spec.fixed)
