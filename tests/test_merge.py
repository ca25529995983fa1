"""Align, interpolate, REPAIR: invariants and bad input."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import graphrepair as gr
from fixtures.datasets import digits
from fixtures.train import train
from fixtures.zoo import ZOO, mlp
from graphrepair.merging.weight_match import weight_matching
from graphrepair.merging.merge import merge_prepared, prepare
from passes.observe import ObserverSpec, insert_observers, observers
from tests.helpers import ConvBNNet, inverse_perms, randomize_


@pytest.fixture(scope="module")
def digits_pair():
    x, y = digits("train")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mlp(depth=3, width=32, in_features=64, classes=10)
        train(m, x, y, epochs=8, batch_size=64, lr=0.05, seed=seed)
        models.append(m.eval())
    return models, x, y


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_alignment_permutations_keep_b_function(digits_pair):
    (a, b), x, _ = digits_pair
    perms = gr.align(a, b, x, num_examples=500)
    spec = gr.discover(a, x[:2])
    b2 = gr.permute(b, spec, perms)
    torch.testing.assert_close(outputs(b2, x), outputs(b, x), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())


def test_alignment_raises_correlation(digits_pair):
    (a, b), x, _ = digits_pair
    prep = prepare([a, b], x, num_examples=800, statistics=False)
    for g, c in prep.mean_corr.items():
        assert c > 0.3, (g, c)
        assert c > float(prep.stats[0].corr[g].diagonal().mean()) + 0.1, g  # the units as they are


def test_align_makes_the_permutations_and_no_permuted_weights(digits_pair):
    (a, b), x, _ = digits_pair
    prep = prepare([a, b], x, num_examples=800, statistics=False, states=False)
    assert prep.aligned == []
    with pytest.raises(gr.GraphRepairError, match=r"states=True"):
        merge_prepared(prep, [0.5, 0.5], None)
    perms = gr.align(a, b, x, num_examples=800)
    assert perms.keys() == prep.perms[0].keys()
    for g, p in perms.items():
        assert torch.equal(p, prep.perms[0][g]), g


def test_align_by_weight_matching_from_data_a_spec_or_example_inputs(digits_pair):
    """Weight matching needs only a trace: data, example inputs or a spec give the same answer,
    which keeps B's function; none of them is a clear error, not a failure inside the tracer."""
    (a, b), x, _ = digits_pair
    spec = gr.discover(a, x[:2])
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


def _permuted_copy(name: str, model_seed: int = 1, perm_seed: int = 4):
    """(zoo entry, randomised model A, its spec, a random permutation, A permuted by it)."""
    entry = ZOO[name]
    torch.manual_seed(0)
    a = randomize_(entry.factory().eval(), seed=model_seed)
    spec = gr.discover(a, entry.example_inputs())
    truth = spec.random_permutations(seed=perm_seed)
    return entry, a, spec, truth, gr.permute(a, spec, truth)


# gpt2_tiny, bert_tiny, vit_tiny: heads x head dims after the split to heads (groups replicated
# over each other), solved from a pairing-free start
@pytest.mark.parametrize("name", ["mlp3", "resnet20_bn", "transformer_tiny", "densenet_tiny",
                                  "mobilenetv2_tiny", "grouped_conv_net", "shufflenet_block", "flatten_cnn",
                                  "gpt2_tiny", "bert_tiny", "vit_tiny"])
def test_weight_matching_recovers_a_random_permutation(name):
    if name in ("gpt2_tiny", "bert_tiny", "vit_tiny"):
        pytest.importorskip("transformers")
    _, a, spec, _, b = _permuted_copy(name, model_seed=3, perm_seed=7)
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


