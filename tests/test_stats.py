"""merging.stats: the joint pass of A and B (correlations, REPAIR's endpoint statistics, dead and
unsignalled units, joint spaces), on CPU and CUDA, its numeric checks, and what it leaves behind."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import graphrepair as gr
from fixtures.datasets import digits
from fixtures.zoo import ZOO
from graphrepair.merging.merge import merge_prepared, prepare


def test_cuda_statistics_and_merge_match_cpu(digits_pair, digits_spec):
    """The CUDA code paths (observers, cross moments, resets, folding) give the CPU's statistics.
    Merged weights may still differ where units are tied or dead (their matching is arbitrary), so
    the merged models are compared by their test accuracy."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    (a, b), x, _ = digits_pair
    cpu = prepare([a, b], x, num_examples=500, cross=True, spec=digits_spec)
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


def test_inf_in_the_data_names_the_first_node_whose_statistics_it_spoils(digits_pair, digits_spec):
    (a, b), x, _ = digits_pair
    bad = x[:200].clone()
    bad[3].view(-1)[5] = math.inf
    first = digits_spec.traced.gm.graph.find_nodes(op="call_module", target="1")[0].name
    with pytest.raises(gr.NumericError, match=rf"model A at node '{first}' are not finite"):
        gr.merge_models([a, b], bad, num_examples=200, repair="exact", spec=digits_spec)


def test_dead_channels_are_handled_and_reported(digits_pair, digits_spec):
    (a, b), x, _ = digits_pair
    dead_a, dead_b = copy.deepcopy(a), copy.deepcopy(b)
    with torch.no_grad():
        for m in (dead_a, dead_b):  # two hidden units that never fire
            m[1].weight[:2] = 0
            m[1].bias[:2] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN arithmetic either
        res = gr.merge_models([dead_a, dead_b], x, num_examples=500, spec=digits_spec)
    assert res.dead_channels >= 2
    assert any("dead" in n for n in res.notes)
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


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


def test_a_merge_leaves_no_pass_module_alive(digits_pair, digits_spec):
    """The pair's taps hold float64 sums of every observed layer (a ViT-B's: 0.9 GB) in a module
    that sits in reference cycles (GraphModule <-> graph): the merge frees them between passes
    (``runtime.release``), not whenever Python's collector next runs."""
    import gc

    from passes.pair_tap import PairTap

    (a, b), x, _ = digits_pair
    gc.collect()
    gc.disable()  # only what the merge itself frees counts
    try:
        res = gr.merge_models([a, b], x, num_examples=300, spec=digits_spec)
        alive = [o for o in gc.get_objects() if type(o) is PairTap]
    finally:
        gc.enable()
    assert res.examples == 300
    assert alive == []


@pytest.mark.parametrize("name", ["mlp20", "resnet20_bn"])
def test_a_warm_merge_leaves_no_garbage_for_the_collector(name):
    """A merge of a spec merged before (its paired graph and REPAIR graph kept, the fold played
    again) leaves no reference cycle behind: nothing for Python's collector to find, so no
    collection it triggers later costs what the process holds (a full one: 60 ms in a small
    process) for what a merge made."""
    import gc

    entry = ZOO[name]
    torch.manual_seed(0)
    a, b = entry.factory().eval(), entry.factory().eval()
    (x,) = entry.example_inputs(batch=16, seed=1)
    gr.merge_models([a, b], x, num_examples=16, batch_size=8)  # the first merge makes what is kept
    while gc.collect():  # (an earlier test's specs: what was kept for them goes with them, a collection later)
        pass
    gc.disable()  # only what the merge itself leaves counts
    try:
        res = gr.merge_models([a, b], x, num_examples=16, batch_size=8)
        found = gc.collect()
    finally:
        gc.enable()
    assert res.folded > 0 and type(res.model) is type(a)
    assert found == 0


