"""REPAIR gives the user's class back by default (``output="class"``, ``merging.repair``): resets
whose layer has no bias correct the scale only, resets that cannot fold (a residual stream) are left
out, and the merged pass measures the resets that remain; ``output="graph"`` keeps every correction
in a GraphModule. A model whose resets all fold merges bit-identically either way."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fixtures.pairs import PAIRS, load_pair
from graphrepair.errors import GraphRepairError
from graphrepair.merging.merge import merge_models, merge_prepared, prepare
from passes.reset import Reset

EPS = 1e-5


def bias_free_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 10, bias=False), nn.ReLU(),
                         nn.Linear(10, 3, bias=False))


class PreLN(nn.Module):
    """One pre-LayerNorm residual block without biases: h = embed(x); h + fc2(relu(fc1(LN(h))))."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
        self.head_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(self.head_norm(h))


def pair(factory, inputs, seeds=(0, 1)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(factory().eval())
    return out


def data(features: int, n: int = 200, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def merged(models, x, **kw):
    kw.setdefault("batch_size", len(x))  # one batch: the merged pass is the sequential computation below
    return merge_models(models, x, num_examples=len(x), **kw)


def outputs(model, x):
    with torch.no_grad():
        return model(x)


# -- the class by default, the graph on request --------------------------------------------------

@pytest.mark.parametrize("factory, features", [(bias_free_mlp, 6), (PreLN, 5)])
def test_class_by_default_graph_on_request(factory, features):
    a, b = pair(factory, features)
    x = data(features)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    res = merged([a, b], x)
    graph = merged([a, b], x, output="graph")
    assert type(res.model) is type(a) and res.output == "class" and res.kept == []
    assert isinstance(graph.model, torch.fx.GraphModule) and graph.treated == {}
    assert graph.kept  # what the graph holds that the class cannot
    assert set(res.model.state_dict()) == set(a.state_dict())
    assert not any(isinstance(m, Reset) for m in res.model.modules())
    assert res.folded + sum(v.startswith("left out") for v in res.treated.values()) == res.resets
    d = res.as_dict()
    assert d["treated"] == res.treated and d["output"] == "class" and d["merged_class"] == type(a).__name__
    for m, sd in zip((a, b), before):  # the caller's models as they were
        assert not m.training
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    # not the plain interpolation: REPAIR did something
    plain = merged([a, b], x, repair=None)
    assert (outputs(res.model, x) - outputs(plain.model, x)).abs().max() > 1e-3


def test_what_was_done_to_each_reset():
    a, b = pair(PreLN, 5)
    res = merged([a, b], data(5))
    assert set(res.treated) == {"embed", "fc1", "fc2", "add"}, res.treated
    assert all(res.treated[k].startswith("scale only") for k in ("embed", "fc1", "fc2"))
    assert res.treated["add"].startswith("left out (its input is the add add")
    assert any("of 4 resets, 3 correct the scale only" in n and "1 are left out" in n for n in res.notes), res.notes


def test_bad_output_is_refused():
    a, b = pair(bias_free_mlp, 6)
    with pytest.raises(GraphRepairError, match="output must be one of"):
        merged([a, b], data(6), output="module")


# -- the class merge is what the treatment says --------------------------------------------------

def expected(plain: nn.Module, x: torch.Tensor, goals: dict, layers: dict[str, str], bias: dict[str, bool]):
    """The treatment computed by hand on the plain interpolation: layer by layer in order, its
    output channels scaled to the goal's spread, s = sqrt(goal_std^2 + eps) / sqrt(var + eps)
    (the variance over the data, the earlier layers already corrected), and where the layer has a
    bias, shifted to the goal's mean too. ``layers``: module name -> its reset point (the graph
    node's name). Resets not in ``layers`` are left out."""
    model = copy.deepcopy(plain)
    for name, point in layers.items():
        layer = model.get_submodule(name)
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        with torch.no_grad():
            model(x)
        handle.remove()
        y = seen[0].double().reshape(-1, seen[0].shape[-1])
        mean, var = y.mean(0), y.var(0, correction=0)
        goal_mean, goal_std = (t.double() for t in goals[point])
        s = (goal_std.square() + EPS).sqrt() / (var + EPS).sqrt()
        with torch.no_grad():
            layer.weight.copy_((layer.weight.double() * s[:, None]).float())
            if bias[name]:
                layer.bias.copy_((s * layer.bias.double() + goal_mean - mean * s).float())
    return model


def test_scale_only_is_the_spread_to_the_goal():
    a, b = pair(bias_free_mlp, 6)
    x = data(6)
    prep = prepare([a, b], x, statistics=True, num_examples=len(x), batch_size=len(x))
    res = merge_prepared(prep, [0.5, 0.5], "exact", keep_unfolded=True)
    plain = merge_prepared(prep, [0.5, 0.5], None).model
    want = expected(plain, x, res.goals, {"0": "_0", "2": "_2"}, {"0": False, "2": False})
    for k, v in want.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(outputs(res.model, x), outputs(res.unfolded, x), rtol=1e-4, atol=1e-5)
    # the graph holds the shift too: another model
    graph = merge_prepared(prep, [0.5, 0.5], "exact", output="graph")
    assert (outputs(graph.model, x) - outputs(res.model, x)).abs().max() > 1e-3


def test_a_left_out_reset_is_measured_without_it():
    """The residual stream's reset is left out before the merged pass: the layers after it are
    corrected for the stream as the class computes it (the expectation never applies it)."""
    a, b = pair(PreLN, 5)
    x = data(5)
    prep = prepare([a, b], x, statistics=True, num_examples=len(x), batch_size=len(x))
    res = merge_prepared(prep, [0.5, 0.5], "exact", keep_unfolded=True)
    plain = merge_prepared(prep, [0.5, 0.5], None).model
    want = expected(plain, x, res.goals, {k: k for k in ("embed", "fc1", "fc2")},
                    {"embed": False, "fc1": False, "fc2": False})
    for k, v in want.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(outputs(res.model, x), outputs(want, x), rtol=1e-4, atol=1e-5)
    # the unfolded graph holds no reset for the add: left out, not kept
    sources = {m.source for m in res.unfolded.modules() if isinstance(m, Reset)}
    assert sources == {"embed", "fc1", "fc2"}
    assert all(m.scale_only for m in res.unfolded.modules() if isinstance(m, Reset))


def test_closed_form_keeps_the_class_too():
    a, b = pair(PreLN, 5)
    x = data(5)
    prep = prepare([a, b], x, statistics=True, cross=True, num_examples=len(x), batch_size=len(x))
    res = merge_prepared(prep, [0.5, 0.5], "approx", keep_unfolded=True)
    graph = merge_prepared(prep, [0.5, 0.5], "approx", output="graph")
    assert type(res.model) is PreLN and set(res.treated) == {"embed", "fc1", "fc2", "add"}
    assert isinstance(graph.model, torch.fx.GraphModule)
    torch.testing.assert_close(outputs(res.model, x), outputs(res.unfolded, x), rtol=1e-4, atol=1e-5)


# -- models whose resets all fold: nothing changes ----------------------------------------------

@pytest.mark.parametrize("name", ["mlp10", "mlp20n"])
def test_all_folding_pairs_are_bit_identical(name):
    a, b = load_pair(name)
    x = PAIRS[name].data("train")[0][:600]
    prep = prepare([a, b], x, statistics=True, num_examples=len(x), batch_size=200)
    res = merge_prepared(prep, [0.5, 0.5], "exact")
    graph = merge_prepared(prep, [0.5, 0.5], "exact", output="graph")
    assert res.treated == {} and res.kept == graph.kept == [] and res.folded == res.resets > 0
    assert type(res.model) is type(graph.model) is type(a)
    sd = graph.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in res.model.state_dict().items())


# -- a Hugging Face model: its class, save_pretrained and from_pretrained ---------------------------

def test_llama_keeps_its_class_through_save_pretrained(tmp_path):
    pytest.importorskip("transformers")
    from fixtures.hf_natural import build

    fa, fb = build("llama", batch=4, seed=0), build("llama", batch=4, seed=1)
    batches = [build("llama", batch=4, seed=s).inputs for s in range(2, 6)]
    res = merge_models([fa.model, fb.model], batches, num_examples=16, batch_size=4)
    cls = type(fa.model)
    assert type(res.model) is cls and res.treated and res.kept == []
    assert any(v.startswith("left out") for v in res.treated.values())
    assert any(v.startswith("scale only") for v in res.treated.values())
    res.model.save_pretrained(tmp_path / "merged")
    loaded = cls.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        for batch in batches[:2]:
            diff = (loaded(**batch).logits - res.model(**batch).logits).abs().max()
            assert float(diff) < 1e-5
    graph = merge_models([fa.model, fb.model], batches, num_examples=16, batch_size=4, output="graph")
    assert isinstance(graph.model, torch.fx.GraphModule)


# -- the passes: fold_plan, the scale-only reset, the shift into the add input with a bias -------

class TwoBranch(nn.Module):
    def __init__(self, first_bias: bool):
        super().__init__()
        self.p1, self.p2 = nn.Linear(4, 6, bias=first_bias), nn.Linear(4, 6)
        self.free = nn.Linear(4, 6, bias=False)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.p1(x) + torch.relu(self.p2(x))
        return self.out(h + self.free(x))


def _with_resets(model, points, x):
    from passes.reset import ResetSpec, insert_resets, set_mode

    gm = torch.fx.symbolic_trace(model)
    gm = insert_resets(gm, {p: ResetSpec(-1, torch.randn(6), torch.rand(6) + 0.5) for p in points}).graph_module
    with torch.no_grad():
        gm(x)
    set_mode(gm, "apply")
    return gm


def test_fold_plan_says_what_fold_affines_does_and_changes_nothing():
    from passes.fold_affine import NEEDS_BIAS, fold_affines, fold_plan

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    gm = _with_resets(TwoBranch(first_bias=True), ["add", "free"], x)
    names = [n.name for n in gm.graph.nodes]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    plan = fold_plan(gm)
    assert [n.name for n in gm.graph.nodes] == names  # nothing changed
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    by_source = {gm.get_submodule(str(n.target)).source: plan[n.name] for n in gm.graph.nodes if n.name in plan}
    assert by_source["free"] == NEEDS_BIAS
    assert "relu is not produced by a linear" in by_source["add"]
    done = fold_affines(gm)
    assert done.counts == {"folded": 1, "kept": 1}
    assert any("created parameter free.bias" in n for n in done.notes)


def test_the_shift_goes_to_the_add_input_that_has_a_bias():
    from passes.fold_affine import fold_affines, fold_plan

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.p1, self.p2 = nn.Linear(4, 6, bias=False), nn.Linear(4, 6)

        def forward(self, x):
            return self.p1(x) + self.p2(x)

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    gm = _with_resets(Sum(), ["add"], x)
    assert list(fold_plan(gm).values()) == [None]  # folds into existing parameters
    with torch.no_grad():
        want = gm(x)
    done = fold_affines(gm)
    assert done.counts["folded"] == 1 and done.notes == []
    assert done.graph_module.p1.bias is None
    torch.testing.assert_close(done.graph_module(x), want, rtol=1e-5, atol=1e-5)


def test_scale_only_reset():
    torch.manual_seed(0)
    x = torch.randn(500, 3) * torch.tensor([0.5, 2.0, 4.0]) + torch.tensor([1.0, -3.0, 0.0])
    goal_mean, goal_std = torch.tensor([9.0, 9.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])
    reset = Reset(3, dim=-1, goal_mean=goal_mean, goal_std=goal_std, scale_only=True)
    y = reset(x)  # collect mode: the batch's spread to the goal, the mean only scaled
    scale = goal_std.double() / (x.double().var(0, correction=0) + EPS).sqrt()
    torch.testing.assert_close(y.double(), x.double() * scale, rtol=1e-5, atol=1e-5)
    reset.mode = "apply"
    s, t = reset.as_affine()
    torch.testing.assert_close(s, scale, rtol=1e-5, atol=0)
    assert torch.equal(t, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(reset(x).double(), x.double() * scale, rtol=1e-5, atol=1e-5)
    # and the full reset is not scale-only: the goal mean is reached
    full = Reset(3, dim=-1, goal_mean=goal_mean, goal_std=goal_std)
    torch.testing.assert_close(full(x).mean(0), goal_mean, rtol=0, atol=1e-4)


# -- the command line: --out-hf under REPAIR by default, --output graph ----------------------------

def test_cli_out_hf_works_under_repair_by_default(tmp_path):
    pytest.importorskip("transformers")
    import json

    import numpy as np
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from fixtures.hf_natural import build
    from graphrepair.cli import main

    for seed, name in ((0, "a"), (1, "b")):
        build("vit", seed=seed).model.save_pretrained(tmp_path / name)
    np.savez(tmp_path / "fit.npz", x=torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5)).numpy())
    args = ["merge", "--model", f"hf:{tmp_path / 'a'}", "--a", tmp_path / "a" / "model.safetensors",
            "--b", tmp_path / "b" / "model.safetensors", "--data", tmp_path / "fit.npz", "--num-examples", 64,
            "--no-onnx"]
    run = lambda *extra: CliRunner().invoke(main, [str(a) for a in (*args, *extra)])  # noqa: E731
    r = run("--out-hf", tmp_path / "merged", "--weights", tmp_path / "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["repair"] == "exact" and report["output"] == "class"
    assert report["merged_class"] == "ViTForImageClassification" and report["kept"] == []
    assert report["treated"] and all(v.startswith("left out (its input is the add") for v in report["treated"].values())
    cls = type(build("vit").model)
    loaded = cls.from_pretrained(tmp_path / "merged").eval()
    reference = cls(loaded.config).eval()
    reference.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert float((loaded(pixel_values=x).logits - reference(pixel_values=x).logits).abs().max()) < 1e-5
    # --output graph: every correction, a GraphModule, which has no save_pretrained
    r = run("--out-hf", tmp_path / "graph", "--output", "graph")
    assert r.exit_code == 2 and "GraphModule" in r.output and "drop --output graph" in r.output
    assert not (tmp_path / "graph").exists()


def test_a_transformer_comes_back_in_its_class_and_exports(tmp_path):
    import graphrepair as gr
    from fixtures.zoo import transformer_tiny

    a, b = pair(transformer_tiny, None)
    x = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(3))
    res = gr.merge_models([a, b], x, num_examples=64, batch_size=32)
    assert type(res.model) is type(a) and res.kept == []
    assert res.treated and all(v.startswith("left out (its input is the add") for v in res.treated.values())
    assert res.model.head.weight is res.model.embed.weight  # the tied weight stays tied
    report = gr.export_onnx(res.model, (x[:2],), tmp_path / "m.onnx")
    assert report.max_abs_diff < 1e-4
    graph = gr.merge_models([a, b], x, num_examples=64, batch_size=32, output="graph")
    assert isinstance(graph.model, torch.fx.GraphModule) and len(graph.kept) == len(res.treated)
