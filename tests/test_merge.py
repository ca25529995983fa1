"""merging.merge, the public merge API: interpolation, REPAIR (exact, approx, reset; folded into the
weights), several models, the proof of the spec, the user's models and classes kept, and bad input."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import graphrepair as gr
from fixtures.datasets import digits
from fixtures.zoo import ZOO, mlp
from graphrepair.merging.merge import merge_prepared, prepare
from passes.observe import ObserverSpec, insert_observers, observers
from tests.helpers import ConvBNNet, outputs, randomize_


def test_exact_repair_folded_equals_unfolded_and_meets_goals(digits_pair, digits_spec):
    (a, b), x, _ = digits_pair
    n = 600
    # one batch holding every fitting example: the collect pass then sees the same statistics the
    # applied resets use, so the goals must be met exactly
    prep = prepare([a, b], x[:n], num_examples=n, batch_size=n, spec=digits_spec)
    res = merge_prepared(prep, [0.5, 0.5], "exact", keep_unfolded=True)
    assert res.folded == res.resets == 3 and not res.kept
    assert type(res.model) is type(a)  # every reset folded: the user's own class
    xs = x[:n]
    torch.testing.assert_close(outputs(res.model, xs), outputs(res.unfolded, xs), rtol=1e-4, atol=1e-4)
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


@pytest.mark.parametrize("repair", [None, "reset", "approx", "exact"])
def test_repair_modes_run_and_keep_class(digits_pair, digits_spec, repair):
    (a, b), x, y = digits_pair
    merged = gr.merge(a, b, x, alpha=0.5, repair=repair, num_examples=500, spec=digits_spec)
    assert type(merged) is type(a)
    out = outputs(merged, x[:10])
    assert torch.isfinite(out).all()


def test_repair_beats_plain_interpolation(digits_pair, digits_spec):
    (a, b), x, y = digits_pair
    xt, yt = digits("test")
    ev = TensorDataset(xt, yt)
    prep = prepare([a, b], x, num_examples=1000, spec=digits_spec)
    plain = gr.evaluate(merge_prepared(prep, [0.5, 0.5], None).model, ev)
    repaired = gr.evaluate(merge_prepared(prep, [0.5, 0.5], "exact").model, ev)
    assert repaired[1] < plain[1]  # lower loss


def test_alpha_endpoints_reproduce_the_models(digits_pair, digits_prepared):
    (a, b), x, _ = digits_pair
    at_b = merge_prepared(digits_prepared, [0.0, 1.0], None).model
    torch.testing.assert_close(outputs(at_b, x), outputs(b, x), rtol=1e-5, atol=1e-5)


def test_three_models(digits_pair, digits_spec, digits_prepared):
    (a, b), x, _ = digits_pair
    spec = digits_spec
    c = gr.permute(b, spec, spec.random_permutations(seed=1))  # b in another order
    res = gr.merge_models([a, b, c], x, num_examples=400, spec=spec)
    assert len(res.perms) == 2 and res.weights == pytest.approx([1 / 3] * 3)
    assert torch.isfinite(outputs(res.model, x[:5])).all()
    # c is b reordered: its optimal matching onto a is as good as b's, group by group
    pb = digits_prepared  # 800 examples
    pc = prepare([a, c], x, num_examples=800, statistics=False, spec=spec)
    for g in pb.mean_corr:
        assert pc.mean_corr[g] == pytest.approx(pb.mean_corr[g], abs=1e-6)


def _shrink_rows_(model: nn.Module, factor: float = 0.01, share: float = 0.3, seed: int = 7) -> nn.Module:
    """Scale a share of every weight matrix's output rows down: channels of variance far below
    the resets' eps (1e-5), as trained networks have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p[torch.rand(p.shape[0], generator=g) < share] *= factor
    return model