def test_exact_repair_folded_equals_unfolded_and_meets_goals(digits_pair):
    (a, b), x, _ = digits_pair
    n = 600
    # one batch holding every fitting example: the collect pass then sees the same statistics the
    # applied resets use, so the goals must be met exactly
    prep = prepare([a, b], x[:n], num_examples=n, batch_size=n)
    res = merge_prepared(prep, [0.5, 0.5], "exact", keep_unfolded=True)
    assert res.folded == res.resets == 3 and not res.kept
    assert type(res.model) is type(a)  # every reset folded: the user's own class
    xs = x[:n]
    torch.testing.assert_close(outputs(res.model, xs), outputs(res.unfolded, xs), rtol=1e-4, atol=1e-4)
    gm = insert_observers(copy.deepcopy(res.unfolded), {
        node: ObserverSpec(dim=-1) for node in res.goals}).graph_module
    # observe the reset outputs: observers sit after the original node, before the reset, so
    # observe the merged (folded) model through the spec graph instead
    from graphrepair.models import graph_for
    g2 = graph_for(res.spec, res.model)
    g2 = insert_observers(g2, {node: ObserverSpec(dim=-1) for node in res.goals}).graph_module
    g2(xs)
    for node, o in observers(g2).items():
        mean, std = res.goals[node]
        torch.testing.assert_close(o.mean.float(), mean.float(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(o.std.float(), std.float(), rtol=1e-3, atol=1e-3)
    del gm


@pytest.mark.parametrize("repair", [None, "reset", "approx", "exact"])
def test_repair_modes_run_and_keep_class(digits_pair, repair):
    (a, b), x, y = digits_pair
    merged = gr.merge(a, b, x, alpha=0.5, repair=repair, num_examples=500)
    assert type(merged) is type(a)
    out = outputs(merged, x[:10])
    assert torch.isfinite(out).all()


def test_repair_beats_plain_interpolation(digits_pair):
    (a, b), x, y = digits_pair
    xt, yt = digits("test")
    ev = TensorDataset(xt, yt)
    prep = prepare([a, b], x, num_examples=1000)
    plain = gr.evaluate(merge_prepared(prep, [0.5, 0.5], None).model, ev)
    repaired = gr.evaluate(merge_prepared(prep, [0.5, 0.5], "exact").model, ev)
    assert repaired[1] < plain[1]  # lower loss


def test_alpha_endpoints_reproduce_the_models(digits_pair):
    (a, b), x, _ = digits_pair
    spec = gr.discover(a, x[:2])
    prep = prepare([a, b], x, num_examples=300, statistics=False)
    at_b = merge_prepared(prep, [0.0, 1.0], None).model
    torch.testing.assert_close(outputs(at_b, x), outputs(b, x), rtol=1e-5, atol=1e-5)
    del spec


def test_three_models(digits_pair):
    (a, b), x, _ = digits_pair
    spec = gr.discover(a, x[:2])
    c = gr.permute(b, spec, spec.random_permutations(seed=1))  # b in another order
    res = gr.merge_models([a, b, c], x, num_examples=400)
    assert len(res.perms) == 2 and res.weights == pytest.approx([1 / 3] * 3)
    assert torch.isfinite(outputs(res.model, x[:5])).all()
    # c is b reordered: its optimal matching onto a is as good as b's, group by group
    pb = prepare([a, b], x, num_examples=400, statistics=False)
    pc = prepare([a, c], x, num_examples=400, statistics=False)
    for g in pb.mean_corr:
        assert pc.mean_corr[g] == pytest.approx(pb.mean_corr[g], abs=1e-6)


def test_cuda_statistics_and_merge_match_cpu(digits_pair):
    """The CUDA code paths (observers, cross moments, resets, folding) give the CPU's statistics.
    Merged weights may still differ where units are tied or dead (their matching is arbitrary), so
    the merged models are compared by their test accuracy."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    (a, b), x, _ = digits_pair
    cpu = prepare([a, b], x, num_examples=500, cross=True)
    gpu = prepare([copy.deepcopy(a).cuda(), copy.deepcopy(b).cuda()], x, num_examples=500, cross=True)
    for g, c in cpu.stats[0].corr.items():
        assert gpu.stats[0].corr[g].is_cuda
        torch.testing.assert_close(gpu.stats[0].corr[g].cpu(), c, rtol=1e-4, atol=1e-4)
    for node, st in cpu.stats[0].points.items():
        got = gpu.stats[0].points[node]
        for name in ("mean_a", "var_a", "mean_b", "var_b", "cov_ab"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(st, name), rtol=1e-4, atol=1e-4)
    merged_gpu = merge_prepared(gpu, [0.5, 0.5], "exact").model
    assert next(merged_gpu.parameters()).is_cuda
    xt, yt = digits("test")
    acc_cpu = gr.evaluate(merge_prepared(cpu, [0.5, 0.5], "exact").model, TensorDataset(xt, yt))[0]
    acc_gpu = gr.evaluate(merged_gpu, TensorDataset(xt.cuda(), yt.cuda()))[0]
    assert abs(acc_gpu - acc_cpu) < 0.03


# -- bad input --------------------------------------------------------------------------------------

def test_different_architectures_name_the_parameter(digits_pair):
    (a, _), x, _ = digits_pair
    other = mlp(depth=3, width=16, in_features=64, classes=10)
    with pytest.raises(gr.MismatchError, match=r"'1\.weight'.*\(32, 64\).*\(16, 64\)"):
        gr.merge(a, other, x)
    with pytest.raises(gr.MismatchError, match=r"'5\.weight': shape \(32, 32\) in A vs \(10, 32\)"):
        gr.merge(a, mlp(depth=2, width=32, in_features=64, classes=10), x)
    with pytest.raises(gr.MismatchError, match=r"only A has parameter '7\.weight'"):
        gr.merge(a, nn.Sequential(*copy.deepcopy(list(a))[:-2]), x)


def test_alpha_outside_unit_interval(digits_pair):
    (a, b), x, _ = digits_pair
    with pytest.raises(gr.GraphRepairError, match=r"alpha must be in \[0, 1\]"):
        gr.merge(a, b, x, alpha=1.5)


def test_empty_data(digits_pair):
    (a, b), x, _ = digits_pair
    with pytest.raises(gr.DataError, match="no"):
        gr.merge(a, b, x[:0])
    with pytest.raises(gr.DataError):
        gr.merge(a, b, [])


def test_wrong_batch_shape(digits_pair):
    (a, b), _, _ = digits_pair
    with pytest.raises(gr.ShapeError, match="does not fit"):
        gr.merge(a, b, torch.randn(20, 1, 9, 9))


def test_fewer_examples_than_requested_warns_with_the_count(digits_pair):
    (a, b), x, _ = digits_pair
    with pytest.warns(UserWarning, match="only 300 examples"):
        res = gr.merge_models([a, b], x[:300], num_examples=5000)
    assert res.examples == 300
    assert any("300" in n for n in res.notes)


def test_nan_weights_name_the_layer(digits_pair):
    (a, b), x, _ = digits_pair
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad[3].weight[0, 0] = math.nan
    with pytest.raises(gr.NumericError, match=r"model B.*'3\.weight'"):
        gr.merge(a, bad, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_check_finite_names_the_tensor_and_lets_large_finite_weights_pass(dtype):
    """The weights are checked through their sums: a sum that overflows (finite weights near the
    dtype's largest value) must not be taken for an Inf, and +Inf with -Inf (a NaN sum) must be."""
    from graphrepair.models import check_finite

    big = torch.finfo(dtype).max
    state = {"a.weight": torch.full((4, 4), big, dtype=dtype), "b.bias": torch.zeros(3, dtype=dtype),
             "steps": torch.tensor(3)}
    check_finite(state, "model A")
    state["b.bias"][1], state["b.bias"][2] = math.inf, -math.inf
    with pytest.raises(gr.NumericError, match=r"model A: parameter 'b\.bias'"):
        check_finite(state, "model A")


def test_inf_in_the_data_names_the_first_node_whose_statistics_it_spoils(digits_pair):
    (a, b), x, _ = digits_pair
    bad = x[:200].clone()
    bad[3].view(-1)[5] = math.inf
    first = gr.discover(a, x[:2]).traced.gm.graph.find_nodes(op="call_module", target="1")[0].name
    with pytest.raises(gr.NumericError, match=rf"model A at node '{first}' are not finite"):
        gr.merge_models([a, b], bad, num_examples=200, repair="exact")


def test_dead_channels_are_handled_and_reported(digits_pair):
    (a, b), x, _ = digits_pair
    dead_a, dead_b = copy.deepcopy(a), copy.deepcopy(b)
    with torch.no_grad():
        for m in (dead_a, dead_b):  # two hidden units that never fire
            m[1].weight[:2] = 0
            m[1].bias[:2] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN arithmetic either
        res = gr.merge_models([dead_a, dead_b], x, num_examples=500)
    assert res.dead_channels >= 2
    assert any("dead" in n for n in res.notes)
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_layer_report_on_a_model_and_its_permuted_copy(digits_pair):
    """B = A reordered: after alignment the path is flat, so no collapse (ratio 1), features are
    linearly connected (cosine 1) and the layers commute (distance 0); the naive path is not."""
    (a, _), x, _ = digits_pair
    spec = gr.discover(a, x[:2])
    b = gr.permute(a, spec, spec.random_permutations(seed=5))
    # weight matching recovers the permutation exactly (activation matching cannot tell dead units
    # apart, and averaging two different dead units can wake one up)
    prep = prepare([a, b], x, num_examples=500, method="weight")
    rows = gr.layer_report(prep, merge_prepared(prep, [0.5, 0.5], None).model, 0.5)
    assert len(rows) == 3
    for row in rows:
        assert row["variance_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert row["llfc_cosine"] == pytest.approx(1.0, abs=1e-4)
        assert row["commutativity"] == pytest.approx(0.0, abs=1e-4)
    naive = prepare([a, b], x, num_examples=500, align=False)
    rows = gr.layer_report(naive, merge_prepared(naive, [0.5, 0.5], None).model, 0.5)
    assert all(r["commutativity"] > 0.1 for r in rows[1:])
    assert rows[-1]["variance_ratio"] < 0.9


def test_study_layers_reuse_the_curves_merges(digits_pair, monkeypatch):
    """With --layers the per-layer measurement at alpha 0.5 uses the merges the curves made there
    (no second REPAIR pass), and its figures equal a measurement of a fresh merge."""
    import graphrepair.study.runner as study_mod

    (a, b), x, y = digits_pair
    calls = []
    real = merge_prepared

    def counted(prep, weights, repair, *args, **kwargs):
        calls.append((tuple(weights), repair))
        return real(prep, weights, repair, *args, **kwargs)

    monkeypatch.setattr(study_mod, "merge_prepared", counted)
    monkeypatch.setattr(sys.modules["graphrepair.study.metrics"], "merge_prepared", counted)
    st = study_mod.run_study(a, b, fit_data=x[:300], eval_data=TensorDataset(x[300:500], y[300:500]), alphas=3,
                             num_examples=300, layers=True)
    # the naive curve merges at 0.5 and 1; the aligned and REPAIR curves at 0.5 only (their
    # endpoints come from the naive curve); the layer measurement adds none
    assert sorted(calls, key=str) == sorted([((0.5, 0.5), None), ((0.0, 1.0), None),
                                             ((0.5, 0.5), None), ((0.5, 0.5), "exact")], key=str)
    fresh = gr.layer_report(st.prep, real(st.prep, [0.5, 0.5], "exact").model, 0.5)
    label = study_mod.repair_label("exact")
    for row, want in zip(st.layers, fresh):
        assert row["variance_ratio"][label] == pytest.approx(want["variance_ratio"], rel=1e-6)
        assert row["llfc_cosine"][label] == pytest.approx(want["llfc_cosine"], rel=1e-6)


def test_export_traced_models_merge_at_any_batch_size():
    """torch.export graphs keep a dynamic batch axis; activation matching recovers a permuted copy
    exactly, heads and the dims inside a head included (groups coupled at split-head nodes are
    solved jointly)."""
    pytest.importorskip("transformers")
    entry, a, spec, truth, b = _permuted_copy("gpt2_tiny")  # traced on a batch of 2
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


def test_curve_reuses_known_endpoints_exactly(digits_pair):
    """B and the aligned B' compute the same function, so a curve given another curve's endpoint
    figures equals one that evaluates them again."""
    from graphrepair.study.metrics import curve

    (a, b), x, _ = digits_pair
    xt, yt = digits("test")
    ev = TensorDataset(xt, yt)
    prep = prepare([a, b], x, num_examples=400, statistics=False)
    full = curve(prep, ev, 3, None, "aligned")
    naive = curve(prepare([a, b], x, num_examples=400, statistics=False, align=False), ev, 3, None, "naive")
    ends = ((naive.accuracy[0], naive.loss[0]), (naive.accuracy[-1], naive.loss[-1]))
    reused = curve(prep, ev, 3, None, "aligned", endpoints=ends)
    assert reused.accuracy == full.accuracy
    assert reused.loss == pytest.approx(full.loss, rel=1e-5)


@pytest.mark.parametrize("name", ["bert_tiny", "vit_tiny"])
def test_activation_matching_recovers_split_heads_of_exported_models(name):
    """Heads and head dims meet in one tensor after the split to heads: their correlations depend
    on each other's permutation and are solved jointly; a permuted copy is recovered exactly."""
    pytest.importorskip("transformers")
    entry, a, spec, truth, b = _permuted_copy(name)
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


def test_a_joint_space_too_large_is_reported_not_skipped_silently(monkeypatch):
    pytest.importorskip("transformers")
    import graphrepair.merging.stats as stats_module

    monkeypatch.setattr(stats_module, "JOINT_MAX", 8)  # the tiny GPT-2's heads x dims is 32
    entry = ZOO["gpt2_tiny"]
    torch.manual_seed(0)
    a, b = entry.factory().eval(), entry.factory().eval()
    x = torch.randint(0, entry.vocab, (16, 16))
    res = gr.merge_models([a, b], x, num_examples=16, batch_size=16, repair=None)
    assert any("joint space of 32 positions" in n and "approximate" in n for n in res.notes)
    monkeypatch.setattr(stats_module, "JOINT_MAX", 2048)
    res = gr.merge_models([a, b], x, num_examples=16, batch_size=16, repair=None)
    assert not any("joint space" in n for n in res.notes)


def test_prepared_alignment_does_not_follow_later_changes_of_b(digits_pair):
    (a, b), x, _ = digits_pair
    b = copy.deepcopy(b)  # changed below; the fixture is shared
    prep = prepare([a, b], x, num_examples=200, statistics=False)
    before = {k: v.clone() for k, v in prep.aligned[0].items()}
    with torch.no_grad():
        for t in b.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    for k, v in prep.aligned[0].items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_the_api_leaves_the_callers_models_as_they_were():
    """merge, prepare, evaluate and barrier run the models in eval mode and give them back in the
    mode they were in, module by module, with their weights and BatchNorm statistics untouched
    (a forward in training mode would have moved the running statistics)."""
    torch.manual_seed(0)
    a, b = randomize_(ConvBNNet().train(), 1), randomize_(ConvBNNet().train(), 2)
    b.fc.eval()  # a mix of modes comes back as it was
    x, y = torch.randn(48, 3, 8, 8), torch.randint(0, 4, (48,))
    modes = [{n: m.training for n, m in model.named_modules()} for model in (a, b)]
    states = [copy.deepcopy(model.state_dict()) for model in (a, b)]
    gr.merge(a, b, x, num_examples=48, batch_size=16)
    gr.prepare([a, b], x, num_examples=48, batch_size=16)
    gr.evaluate(a, TensorDataset(x, y))
    gr.barrier(a, b, eval_data=TensorDataset(x, y), fit_data=x, alphas=3, num_examples=48, batch_size=16)
    for model, mode, state in zip((a, b), modes, states):
        assert {n: m.training for n, m in model.named_modules()} == mode
        now = model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items())


def test_data_arguments_that_can_be_swapped_are_keyword_only():
    from graphrepair.study.runner import run_study

    x = torch.randn(8, 3, 8, 8)
    ev = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    a, b = ConvBNNet(), ConvBNNet()
    with pytest.raises(TypeError, match="positional"):
        gr.barrier(a, b, ev, x)
    with pytest.raises(TypeError, match="positional"):
        run_study(a, b, x, ev)


def test_a_merge_proves_its_spec_before_interpolating(monkeypatch):
    """A rule bug (here: a spec whose group also moves a parameter it must not) makes the found
    permutations change B's function: the merge refuses, naming the group, instead of returning a
    silently broken model."""
    import graphrepair.merging.merge as merge_mod
    from graphrepair.errors import CheckError

    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 4)
    merged = gr.merge(a, b, x, num_examples=64, batch_size=32)  # a correct spec: the proof passes
    assert merged(x).shape == (64, 3)
    spec = gr.discover(a, x[:2])
    real = spec.permute_state_dict

    def wrong(state, perms):  # the head's input axis forgets to follow the hidden group
        out = real(state, perms)
        out["2.weight"] = state["2.weight"]
        return out

    monkeypatch.setattr(type(spec), "permute_state_dict", lambda self, s, p: wrong(s, p))
    with pytest.raises(CheckError, match=r"aligning model B break its function: permuting group '0'"):
        merge_mod.prepare([a, b], x, num_examples=64, batch_size=32, spec=spec)


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


def test_a_merge_leaves_no_pass_module_alive(digits_pair):
    """The pair's taps hold float64 sums of every observed layer (a ViT-B's: 0.9 GB) in a module
    that sits in reference cycles (GraphModule <-> graph): the merge frees them between passes
    (``runtime.release``), not whenever Python's collector next runs."""
    import gc

    from passes.pair_tap import PairTap

    (a, b), x, _ = digits_pair
    gc.collect()
    gc.disable()  # only what the merge itself frees counts
    try:
        res = gr.merge_models([a, b], x, num_examples=300)
        alive = [o for o in gc.get_objects() if type(o) is PairTap]
    finally:
        gc.enable()
    assert res.examples == 300
    assert alive == []


_ORDER = torch.tensor([2, 0, 1, 3])


class _TensorConstant(nn.Module):
    """Reads a tensor that is none of its attributes: torch.fx makes it a constant of the traced
    graph (``_tensor_constant0``), in no state dict of the model (timm's Swin has 17)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x[:, _ORDER])))


class _NonPersistentBuffer(nn.Module):
    """A buffer outside the state dict (timm's MaxViT keeps its log coordinates so): the traced
    GraphModule holds it as an ordinary buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1, 1, 4), persistent=False)
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + self.offset)))


@pytest.mark.parametrize("repair", ["exact", None])
@pytest.mark.parametrize("cls, own", [(_TensorConstant, "_tensor_constant0"), (_NonPersistentBuffer, "offset")])
def test_a_model_whose_graph_has_tensors_of_its_own_merges_into_its_class(repair, cls, own):
    torch.manual_seed(0)
    a, b = cls().eval(), cls().eval()
    x = torch.randn(64, 4)
    spec = gr.discover(a, x[:2])
    assert spec.traced.graph_own == {own}
    res = gr.merge_models([a, b], x, num_examples=64, repair=repair)
    assert type(res.model) is cls and res.model.state_dict().keys() == a.state_dict().keys()
    assert torch.isfinite(res.model(x)).all()
