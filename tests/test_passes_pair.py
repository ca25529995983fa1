"""passes.pair (two models of one graph side by side) and the statistics its taps gather."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from passes import ChannelSums, PairTap, PassError, TapView, bind_pair, pair_graph, unbind_pair
from tests.helpers import ConvBNNet, graph_of, randomize_

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, a, b):
        self.seen.append((a.clone(), b.clone()))


def _pair(how):
    torch.manual_seed(0)
    a, b = randomize_(ConvBNNet().eval(), 1), randomize_(ConvBNNet().eval(), 2)
    x = torch.randn(4, 3, 8, 8)
    gm = graph_of(a, x, how)
    if how == "fx":
        roots = (a, b)
    else:  # an ATen graph reads its own attributes: one copy per model
        gb = copy.deepcopy(gm)
        gb.load_state_dict(b.state_dict())
        roots = (gm, gb)
    return a, b, x, gm, roots


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_pair_runs_both_models_and_taps_see_both_values(how):
    a, b, x, gm, roots = _pair(how)
    relu = next(n.name for n in gm.graph.nodes if "relu" in n.name)
    rec = Recorder()
    pair = pair_graph(gm, *roots, {relu: rec}).graph_module
    with torch.no_grad():
        out_a, out_b = pair(x)
        if how == "aten":  # the flat form: outputs as the graph's output list
            (out_a,), (out_b,) = out_a, out_b
        torch.testing.assert_close(out_a, a(x))
        torch.testing.assert_close(out_b, b(x))
        assert len(rec.seen) == 1
        ha, hb = rec.seen[0]
        torch.testing.assert_close(ha, a.bn(a.conv(x)).relu())
        torch.testing.assert_close(hb, b.bn(b.conv(x)).relu())
    # the models themselves are untouched: the pair shares their modules, it does not copy them
    if how == "fx":
        assert pair.a.conv is a.conv and pair.b.conv is b.conv


def test_pair_names_a_missing_node_and_a_missing_attribute():
    a, b, x, gm, roots = _pair("fx")
    with pytest.raises(PassError, match="no node named 'nope'"):
        pair_graph(gm, a, b, {"nope": Recorder()})
    with pytest.raises(PassError, match="model B does not have"):
        pair_graph(gm, a, nn.Sequential(), {})


class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x.mul_(2.0)  # writes into the model's input
        return self.fc(x)


def test_in_place_op_on_the_input_does_not_leak_into_the_other_copy():
    torch.manual_seed(0)
    a, b = InPlaceOnInput(), InPlaceOnInput()
    gm = torch.fx.symbolic_trace(a)
    x = torch.randn(4, 5)
    with torch.no_grad():
        out_a, out_b = pair_graph(gm, a, b, {}).graph_module(x.clone())
        torch.testing.assert_close(out_a, a(x.clone()))
        torch.testing.assert_close(out_b, b(x.clone()))


def _reference(batches_a, batches_b, dim):
    xa = torch.cat([t.double().movedim(dim, 0).reshape(t.shape[dim], -1) for t in batches_a], 1).numpy()
    xb = torch.cat([t.double().movedim(dim, 0).reshape(t.shape[dim], -1) for t in batches_b], 1).numpy()
    c = xa.shape[0]
    return xa, xb, np.cov(xa, xb, bias=True)[:c, c:]


@pytest.mark.parametrize("shape,dim", [((50, 7), -1), ((6, 5, 18, 18), 1), ((6, 5, 4, 4), 1), ((3, 9, 5), -1),
                                       ((4, 6, 5), 1)])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("pending", [2, None])
def test_pair_tap_moments_and_covariance_equal_numpy(shape, dim, offset, pending, monkeypatch):
    """Every layout (rows, columns, batched maps, small maps, non-contiguous channel axis), and
    means 1000x the spread, where unshifted float32 sums would lose the variance entirely; read
    half way and at the end, with the defaults or with batches reaching the float64 totals two at
    a time (the waiting buffers are flushed, then reused)."""
    import passes.moments as moments

    if pending is not None:
        monkeypatch.setattr(moments, "_PENDING", pending)
        monkeypatch.setattr(moments, "_CROSS_PENDING", pending)
    torch.manual_seed(0)
    tap = PairTap([TapView(dim, None, True)], source="x")
    batches_a, batches_b = [], []
    for i in range(5):
        xa = torch.randn(*shape) + offset
        xb = 0.5 * xa + torch.randn(*shape) - offset
        tap(xa, xb)
        batches_a.append(xa)
        batches_b.append(xb)
        if i not in (2, 4):
            continue
        xa_, xb_, cov = _reference(batches_a, batches_b, dim)
        sa, sb = tap.moments(0)
        assert sa.n == xa_.shape[1]
        assert (sa.shift is not None) == (offset > 0)
        np.testing.assert_allclose(sa.mean.numpy(), xa_.mean(1), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(sa.var.numpy(), xa_.var(1), rtol=2e-4)
        np.testing.assert_allclose(sb.var.numpy(), xb_.var(1), rtol=2e-4)
        np.testing.assert_allclose(tap.cov(0).numpy(), cov, rtol=2e-4, atol=2e-4)


def test_pair_tap_view_with_index_pairs_replicas():
    torch.manual_seed(0)
    index = torch.tensor([[0, 2], [1, 3]])  # two channels, each made of two positions
    tap = PairTap([TapView(-1, index, True)], source="x")
    xa, xb = torch.randn(30, 4), torch.randn(30, 4)
    tap(xa, xb)
    ma = torch.cat([xa[:, [0, 2]].T.reshape(1, -1), xa[:, [1, 3]].T.reshape(1, -1)]).double()
    mb = torch.cat([xb[:, [0, 2]].T.reshape(1, -1), xb[:, [1, 3]].T.reshape(1, -1)]).double()
    expected = np.cov(ma.numpy(), mb.numpy(), bias=True)[:2, 2:]
    np.testing.assert_allclose(tap.cov(0).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(PassError, match="not a tensor"):
        tap((xa,), xb)


def test_channel_sums_refuses_a_batch_with_other_channels():
    s = ChannelSums(1)
    s.update(torch.randn(4, 3))
    with pytest.raises(PassError, match="3 channels"):
        s.update(torch.randn(4, 5))


def test_pair_without_outputs_stops_after_the_last_tap():
    a, b, x, gm, roots = _pair("fx")
    relu = next(n.name for n in gm.graph.nodes if "relu" in n.name)
    rec = Recorder()
    pair = pair_graph(gm, *roots, {relu: rec}, outputs=False).graph_module
    with torch.no_grad():
        assert pair(x) is None
    assert len(rec.seen) == 1
    called = [n.target for n in pair.graph.nodes if n.op == "call_module"]
    assert "a.fc" not in called and "b.fc" not in called  # nothing after the tap runs
    assert called[-1].startswith("_gr_tap")


def test_sums_about_zero_add_across_streams_with_other_shifts_and_empty_ones():
    """Two streams summed about their own shifts (mean 100, spread 3: shifted), converted to sums
    about zero and added, give the one stream's mean, variance and A-B covariance; a stream that
    saw nothing adds zeros of its known channel count. (float64 batches: the algebra alone; in
    float32 the per-batch sums about other shifts round differently, see the next test.)"""
    torch.manual_seed(0)
    batches = [(torch.randn(40, 5, dtype=torch.float64) * 3 + 100, torch.randn(40, 5, dtype=torch.float64) * 2 - 50)
               for _ in range(6)]
    one, first, second, none = (PairTap([TapView(1, None, True)], shape=(2, 5)) for _ in range(4))
    for i, (a, b) in enumerate(batches):
        one(a, b)
        (first if i < 2 else second)(a, b)
    assert first.sums[0][0].shift is not None
    assert not torch.equal(first.sums[0][0].shift, second.sums[0][0].shift)
    total = [u + v + w for u, v, w in zip(first.raw_totals(), second.raw_totals(), none.raw_totals())]
    joined = PairTap([TapView(1, None, True)], shape=(2, 5))
    joined.load_raw_totals(total)
    for got, ref in zip(joined.moments(0), one.moments(0)):
        assert got.n == ref.n
        torch.testing.assert_close(got.mean, ref.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.var, ref.var, rtol=1e-9, atol=0)
    torch.testing.assert_close(joined.cov(0), one.cov(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_a_paired_module_is_bound_to_other_models_and_taps_and_holds_nothing_between(how):
    """``bind_pair`` / ``unbind_pair``: one paired module serves several pairs of models of its
    graph; unbound, it holds no model, tap or tensor."""
    a, b, x, gm, roots = _pair(how)
    relu = next(n.name for n in gm.graph.nodes if "relu" in n.name)
    first = Recorder()
    pair = pair_graph(gm, *roots, {relu: first}).graph_module
    unbind_pair(pair)
    assert list(pair.parameters()) == [] and list(pair.buffers()) == []
    assert not any(m is first or m is roots[0] or m is roots[1] for m in pair.modules())
    second = Recorder()
    bind_pair(pair, gm, roots[1], roots[0], {relu: second})  # the models swapped
    with torch.no_grad():
        out_b, out_a = pair(x)
        if how == "aten":
            (out_b,), (out_a,) = out_b, out_a
        torch.testing.assert_close(out_a, a(x))
        torch.testing.assert_close(out_b, b(x))
        torch.testing.assert_close(second.seen[0][0], b.bn(b.conv(x)).relu())
    assert first.seen == [] and len(second.seen) == 1
    with pytest.raises(PassError, match="taps"):
        bind_pair(pair, gm, *roots, {})
    with pytest.raises(PassError, match="model B does not have"):
        bind_pair(pair, gm, roots[0], nn.Sequential(), {relu: second})