@pytest.mark.parametrize("batch_size", [48, 16])
@pytest.mark.parametrize("name", ["vit_tiny_custom", "convnext_tiny", "resnet20_bn"])
def test_exact_repair_of_identical_endpoints_is_the_identity(name, batch_size):
    """In one batch and over several: each batch of the REPAIR pass is normalised to the
    endpoints' moments of that batch (``merge.batch_goals``); with the global goal for every batch
    3 batches of 16 left 2% on a ViT."""
    entry = ZOO[name]
    torch.manual_seed(0)
    a = _shrink_rows_(randomize_(entry.factory().eval(), seed=1))
    x = entry.example_inputs(batch=48, seed=3)[0]
    spec = gr.discover(a, (x[:2],))
    b = gr.permute(a, spec, spec.random_permutations(seed=5))
    prep = prepare([a, b], x, num_examples=48, batch_size=batch_size, spec=spec)
    with torch.no_grad():
        ref = a(x)
        for repair in (None, "exact"):
            y = merge_prepared(prep, [0.5, 0.5], repair).model(x)
            rel = float((y - ref).norm() / ref.norm())
            # exact was 4e-4 (ViT), 1.6e-4 (ConvNeXt), 2e-5 (ResNet20): scaled by sqrt(v / (v + eps))
            assert rel < 1e-5, (repair, rel)


def test_prepared_alignment_does_not_follow_later_changes_of_b(digits_pair, digits_spec):
    (a, b), x, _ = digits_pair
    b = copy.deepcopy(b)  # changed below; the fixture is shared
    prep = prepare([a, b], x, num_examples=200, statistics=False, spec=digits_spec)
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


class _ExportedBuffers(_NonPersistentBuffer):
    """Traced by torch.export (symbolic tracing fails on the branch on a size), with a
    non-persistent buffer it reads and one it does not: a copy of torch.export's graph holds them
    as persistent buffers, and the merge returned a GraphModule instead of the class (a note-less
    change of type)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("unused", torch.zeros(()), persistent=False)

    def forward(self, x):
        if x.size(1) == 3:
            x = torch.cat([x, x[:, :1]], 1)
        return super().forward(x)


@pytest.mark.parametrize("repair", ["exact", None])
@pytest.mark.parametrize("cls, own, kind", [(_TensorConstant, {"_tensor_constant0"}, "fx"),
                                            (_NonPersistentBuffer, {"offset"}, "fx"),
                                            (_ExportedBuffers, {"offset", "unused"}, "export")])
def test_a_model_whose_graph_has_tensors_of_its_own_merges_into_its_class(repair, cls, own, kind):
    torch.manual_seed(0)
    a, b = cls().eval(), cls().eval()
    x = torch.randn(64, 4)
    spec = gr.discover(a, x[:2])
    assert spec.traced.kind == kind and spec.traced.graph_own == own
    res = gr.merge_models([a, b], x, num_examples=64, repair=repair)
    assert type(res.model) is cls and res.model.state_dict().keys() == a.state_dict().keys()
    assert torch.isfinite(res.model(x)).all()


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_spec_discovered_in_float32_merges_the_half_models(dtype):
    """A spec discovered on the float32 model and given to a merge of its half-precision copies:
    the groups are the same, but the graph holds float32 weights; the merge traces the half model
    as it is (the same groups), runs in its dtype and gives what the merge without a spec gives."""
    torch.manual_seed(0)
    a, b = mlp(depth=3, width=32).eval(), mlp(depth=3, width=32).eval()
    x = torch.randn(64, 1, 28, 28)
    spec32 = gr.discover(a, (x[:2],))
    ha, hb = copy.deepcopy(a).to(dtype), copy.deepcopy(b).to(dtype)
    given = gr.merge_models([ha, hb], x, num_examples=64, batch_size=32, spec=spec32)
    own = gr.merge_models([ha, hb], x, num_examples=64, batch_size=32)
    assert {g.name: g.size for g in given.spec.groups} == {g.name: g.size for g in spec32.groups}
    assert {k: v.tolist() for k, v in given.perms[0].items()} == {k: v.tolist() for k, v in own.perms[0].items()}
    assert next(given.model.parameters()).dtype == dtype
    for (k, v), w in zip(given.model.state_dict().items(), own.model.state_dict().values()):
        assert torch.equal(v, w), k
    # the float32 models still merge with it as it is (the spec's own graph)
    assert gr.merge_models([a, b], x, num_examples=64, batch_size=32, spec=spec32).spec is spec32


def test_a_spec_of_other_groups_traced_at_another_dtype_is_refused():
    """A float32 spec whose groups are not those of the half model's own trace: MismatchError
    naming the group and what to do (never a merge with the wrong groups)."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    spec32 = gr.discover(mlp(depth=3, width=16).eval(), (x[:2],))
    ha, hb = mlp(depth=3, width=32).to(torch.bfloat16).eval(), mlp(depth=3, width=32).to(torch.bfloat16).eval()
    with pytest.raises(gr.GraphRepairError, match=r"traced with torch.float32 weights.*bfloat16.*16 channels.*spec=None"):
        gr.merge_models([ha, hb], x, num_examples=16, batch_size=16, spec=spec32)


