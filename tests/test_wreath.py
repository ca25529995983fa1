"""Whole groups of channels moving (``axes.Wreath``): a grouped conv's groups and a GroupNorm's
groups move as wholes, each reordered inside. Discovery proves it, and both matchers find it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.discovery import axes as ax
from graphrepair.merging import stats as stats_module
from graphrepair.merging.activation_match import wreath_perms
from graphrepair.merging.weight_match import weight_matching
from graphrepair.merging.merge import prepare
from tests.helpers import discover_checked, inverse_perms, randomize_
from tests.test_rules import grouped


class GroupNormNet(nn.Module):
    """Two convs, each followed by a GroupNorm of 4 groups, a residual stream between them."""

    def __init__(self, c: int = 16, groups: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.n1 = nn.GroupNorm(groups, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.n2 = nn.GroupNorm(groups, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        h = torch.relu(self.n1(self.stem(x)))
        h = h + torch.relu(self.n2(self.conv(h)))
        return self.head(h.mean((2, 3)))


def _gn_net(seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    m = randomize_(GroupNormNet(), seed=seed).eval()
    return m


def test_group_norm_stream_is_one_wreath_family():
    m = _gn_net()
    spec = discover_checked(m, torch.randn(2, 3, 8, 8))
    families, held = spec.wreaths
    assert not held and len(families) == 1
    (fam,) = families.values()
    assert spec.group(fam.order).size == 4 and fam.slots == (4,)
    assert spec.num_free == 16 + 4
    # a random permutation that moves whole groups changes the weights and not the function
    perms = spec.random_permutations(seed=3)
    assert not torch.equal(perms[fam.order], torch.arange(4))
    moved = gr.permute(m, spec, perms)
    assert not torch.equal(moved.n1.weight, m.n1.weight)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["group norm", "grouped conv", "grouped transposed conv"])
@pytest.mark.parametrize("method", ["activation", "weight"])
def test_matchers_recover_a_permutation_that_moves_whole_groups(model, method):
    """B is A with random permutations of every group (orders included): both matchers find the
    permutations that undo them, so B permuted back is A exactly."""
    if model == "group norm":
        a, x = _gn_net(), torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    else:
        torch.manual_seed(0)
        a = randomize_(grouped(4, model.endswith("transposed conv"), c=16).eval(), seed=2)
        x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    spec = gr.discover(a, x[:2])
    families, _ = spec.wreaths
    assert families
    truth = spec.random_permutations(seed=4)
    assert all(not torch.equal(truth[o], torch.arange(len(truth[o]))) for o in families)
    b = gr.permute(a, spec, truth)
    if method == "activation":
        perms = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec).perms[0]
    else:
        perms = weight_matching(spec, a.state_dict(), b.state_dict())
    undo = inverse_perms(spec, truth)
    for g in undo:
        assert torch.equal(perms[g], undo[g]), g
    back = gr.permute(b, spec, perms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


class _Stats:
    def __init__(self, joint):
        self.joint, self.wreath = joint, {}


def test_two_level_assignment_is_the_best_over_all_orders_and_parts():
    """On random correlations, the order and parts ``wreath_perms`` picks reach the largest summed
    correlation sum_L sum_i C_L[i, idx_L(i)] over every order and every permutation inside every
    slot of both layouts (a grouped conv's input and output groups), found by enumeration."""
    model = grouped(3, c=6)  # 3 groups of 2: 3! orders, (2!)^3 parts per layout
    spec = discover_checked(model, torch.randn(2, 3, 4, 4))
    families, _ = spec.wreaths
    (fam,) = families.values()
    assert len(fam.parts) == 2
    exprs = {}
    for node, es in spec.node_axes.items():
        for e in es:
            if isinstance(e, ax.Wreath):
                exprs[tuple(p.id for p in e.parts)] = e
    assert len(exprs) == 2
    gen = torch.Generator().manual_seed(7)
    for trial in range(5):
        joint = {f"n{i}": stats_module.JointPoint(e, torch.rand(6, 6, generator=gen, dtype=torch.float64) * 2 - 1,
                                                  torch.ones(6))
                 for i, e in enumerate(exprs.values())}
        stats = _Stats(joint)

        def value(perms):
            vp = {spec.var_of_group[k]: v for k, v in perms.items()}
            return sum(float(jp.corr[torch.arange(6), ax.index(jp.expr, vp)].sum()) for jp in joint.values())

        got = value(wreath_perms(spec, stats))
        names = [n for key in fam.parts for n in key]
        best = max(value({fam.order: torch.tensor(o), **{n: torch.tensor(p) for n, p in zip(names, ps)}})
                   for o in itertools.permutations(range(3))
                   for ps in itertools.product(itertools.permutations(range(2)), repeat=len(names)))
        assert got == pytest.approx(best, abs=1e-4), trial  # the rounding grid: 2^-17 per term
        # keeping the groups in place (the order the identity) can only be worse or equal
        fixed = max(value({fam.order: torch.arange(3), **{n: torch.tensor(p) for n, p in zip(names, ps)}})
                    for ps in itertools.product(itertools.permutations(range(2)), repeat=len(names)))
        assert got >= fixed - 1e-4


def test_groups_too_large_to_measure_jointly_keep_their_places(monkeypatch):
    """Where a family's joint space exceeds JOINT_MAX its order stays the identity, a note says
    so, and the channels inside each group are still aligned: a permuted copy whose groups did
    not move is recovered exactly."""
    monkeypatch.setattr(stats_module, "JOINT_MAX", 8)  # the stream has 16 positions
    a = _gn_net()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = gr.discover(a, x[:2])
    (order,) = spec.wreaths[0]
    truth = spec.random_permutations(seed=4)
    truth[order] = torch.arange(4)
    b = gr.permute(a, spec, truth)
    prep = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec)
    assert any("whole groups of channels" in n and "keep their places" in n for n in prep.stats[0].notes)
    assert torch.equal(prep.perms[0][order], torch.arange(4))
    back = gr.permute(b, spec, prep.perms[0])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["grouped_conv_net", "shufflenet_block", "groupnorm_cnn", "resnet20_bn",
                                  "mobilenetv2_tiny"])
