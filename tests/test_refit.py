"""The layerwise least-squares refit (``merge(..., refit=S)``, ``graphrepair.merging.refit``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphrepair as gr
from fixtures.zoo import mlp, resnet20
from graphrepair.errors import GraphRepairError
from graphrepair.merging import refit as R
from graphrepair.io.examples import Examples
from graphrepair.merging.merge import merge_models
from tests.dist_worker import SplitHeadLM
from tests.helpers import randomize_


class ConvNet(nn.Module):
    """Conv (with and without bias, grouped, strided, dilated) -> BatchNorm -> ReLU, then a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv1d(8, 6, 3, stride=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(x.flatten(2)))
        return self.fc(x.mean(-1))


def _fit(x, batch=16):
    return Examples(x, len(x), batch, device=x.device)


def _perturbed(model, seed=1, scale=0.3):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


class NormMLP(nn.Module):
    """Linear -> LayerNorm -> ReLU on tokens, then a head; a LayerNorm over two axes (kept)."""

    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 10)
        self.ln2, self.head = nn.LayerNorm((3, 10)), nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.ln2(torch.relu(self.b(torch.relu(self.ln(self.a(x)))))))


@pytest.mark.parametrize("build, shape", [(lambda: mlp(depth=3, width=16, in_features=12, classes=5), (12,)),
                                          (ConvNet, (3, 8, 8)), (NormMLP, (3, 6))])
def test_refit_reproduces_a_reachable_target_exactly(monkeypatch, build, shape):
    """With the target a model the merged one can become (both endpoints the same model), the
    refit recovers it: every layer's target is a linear map of inputs the refit layers before it
    reproduce. Without the ridge (singular where a ReLU never fires: the pseudo-inverse) exactly,
    also from a few rows picked per call; with it, within its pull."""
    torch.manual_seed(0)
    target = randomize_(build().eval(), 3)
    x = torch.randn(96, *shape)
    with torch.no_grad():
        want = target(x)
    for ridge, tol, rows in ((0.0, 1e-5, R.MAX_ROWS), (R.RIDGE, 1e-2, R.MAX_ROWS), (0.0, 1e-5, 60)):
        monkeypatch.setattr(R, "RIDGE", ridge)
        monkeypatch.setattr(R, "MAX_ROWS", rows)  # 60: a few rows of every conv call, unfolded in pieces
        monkeypatch.setattr(R, "UNFOLD_BYTES", 4096 if rows == 60 else 2 ** 27)
        merged = _perturbed(target)
        if build is NormMLP:  # what the refit keeps must be right already
            merged.ln2.load_state_dict(target.ln2.state_dict())
        with torch.no_grad():
            assert (merged(x) - want).abs().max() > 0.05 * want.abs().max()
        info = R.refit(merged, [target, target], [0.5, 0.5], _fit(x), 1, measure=True)
        assert set(info.layers) == {n for n, m in target.named_modules()
                                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm))
                                    and n != "ln2"}
        kept = {"ln2": "LayerNorm over 2 axes (only the last axis is refit)"} if build is NormMLP else {}
        assert info.kept == kept
        with torch.no_grad():
            err = float((merged(x) - want).abs().max() / want.abs().max())
        assert err < tol, (ridge, err)
        assert max(info.after.values()) < (1e-9 if ridge == 0 else 1e-2)