class _ProductLayers(nn.Module):
    """An MLP with (in, out) weight matrices, its layers written ``x @ w``."""

    def __init__(self, export: bool = False):
        super().__init__()
        self.export = export  # a Python int of a shape: symbolic_trace fails, torch.export traces
        self.w1 = nn.Parameter(torch.randn(64, 32) / 8)
        self.b1 = nn.Parameter(torch.randn(32) / 10)
        self.w2 = nn.Parameter(torch.randn(32, 32) / 6)
        self.w3 = nn.Parameter(torch.randn(32, 10) / 6)

    def forward(self, x):
        if self.export and int(x.shape[-1]) < 0:
            raise ValueError("never")
        return torch.relu(torch.relu(x @ self.w1 + self.b1) @ self.w2) @ self.w3


class _ModuleLayers(nn.Module):
    """The same function with nn.Linear layers (bias-free, the first layer's bias added after)."""

    def __init__(self, net: _ProductLayers):
        super().__init__()
        self.l1, self.l2, self.l3 = (nn.Linear(*w.shape, bias=False) for w in (net.w1, net.w2, net.w3))
        self.b1 = nn.Parameter(net.b1.detach().clone())
        with torch.no_grad():
            for layer, w in zip((self.l1, self.l2, self.l3), (net.w1, net.w2, net.w3)):
                layer.weight.copy_(w.t())

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x) + self.b1))))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("output", ["class", "graph"])
def test_layers_written_as_matrix_products_are_repaired_as_linear_layers(output, tracer):
    """``x @ self.w`` is a linear layer: REPAIR resets its output and folds the correction into
    ``w``'s columns (a GraphModule creates the bias the shift needs). Before: no reset point, and
    the merge failed with "needs the endpoint statistics". The same weights in nn.Linear layers
    merge to the same function."""
    torch.manual_seed(5)
    x = torch.randn(512, 64)
    torch.manual_seed(0)
    a = _ProductLayers(tracer == "export").eval()
    torch.manual_seed(1)
    b = _ProductLayers(tracer == "export").eval()
    merged = gr.merge_models([a, b], x, output=output)
    assert merged.spec.traced.kind == tracer
    reference = gr.merge_models([_ModuleLayers(a).eval(), _ModuleLayers(b).eval()], x, output=output)
    assert isinstance(merged.model, _ProductLayers if output == "class" else torch.fx.GraphModule)
    with torch.no_grad():
        got, want = merged.model(x), reference.model(x)
        plain = gr.merge_models([a, b], x, repair=None).model(x)
    assert all(torch.equal(p, q) for p, q in zip(merged.perms[0].values(), reference.perms[0].values()))
    # the products round differently; the class's scale-only corrections carry that further
    # (0.3e-6 to 3e-4 over 12 seeds of the data, against REPAIR's own change of 0.4 to 0.7)
    tol = 1e-5 if output == "graph" else 1e-3
    assert (got - want).abs().max() < tol, (got - want).abs().max()
    assert (got - plain).abs().max() > 0.1  # (REPAIR changed something)
    assert merged.notes == reference.notes
    if output == "class":  # the shifts of the bias-free layers: noted, as for nn.Linear's
        assert any("correct the scale only" in n for n in merged.notes)