def test_inverse_undoes_random_permutations(name):
    """``PermutationSpec.inverse``: permuting by random permutations and then by their inverse
    gives back every parameter (a Wreath's parts are re-indexed by the inverse order)."""
    from fixtures.zoo import ZOO

    entry = ZOO[name]
    torch.manual_seed(0)
    model = randomize_(entry.factory().eval(), seed=1)
    spec = gr.discover(model, entry.example_inputs())
    perms = spec.random_permutations(seed=5)
    moved = gr.permute(model, spec, perms)
    back = gr.permute(moved, spec, spec.inverse(perms))
    changed = 0
    for k, v in model.state_dict().items():
        changed += not torch.equal(moved.state_dict()[k], v)
        assert torch.equal(back.state_dict()[k], v), k
    assert changed > 0
    families, _ = spec.wreaths
    # the plain per-group inverse is not the inverse where whole groups moved
    naive = {g: torch.argsort(p) for g, p in perms.items()}
    wrong = gr.permute(moved, spec, naive)
    assert (not families) == all(torch.equal(wrong.state_dict()[k], v) for k, v in model.state_dict().items())


def test_cuda_recovers_whole_groups_like_the_cpu():
    """The joint points on the GPU, the two-level assignment on the CPU: a permuted copy of the
    GroupNorm net on CUDA is recovered exactly, with the CPU's permutations."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import copy

    a = _gn_net()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = gr.discover(a, x[:2])
    truth = spec.random_permutations(seed=4)
    b = gr.permute(a, spec, truth)
    cpu = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec).perms[0]
    gpu = prepare([copy.deepcopy(a).cuda(), copy.deepcopy(b).cuda()], x, num_examples=64, batch_size=32,
                  statistics=False).perms[0]
    undo = inverse_perms(spec, truth)
    for g in undo:
        assert torch.equal(gpu[g].cpu(), undo[g]) and torch.equal(cpu[g], undo[g]), g


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_an_order_group_used_elsewhere_is_kept_in_place(method):
    """A grouped conv whose weight is computed (``w * s``) reads its input groups through one
    shared permutation: the input is kron(order, p), so the order group is not a family of its own
    (``PermutationSpec.wreaths`` holds it). Alignment keeps it at the identity and recovers a
    permuted copy whose groups did not move."""
    from tests.test_rules import SharedPermutation

    torch.manual_seed(0)
    a = randomize_(SharedPermutation("computed weight").eval(), seed=3)
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    spec = gr.discover(a, x[:2])
    families, held = spec.wreaths
    assert not families and len(held) == 1
    (order,) = held
    truth = spec.random_permutations(seed=4)
    truth[order] = torch.arange(spec.group(order).size)
    b = gr.permute(a, spec, truth)
    if method == "activation":
        perms = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec).perms[0]
    else:
        perms = weight_matching(spec, a.state_dict(), b.state_dict())
    assert torch.equal(perms[order], torch.arange(len(perms[order])))
    back = gr.permute(b, spec, perms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_dead_units_inside_moved_groups_are_placed_by_their_weights():
    """Units whose ReLU never fires have no correlation to be matched by; inside a family's slots
    the weights break those ties as they do for any group, their cosines taken against the B slot
    the order puts in place (not B's slot of the same index): permuted copies with three dead units
    in each of two input groups of a grouped conv are recovered exactly, for six random
    permutations, and the merge reports the dead units as matched without signal and placed by
    their weights (none arbitrary)."""
    torch.manual_seed(0)
    a = randomize_(grouped(4, c=16).eval(), seed=2)
    with torch.no_grad():
        a[0].bias[[0, 1, 2, 5, 6, 7]] = -8.0  # dead after the ReLU: slots 0 and 1 of the grouped conv's input
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    spec = gr.discover(a, x[:2])
    for seed in range(6):
        truth = spec.random_permutations(seed=seed)
        b = gr.permute(a, spec, truth)
        prep = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec)
        undo = inverse_perms(spec, truth)
        for g in undo:
            assert torch.equal(prep.perms[0][g], undo[g]), (seed, g)
        st = prep.stats[0]
        dead = {g: n for g, n in st.unsignalled.items() if g.startswith("0[0].") and not g.endswith(".o")}
        assert sum(dead.values()) >= 6, (seed, st.unsignalled)
        assert not any(st.arbitrary.get(g, 0) for g in dead), (seed, st.arbitrary)