def test_a_nan_correlation_is_refused_naming_its_group(digits_pair, digits_spec):
    """The groups' correlations are checked together (each group's sum: they lie in [-1, 1] or
    are NaN); a NaN in one group's cross products, with finite variances, is refused naming that
    group, and a clean pass summarises without complaint."""
    from graphrepair.io.examples import Examples
    from graphrepair.merging.points import observation_points, reset_points
    from graphrepair.merging.stats import plan_taps, run_pair, summarise

    (a, b), x, _ = digits_pair
    observe, resets = observation_points(digits_spec), reset_points(digits_spec, "all")
    groups = [g for g, pts in observe.items() if pts]
    assert len(groups) >= 2
    for spoil in (None, groups[-1]):
        plan = plan_taps(digits_spec, observe, resets, cross_at_resets=False, device=torch.device("cpu"))
        fit = Examples.of(x[:64], 64, 32, device=torch.device("cpu"))
        n = run_pair(digits_spec, a, b, plan, iter(fit), example=fit.example())
        if spoil is None:
            stats = summarise(digits_spec, plan, observe, resets, n)
            assert set(stats.corr) == set(groups) and all(torch.isfinite(c).all() for c in stats.corr.values())
            continue
        node, i = plan.at_group[(spoil, observe[spoil][0].node)]
        plan.taps[node].cross[i].total[1, 2] = float("nan")
        with pytest.raises(gr.NumericError, match=rf"correlations of group '{spoil}' are not finite"):
            summarise(digits_spec, plan, observe, resets, n)


class _ShapeBranch(torch.nn.Module):
    """A forward that branches on its input's shape (symbolic tracing fails; torch.export takes
    it): the graph is not run on the model's own modules, with a buffer it reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 16), torch.nn.Linear(16, 4)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 16))

    def forward(self, x):
        if x.size(1) == 3:
            x = x.repeat(1, 2)
        return self.fc2(torch.relu(self.fc1(x)) * self.scale)


def test_the_pass_reads_the_models_parameters_and_copies_their_buffers(monkeypatch):
    """A graph not run on the models' own modules (torch.export) is given the models' parameters
    themselves (no copy of every weight) and copies of their buffers; where the graph may write
    into a tensor, copies of everything. The merge is the same either way, and the models are
    left as they were."""
    from graphrepair.merging import stats

    torch.manual_seed(0)
    a, b = _ShapeBranch().eval(), _ShapeBranch().eval()
    x = torch.randn(64, 6)
    spec = gr.discover(a, (x[:4],))
    assert not stats._reads_own(spec.traced.gm, a, b)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    for model, root in zip((a, b), stats.pair_roots(spec, a, b, torch.device("cpu"))):
        got = root.state_dict()
        for k, p in model.named_parameters():
            assert got[k].data_ptr() == p.data_ptr(), k
        assert got["scale"].data_ptr() != model.scale.data_ptr() and torch.equal(got["scale"], model.scale)
    shared = gr.merge_models([a, b], x, num_examples=64, batch_size=16, method="activation", repair="exact")
    monkeypatch.setattr(stats, "writes_in_place", lambda gm: True)
    for model, root in zip((a, b), stats.pair_roots(spec, a, b, torch.device("cpu"))):
        got = root.state_dict()
        assert all(got[k].data_ptr() != p.data_ptr() for k, p in model.named_parameters())
    copied = gr.merge_models([a, b], x, num_examples=64, batch_size=16, method="activation", repair="exact")
    assert all(torch.equal(copied.perms[0][g], p) for g, p in shared.perms[0].items())
    want = copied.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in shared.model.state_dict().items())
    for m, sd in zip((a, b), before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_an_aten_op_that_writes_into_an_argument_is_an_in_place_write():
    """Graphs from torch.export hold aten ops: one whose schema writes into an argument
    (``add_``, ``copy_``, an ``out=`` overload) counts as an in-place write."""
    from passes.in_place_ops import writes_in_place

    def graph(op):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(op, (x, x)))
        return torch.fx.GraphModule(torch.nn.Module(), g)

    assert writes_in_place(graph(torch.ops.aten.add_.Tensor))
    assert writes_in_place(graph(torch.ops.aten.copy_.default))
    assert not writes_in_place(graph(torch.ops.aten.add.Tensor))
    assert not writes_in_place(graph(torch.ops.aten.mul.Tensor))