def test_a_model_with_nothing_to_reset_says_so():
    """Layers written with einsum: discovery moves their channels, but REPAIR has no layer output
    to reset. One GraphRepairError says so and what to do; repair=None merges."""

    class Ein(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 32) / 3)
            self.w2 = nn.Parameter(torch.randn(32, 4) / 6)

        def forward(self, x):
            return torch.einsum("nh,ho->no", torch.relu(torch.einsum("ni,ih->nh", x, self.w1)), self.w2)

    torch.manual_seed(0)
    a, b, x = Ein().eval(), Ein().eval(), torch.randn(64, 8)
    with pytest.raises(gr.GraphRepairError, match=r"nothing to repair in Ein: REPAIR resets the outputs of "
                                                  r"linear and conv layers .* merge with repair=None \(--repair none\)"):
        gr.merge(a, b, x)
    merged = gr.merge(a, b, x, repair=None)
    assert isinstance(merged, Ein) and merged(x).shape == (64, 4)


@pytest.mark.parametrize("repair", ["exact", None])
def test_a_merge_of_a_torch_export_traced_model_shows_no_warning_from_inside_torch(repair):
    """Copying a torch.export graph makes torch warn (a FutureWarning: its pytree specs' copy
    reads a deprecated ``LeafSpec``) about torch's own code, nothing the user can act on: no
    merge of such a model shows it (shape_branch_cnn's forward branches on a shape, so it is
    traced by torch.export). Every warning is recorded, whatever pytest's filters."""
    import warnings

    entry = ZOO["shape_branch_cnn"]
    a = randomize_(entry.factory().eval(), seed=1)
    b = randomize_(entry.factory().eval(), seed=2)
    x = entry.example_inputs(batch=16)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        merged = gr.merge_models([a, b], x, num_examples=16, batch_size=8, repair=repair).model
    assert type(merged) is type(a)
    assert torch.isfinite(merged(x[:2])).all()
    assert not [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]


def test_merges_on_several_threads_at_once_are_the_merges_one_after_another():
    """What a merge keeps between calls in this process (the discovered spec of an architecture,
    the merged graph of an earlier merge: ``discovery.reuse``, ``merging.kept``) is shared by
    merges that run at once on several threads (a sweep in a thread pool): each thread's merge is
    the one it makes alone, weight for weight (one model A with six Bs, four threads, small
    batches: the passes interleave; a kept graph shared instead of taken by one merge at a time
    fails here)."""
    from concurrent.futures import ThreadPoolExecutor

    entry = ZOO["resnet20_bn"]
    a = randomize_(entry.factory().eval(), seed=10)  # one model A, as a sweep over B's merges it
    pairs = [(a, randomize_(entry.factory().eval(), seed=20 + s)) for s in range(6)]
    x = entry.example_inputs(batch=64)[0]

    def merged(pair):
        result = gr.merge_models(list(pair), x, num_examples=64, batch_size=4)
        return {k: v.clone() for k, v in result.model.state_dict().items()}

    alone = [merged(p) for p in pairs]
    assert not all(torch.equal(alone[0][k], alone[1][k]) for k in alone[0])  # the merges differ
    threads = torch.get_num_threads()
    precision = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        torch.set_num_threads(1)  # (four merges on the machine's cores, not four times its threads)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(merged, pairs))
    finally:
        torch.set_num_threads(threads)
    # the proofs' IEEE settings (process-wide, ``passes.modules.full_precision``) as they were
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == precision
    for one, other in zip(alone, together):
        assert one.keys() == other.keys()
        for k in one:
            assert torch.allclose(one[k], other[k], rtol=0, atol=1e-6), k