def test_refit_writes_the_least_squares_solution_into_the_layer():
    """The parameters written (weight layout, unfolded patches, groups, bias, a conv fit through
    its BatchNorm) compute what the least-squares solution computes: the layer's new outputs on its
    inputs equal [inputs, 1] @ lstsq([inputs, 1], target), to 1e-4."""
    torch.manual_seed(0)
    a, b = randomize_(ConvNet().eval(), 1), randomize_(ConvNet().eval(), 2)
    x = torch.randn(64, 3, 8, 8)
    merged = _perturbed(a)
    R.RIDGE, ridge = 0.0, R.RIDGE
    try:
        info = R.refit(merged, [a, b], [0.5, 0.5], _fit(x, batch=64), 1)
    finally:
        R.RIDGE = ridge
    # the last layer, fc: its inputs in the merged model and its target are what the refit saw
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, (inp[0], out)))
             for k, m in (("m", merged.fc), ("a", a.fc), ("b", b.fc))]
    with torch.no_grad():
        merged(x), a(x), b(x)
    for h in hooks:
        h.remove()
    inputs, got = seen["m"]
    target = 0.5 * seen["a"][1] + 0.5 * seen["b"][1]
    xa = torch.cat([inputs, torch.ones(len(inputs), 1)], 1).double()
    solution = torch.linalg.lstsq(xa, target.double()).solution
    torch.testing.assert_close(got.double(), xa @ solution, rtol=1e-4, atol=1e-4)
    # the grouped, bias-free conv c2 fit through b2: b2's outputs are, per group, the least-squares
    # fit of b2's target on c2's unfolded inputs and a constant
    assert info.through == {"c1": "b1", "c2": "b2"} and "c3" not in info.through
    seen.clear()
    hooks = [merged.c2.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", inp[0])),
             merged.b2.register_forward_hook(lambda mod, inp, out: seen.__setitem__("m", out)),
             a.b2.register_forward_hook(lambda mod, inp, out: seen.__setitem__("a", out)),
             b.b2.register_forward_hook(lambda mod, inp, out: seen.__setitem__("b", out))]
    with torch.no_grad():
        merged(x), a(x), b(x)
    for h in hooks:
        h.remove()
    cols = F.unfold(seen["x"], 3, dilation=2, padding=2).transpose(1, 2).reshape(-1, 8 * 9).double()
    target = (0.5 * seen["a"] + 0.5 * seen["b"]).movedim(1, -1).reshape(-1, 8).double()
    got = seen["m"].movedim(1, -1).reshape(-1, 8).double()
    for g in range(2):
        xg = torch.cat([cols[:, g * 36:(g + 1) * 36], torch.ones(len(cols), 1, dtype=cols.dtype)], 1)
        fit = xg @ torch.linalg.lstsq(xg, target[:, g * 4:(g + 1) * 4]).solution
        torch.testing.assert_close(got[:, g * 4:(g + 1) * 4], fit, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["mlp", "bn_resnet", "split_heads"])
