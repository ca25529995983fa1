"""merging.activation_match and merging.weight_match: activation matching (correlation + assignment, joint spaces, grouped convs, the
weights' tie-break) and weight matching; each recovers a permuted copy and keeps B's function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphrepair as gr
from fixtures.zoo import ZOO
from graphrepair.merging.weight_match import weight_matching
from graphrepair.merging.merge import merge_prepared, prepare
from tests.helpers import inverse_perms, outputs, permuted_copy, randomize_


def test_alignment_permutations_keep_b_function(digits_pair, digits_spec):
    (a, b), x, _ = digits_pair
    spec = digits_spec
    perms = gr.align(a, b, x, num_examples=500, spec=spec)
    b2 = gr.permute(b, spec, perms)
    torch.testing.assert_close(outputs(b2, x), outputs(b, x), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())


def test_alignment_raises_correlation(digits_prepared):
    prep = digits_prepared  # 800 examples
    for g, c in prep.mean_corr.items():
        assert c > 0.3, (g, c)
        assert c > float(prep.stats[0].corr[g].diagonal().mean()) + 0.1, g  # the units as they are


def test_align_makes_the_permutations_and_no_permuted_weights(digits_pair, digits_spec, digits_prepared):
    (a, b), x, _ = digits_pair
    prep = prepare([a, b], x, num_examples=800, statistics=False, states=False, spec=digits_spec)
    assert prep.aligned == []
    with pytest.raises(gr.GraphRepairError, match=r"states=True"):
        merge_prepared(prep, [0.5, 0.5], None)
    perms = gr.align(a, b, x, num_examples=800, spec=digits_spec)
    assert perms.keys() == prep.perms[0].keys() == digits_prepared.perms[0].keys()
    for g, p in perms.items():
        assert torch.equal(p, prep.perms[0][g]), g
        assert torch.equal(p, digits_prepared.perms[0][g]), g  # the same as with the permuted weights


def test_align_by_weight_matching_from_data_a_spec_or_example_inputs(digits_pair, digits_spec):
    """Weight matching needs only a trace: data, example inputs or a spec give the same answer,
    which keeps B's function; none of them is a clear error, not a failure inside the tracer."""
    (a, b), x, _ = digits_pair
    spec = digits_spec
    by_data = gr.align(a, b, x, method="weight", num_examples=64)
    by_example = gr.align(a, b, method="weight", example_inputs=(x[:2],))
    by_spec = gr.align(a, b, method="weight", spec=spec)
    assert by_data.keys() == by_example.keys() == by_spec.keys() == {g.name for g in spec.groups}
    for g, p in by_spec.items():
        assert torch.equal(by_data[g], p) and torch.equal(by_example[g], p), g
    assert any(not torch.equal(p, torch.arange(len(p))) for p in by_spec.values())
    torch.testing.assert_close(outputs(gr.permute(b, spec, by_spec), x), outputs(b, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(gr.GraphRepairError, match=r"weight matching needs example_inputs \(or data\)"):
        gr.align(a, b, method="weight")


@pytest.mark.parametrize("name", ["mlp3", "resnet20_bn", "transformer_tiny", "densenet_tiny",
                                  "mobilenetv2_tiny", "grouped_conv_net", "shufflenet_block", "flatten_cnn",
                                  "gpt2_tiny", "bert_tiny", "vit_tiny"])
def test_weight_matching_recovers_a_random_permutation(name):
    if name in ("gpt2_tiny", "bert_tiny", "vit_tiny"):
        pytest.importorskip("transformers")
    _, a, spec, _, b = permuted_copy(name, model_seed=3, perm_seed=7)
    perms = weight_matching(spec, a.state_dict(), b.state_dict())
    back = gr.permute(b, spec, perms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_matching_reads_a_grouped_weight_block_by_block(transposed):
    """The producer's rows are all alike, so only the grouped conv's weight tells its input groups
    apart, each through the rows of its own block (a PerBlock axis): the descent must score every
    group on its block alone to recover the permuted copy."""
    from tests.test_rules import grouped

    torch.manual_seed(0)
    a = randomize_(grouped(4, transposed, c=16).eval(), seed=5)
    with torch.no_grad():
        a[0].weight.copy_(a[0].weight[:1].expand_as(a[0].weight))
        a[0].bias.fill_(0.1)
    x = torch.randn(2, 3, 4, 4)
    spec = gr.discover(a, x)
    spec.check(a, x)
    truth = spec.random_permutations(seed=2)
    b = gr.permute(a, spec, truth)
    assert not torch.equal(b.state_dict()["2.weight"], a.state_dict()["2.weight"])
    back = gr.permute(b, spec, weight_matching(spec, a.state_dict(), b.state_dict()))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["bert_tiny", "vit_tiny"])
def test_activation_matching_recovers_split_heads_of_exported_models(name):
    """Heads and head dims meet in one tensor after the split to heads: their correlations depend
    on each other's permutation and are solved jointly; a permuted copy is recovered exactly."""
    pytest.importorskip("transformers")
    entry, a, spec, truth, b = permuted_copy(name)
    ex = entry.example_inputs()
    shape = (64,) + tuple(ex[0].shape[1:])
    x = torch.randint(0, entry.vocab, shape) if ex[0].dtype == torch.long else torch.randn(shape)
    prep = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec)
    assert len(prep.stats[0].coupled) >= 2
    undo = inverse_perms(spec, truth)
    for g in truth:
        assert torch.equal(prep.perms[0][g], undo[g]), g


@pytest.mark.parametrize("name", ["grouped_conv_net", "shufflenet_block"])
def test_activation_matching_recovers_grouped_convs(name):
    """Each input group of a grouped conv is a group of its own, matched on its block of the
    input's channels; a permuted copy of a ResNeXt (and of a ShuffleNet unit) is recovered exactly.
    The BatchNorm statistics are measured on the data first, so that no ReLU unit is dead (a dead
    unit has no correlation to be matched by)."""
    entry = ZOO[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *entry.input_shape[1:], generator=gen)
    torch.manual_seed(0)
    a = randomize_(entry.factory(), seed=1)
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        a.train()(x)
    a.eval()
    spec = gr.discover(a, entry.example_inputs())
    assert any("per_block" in m.layout for g in spec.groups for m in g.params)
    truth = spec.random_permutations(seed=4)
    b = gr.permute(a, spec, truth)
    prep = prepare([a, b], x, num_examples=64, batch_size=32, statistics=False, spec=spec)
    assert not prep.stats[0].dead
    undo = inverse_perms(spec, truth)
    for g in truth:
        assert torch.equal(prep.perms[0][g], undo[g]), g
    back = gr.permute(b, spec, prep.perms[0])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_export_traced_models_merge_at_any_batch_size():
    """torch.export graphs keep a dynamic batch axis; activation matching recovers a permuted copy
    exactly, heads and the dims inside a head included (groups coupled at split-head nodes are
    solved jointly)."""
    pytest.importorskip("transformers")
    entry, a, spec, truth, b = permuted_copy("gpt2_tiny")  # traced on a batch of 2
    assert spec.traced.kind == "export"
    x = torch.randint(0, entry.vocab, (48, 16))
    prep = prepare([a, b], x, num_examples=48, batch_size=32, statistics=False, spec=spec)
    coupled = {g for g in truth if "attn" in g}  # heads and the dims inside a head
    assert coupled and set(prep.stats[0].coupled) == coupled
    undo = inverse_perms(spec, truth)
    for g in truth:
        assert torch.equal(prep.perms[0][g], undo[g]), g
        assert prep.mean_corr[g] == pytest.approx(1.0, abs=1e-5), g
    res = gr.merge_models([a, b], x, num_examples=48, batch_size=32, spec=spec)
    assert res.resets > 0 and torch.isfinite(res.model(x[:3])["logits"]).all()


# -- units without activation signal ----------------------------------------------------------------

def _inverse(perms):
    return {g: torch.argsort(p) for g, p in perms.items()}


def test_weights_break_the_ties_of_activation_matching():
    """A random-init BatchNorm ResNet20 with dead units (a BatchNorm bias that keeps the ReLU shut:
    all their correlations are 0) merged with a permuted copy of itself. Activation matching alone
    pairs the dead units arbitrarily; with the weights as tie-break every unit is recovered, the
    summed rounded correlation is the same (the tie-break only chooses among the activations'
    optima), and the dead units are counted as matched without activation signal. Two of them are
    made identical in every weight as well: nothing can tell them apart (``arbitrary``)."""
    from fixtures.zoo import resnet20
    from graphrepair.merging.activation_match import activation_perms, tie_safe

    torch.manual_seed(0)
    a = resnet20("bn").eval()
    with torch.no_grad():
        blk = a.blocks[4]
        blk.norm1.bias[:5] = -100.0  # 5 units whose ReLU never fires
        blk.conv1.weight[1] = blk.conv1.weight[0]  # units 0 and 1 identical in every weight
        blk.conv2.weight[:, 1] = blk.conv2.weight[:, 0]
        a.blocks[7].norm1.bias[:3] = -100.0  # 3 more (one unit there is dead at random init)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    spec = gr.discover(a, x[:2])
    truth = spec.random_permutations(seed=3)
    b = gr.permute(a, spec, truth)
    truth = _inverse(truth)  # what aligns B onto A
    prep = prepare([a, b], x, num_examples=48, batch_size=48, statistics=False, states=False)
    found, stats = prep.perms[0], prep.stats[0]
    plain = activation_perms(spec, stats)  # activations alone
    assert {g: int((plain[g] != truth[g]).sum()) for g in truth if (plain[g] != truth[g]).any()} == {
        "blocks.4.conv1": 4, "blocks.7.conv1": 2}
    wrong = {g: (found[g] != truth[g]).nonzero().flatten().tolist() for g in truth}
    assert {g: w for g, w in wrong.items() if w} in ({}, {"blocks.4.conv1": [0, 1]})  # the twins only
    for g, c in stats.corr.items():
        r, rows = tie_safe(c), torch.arange(len(c))
        assert float(r[rows, found[g]].sum()) == float(r[rows, plain[g]].sum())
    assert stats.dead == {"blocks.4.conv1": 5, "blocks.7.conv1": 4}
    assert stats.unsignalled == stats.dead
    assert stats.arbitrary == {"blocks.4.conv1": 2, "blocks.7.conv1": 0}
    res = merge_prepared(prepare([a, b], x, num_examples=48, batch_size=48, statistics=False), [0.5, 0.5], None)
    assert (res.dead_channels, res.unsignalled, res.arbitrary) == (9, 9, 2)
    assert any("9 units matched without activation signal" in n and "placed 7" in n for n in res.notes)


def test_torchvision_mobilenet_v2_permuted_copy_recovered_by_both_methods():
    """Raw torchvision MobileNetV2 (random init, BatchNorm at its constant start: no signal
    there) and a permuted copy: weight matching from the identity stalls in a local optimum (20 of
    its 24 groups wrong before the sorted start); activation matching leaves saturated and dead
    units tied (without the weights' tie-break). Both now recover every unit."""
    tv = pytest.importorskip("torchvision")
    from graphrepair.merging.activation_match import activation_perms

    torch.manual_seed(0)
    a = tv.models.mobilenet_v2(weights=None, width_mult=0.25).eval()
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    spec = gr.discover(a, x[:2])
    truth = spec.random_permutations(seed=3)
    b = gr.permute(a, spec, truth)
    truth = _inverse(truth)
    wm = weight_matching(spec, a.state_dict(), b.state_dict())
    assert all(torch.equal(wm[g], truth[g]) for g in truth)
    prep = prepare([a, b], x, num_examples=16, batch_size=16, statistics=False, states=False)
    assert all(torch.equal(prep.perms[0][g], truth[g]) for g in truth)
    plain = activation_perms(spec, prep.stats[0])
    assert sum(int((plain[g] != truth[g]).sum()) for g in truth) > 0
    assert sum(prep.stats[0].unsignalled.values()) > 0 and sum(prep.stats[0].arbitrary.values()) == 0


def test_unsignalled_counts_dead_and_identical_units_not_values_that_coincide():
    """A value equal to another on the rounding grid is no tie (the rest of the row tells the
    units apart); a dead row or column (all 0) and two identical rows are: activations cannot
    tell those units apart. The weights decide them unless their cosines tie too."""
    from graphrepair.merging.activation_match import tie_safe, unsignalled

    g = torch.Generator().manual_seed(0)
    c = tie_safe(torch.rand(6, 6, generator=g) * 0.5)
    c[0, 3] = c[0, 0]  # coincides with row 0's match: still told apart by the other entries
    ident = torch.arange(6)
    assert unsignalled(c, ident) == (0, 0)
    c[4] = 0.0  # A's unit 4 dead
    c[:, 2] = 0.0  # B's unit 2 dead (matched to A's unit 2)
    c[5] = c[1]  # A's units 1 and 5 alike in every correlation
    assert unsignalled(c, ident) == (4, 4)  # units 1, 2, 4, 5; no weights given: all arbitrary
    cos = torch.eye(6, dtype=torch.float64)
    assert unsignalled(c, ident, cos) == (4, 0)  # the weights tell each apart
    cos[1, 5] = cos[1, 1]  # unit 1 alike to B's 1 and 5 in its weights too
    assert unsignalled(c, ident, cos) == (4, 1)


def test_blind_rows_are_exactly_the_zero_or_repeated_rows():
    """``_blind`` (hashes, sorts, one comparison per candidate row) against comparing every pair
    of rows, on rounded matrices with dead rows, repeated rows and near-equal ones; transposed
    (non-contiguous) too, as ``blind_units`` reads the columns."""
    from graphrepair.merging.activation_match import _blind, blind_units, tie_safe

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(2, 50, (), generator=g))
        r = tie_safe(torch.randn(n, n, generator=g) * (torch.rand(n, 1, generator=g) > 0.25))
        src = torch.randint(0, n, (n // 3,), generator=g)
        dst = torch.randint(0, n, (n // 3,), generator=g)
        r[dst] = r[src]
        if n > 3:  # a row one grid step from another is no repeat
            r[1] = r[0]
            r[1, -1] += 2.0 ** -17
        for m in (r, r.T):
            brute = torch.tensor([bool((m[i] == 0).all()) or any(torch.equal(m[i], m[j]) for j in range(n) if j != i)
                                  for i in range(n)])
            assert torch.equal(_blind(m), brute)
        rows, cols = blind_units(r)
        assert torch.equal(rows, _blind(r)) and torch.equal(cols, _blind(r.T))


def test_blind_rows_when_hashes_collide(monkeypatch):
    """Rows with equal hashes that differ (a collision) are compared row by row: with every hash
    forced to 0, only the truly repeated and the zero rows are blind."""
    from graphrepair.merging import activation_match as am

    monkeypatch.setattr(am, "_hash_vectors", lambda n, dtype, device: torch.zeros(n, 2, dtype=dtype, device=device))
    r = am.tie_safe(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    r[3] = r[1]
    r[5] = 0.0
    assert am._blind(r).tolist() == [False, True, False, True, False, True]