def test_integer_and_bool_tensors_that_differ_are_model_as_and_a_warning_names_them():
    class Indexed(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.a, self.h = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
            self.bn = torch.nn.BatchNorm1d(16)
            self.register_buffer("order", torch.randperm(4))  # an index: no average is one
            self.register_buffer("keep", torch.arange(4) != seed)  # a mask
            self.register_buffer("same", torch.arange(4))

        def forward(self, x):
            return self.h(torch.relu(self.bn(self.a(x))))[:, self.order] * self.keep

    a, b = Indexed(0), Indexed(1)
    b.bn.num_batches_tracked += 5  # BatchNorm's counter differs in every pair: not named
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(gr.GraphRepairWarning) as caught:
        merged = gr.merge(a, b, x)
    said = [str(w.message) for w in caught if "integer" in str(w.message)]
    assert said == ["integer and bool tensors cannot be averaged: the merged model holds model A's 'order', "
                    "'keep', which differ in the other model"]
    assert torch.equal(merged.order, a.order) and torch.equal(merged.keep, a.keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gr.GraphRepairWarning)
        warnings.filterwarnings("ignore", message=".*fewer than")
        gr.merge(a, b, x, alpha=0.0)  # all weight on model A: nothing lost, nothing said


class _Unregistered(nn.Module):
    """Layers in a plain list (a common slip: not registered, in no state dict) and a cached
    activation (not weights)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.extra = [nn.Linear(4, 4)]
        self.scales = {"out": nn.Parameter(torch.ones(4))}

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        self.last = h
        return self.extra[0](self.h(h)) * self.scales["out"]


def test_weights_in_no_state_dict_that_differ_are_named():
    torch.manual_seed(0)
    a, b = _Unregistered(), _Unregistered()
    with torch.no_grad():
        b.scales["out"].mul_(2)
        a(torch.randn(4, 8)), b(torch.randn(4, 8))  # cached activations differ: not weights, not named
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(gr.GraphRepairWarning) as caught:
        merged = gr.merge(a, b, x, repair=None)
    said = [str(w.message) for w in caught if "no state dict" in str(w.message)]
    assert said == ["model A holds weights in no state dict (attribute 'extra' of the _Unregistered, attribute "
                    "'scales' of the _Unregistered: modules or parameters in a plain list or dict), which differ "
                    "in the other model: no merge reads them, and the merged model holds model A's; register "
                    "them (nn.ModuleList, nn.ModuleDict, nn.ParameterList) to merge them"]
    assert torch.equal(merged.extra[0].weight, a.extra[0].weight)
    b.extra[0].load_state_dict(a.extra[0].state_dict())
    b.scales["out"] = a.scales["out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", gr.GraphRepairWarning)
        warnings.filterwarnings("ignore", message=".*fewer than")
        gr.merge(a, b, x, repair=None)  # the same in both: nothing lost, nothing said


def test_a_barrier_names_the_weights_in_no_state_dict_its_path_cannot_carry():
    """The far end of a barrier's path (alpha 1, model B aligned) and every inner point hold model
    A's weights outside the state dicts: ``barrier`` and the command line's study say so, as a
    merge does."""
    from graphrepair.study.runner import run_study

    torch.manual_seed(0)
    a, b = _Unregistered(), _Unregistered()
    with torch.no_grad():
        b.scales["out"].mul_(2)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))
    for run in (lambda: gr.barrier(a, b, eval_data=TensorDataset(x, y), fit_data=x, alphas=3, num_examples=64,
                                   batch_size=32),
                lambda: run_study(a, b, fit_data=x, eval_data=TensorDataset(x, y), alphas=3, num_examples=64,
                                  batch_size=32)):
        with pytest.warns(gr.GraphRepairWarning) as caught:
            run()
        said = [str(w.message) for w in caught if "no state dict" in str(w.message)]
        assert len(said) == 1 and said[0].startswith("model A holds weights in no state dict (attribute 'extra' of "
                                                     "the _Unregistered, attribute 'scales' of the _Unregistered")
    b.extra[0].load_state_dict(a.extra[0].state_dict())
    b.scales["out"] = a.scales["out"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gr.barrier(a, b, eval_data=TensorDataset(x, y), fit_data=x, alphas=3, num_examples=64, batch_size=32)
    assert not [w for w in caught if "no state dict" in str(w.message)]

def test_models_of_other_architectures_are_refused_before_any_warning_on_their_weights():
    """Two models that differ in architecture: the MismatchError comes first, with no warning on
    weights outside their state dicts before it (the comparison of such weights reads models
    that are not alike)."""
    torch.manual_seed(0)
    a, b = _Unregistered(), _Unregistered()
    b.h = nn.Linear(16, 5)
    b.extra = [nn.Linear(5, 4)]
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(gr.MismatchError, match="'h.weight'"):
            gr.merge(a, b, x, repair=None)
    assert [str(w.message) for w in caught] == []