def test_refit_merges_and_lowers_every_layers_error(case, tmp_path):
    """merge(..., refit=1) on an MLP, a BatchNorm ResNet and a transformer whose heads are aligned
    jointly: the merged model keeps its class (resets at residual sums do not fold: REPAIR at the
    layers' outputs), every layer's error to its target drops (or stays
    where the ridge holds it), the endpoints are unchanged, and the result exports to ONNX."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if case == "mlp":
        a, b = (randomize_(mlp(depth=4, width=24, in_features=16, classes=6).eval(), s) for s in (1, 2))
        x = torch.randn(200, 16, generator=g)
    elif case == "bn_resnet":
        a, b = (randomize_(resnet20("bn", width=1).eval(), s) for s in (1, 2))
        x = torch.randn(48, 3, 16, 16, generator=g)
    else:
        a, b = (randomize_(SplitHeadLM().eval(), s) for s in (1, 2))
        x = torch.randint(0, 40, (64, 12), generator=g)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    a.train()  # the caller's modes come back as they were
    kw = dict(batch_size=16, num_examples=len(x), points="all" if case == "mlp" else "conv")
    res = merge_models([a, b], x, refit=1, **kw)
    assert type(res.model) is type(a) and res.refit is not None and res.refit.layers
    assert all(torch.equal(m.state_dict()[k], s[k]) for m, s in zip((a, b), before) for k in s)
    assert all(m.training for m in a.modules()) and not any(m.training for m in b.modules())
    a.eval()
    # the same merge measured layer by layer
    res2 = merge_models([a, b], x, refit=0, **kw)
    from graphrepair.models import copy_with_state
    b_aligned = copy_with_state(a, gr.permute(b, res2.spec, res2.perms[0]).state_dict())
    info = R.refit(res2.model, [a, b_aligned], [0.5, 0.5], _fit(x), 1, measure=True)
    assert info.layers == res.refit.layers
    fitted = [n for n in info.layers if n not in info.through.values()]  # a BatchNorm fit with its conv
    assert set(info.before) == set(info.after) == set(fitted)
    for name in fitted:
        assert info.after[name] <= info.before[name] * (1 + 1e-3) + 1e-9, name
    assert sum(info.after.values()) < 0.9 * sum(info.before.values())
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, res2.model.state_dict()[k], rtol=1e-5, atol=1e-6)
    if case != "split_heads":
        from graphrepair.io.export import export_onnx

        assert export_onnx(res.model, (x[:2],), tmp_path / "m.onnx").max_abs_diff < 1e-3


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_refit_rejects_what_is_not_a_number_of_sweeps(bad):
    a = mlp(depth=2, width=8, in_features=4, classes=3)
    with pytest.raises(GraphRepairError, match="refit must be a whole number of sweeps"):
        merge_models([a, copy.deepcopy(a)], torch.randn(8, 4), refit=bad)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_refit_examples_are_checked_before_the_merge_reads_any_data(monkeypatch, bad):
    import graphrepair.merging.merge as merge_module

    def no_pass(*args, **kwargs):
        raise AssertionError("the merge began before its arguments were checked")

    monkeypatch.setattr(merge_module, "prepare", no_pass)
    a = mlp(depth=2, width=8, in_features=4, classes=3)
    with pytest.raises(GraphRepairError, match=r"refit_examples must be a whole number >= 1 or None, got"):
        merge_models([a, copy.deepcopy(a)], torch.randn(8, 4), refit=1, refit_examples=bad)


def test_refit_with_no_layer_it_can_fit_says_so():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    m = Scale()
    with pytest.raises(GraphRepairError, match=r"no Linear, Conv1d/2d, BatchNorm or LayerNorm layer that can be refit "
                                               r"\(functional layers are not refit\); merge with refit=0$"):
        R.refit(m, [m, m], [0.5, 0.5], _fit(torch.randn(8, 4)), 1)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1),
                                  nn.Conv2d(4, 6, (3, 2), padding=(2, 0), dilation=2, groups=2),
                                  nn.Conv1d(3, 4, 5, stride=3, padding=2)])
def test_picked_rows_unfold_in_pieces_what_the_whole_batch_gives(monkeypatch, conv):
    x = torch.randn(7, conv.in_channels, *((9, 8) if isinstance(conv, nn.Conv2d) else (23,)))
    whole = R._rows(conv, x)
    keep = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))[:40].sort().values
    monkeypatch.setattr(R, "UNFOLD_BYTES", 1)  # one example at a time
    torch.testing.assert_close(R._picked_rows(conv, x, keep), whole[keep], rtol=0, atol=0)
    assert torch.equal(R._picked_rows(conv, x, None), whole)


def test_barrier_with_the_refit_lowers_the_barrier_of_a_narrow_pair():
    """gr.barrier(..., refit=1) on the shipped narrow MLP pair (1,000 fitting examples, 3 alphas):
    the same endpoints, a higher midpoint and a lower barrier than exact REPAIR alone."""
    from torch.utils.data import TensorDataset

    from fixtures.pairs import PAIRS, load_pair

    if not all(p.is_file() for p in PAIRS["mlp10n"].paths()):
        pytest.skip("checkpoints of mlp10n missing")
    a, b = load_pair("mlp10n")
    x, _ = PAIRS["mlp10n"].data("train")
    test = TensorDataset(*(t[:3000] for t in PAIRS["mlp10n"].data("test")))
    plain = gr.barrier(a, b, eval_data=test, fit_data=x[:1000], alphas=3, num_examples=1000)
    fitted = gr.barrier(a, b, eval_data=test, fit_data=x[:1000], alphas=3, num_examples=1000, refit=1)
    assert fitted.label == "activation + exact + refit"
    assert fitted.accuracy[0] == plain.accuracy[0] and fitted.accuracy[2] == plain.accuracy[2]
    assert fitted.accuracy[1] > plain.accuracy[1] + 0.01
    assert fitted.accuracy_barrier < plain.accuracy_barrier
