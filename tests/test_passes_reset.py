"""passes.reset: Reset (collect / apply), ChannelAffine, insert_resets, set_mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from passes import ChannelAffine, ChannelSums, PassError, Reset, ResetSpec, insert_resets, resets, set_mode
from passes.moments import broadcast_shape

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


def test_collect_accumulates_exact_mean_and_var():
    torch.manual_seed(0)
    batches = [torch.randn(6, 5, 4, 4) * 2 + 50.0 for _ in range(3)] + [torch.randn(2, 5, 4, 4)]
    reset = Reset(5, dim=1)
    for b in batches:
        reset(b)
    data = torch.cat(batches).double()
    torch.testing.assert_close(reset.running_mean, data.mean((0, 2, 3)).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        reset.running_var, data.var((0, 2, 3), correction=0).float(), rtol=1e-6, atol=1e-6
    )
    assert reset.count == data.numel() // 5


@pytest.mark.parametrize("small", [None, 0, 200])
def test_collect_paths_agree_and_running_stats_are_current(small, monkeypatch):
    """Small (or CUDA) tensors go through BatchNorm's fused kernel, large ones through sums and a
    multiply-add; with ``small`` = 200 the (6, 5, 4, 4) batches take the second path and the last
    (2, 5, 4, 4) one the first. Every batch comes out with the goal statistics, and the running
    statistics are current whichever way they are read."""
    import passes.reset as reset_mod

    if small is not None:
        monkeypatch.setattr(reset_mod, "_SMALL", small)
    torch.manual_seed(0)
    goal_mean, goal_std = torch.randn(5), torch.rand(5) + 0.5
    batches = [torch.randn(6, 5, 4, 4) * 2 + 50.0 for _ in range(3)] + [torch.randn(2, 5, 4, 4) + 49.0]
    reset = Reset(5, dim=1, goal_mean=goal_mean, goal_std=goal_std, eps=0.0)
    seen = []
    for b in batches:
        y = reset(b)
        seen.append(b)
        assert reset.sums.batch is None  # not held past the call (a small block among freed activations)
        torch.testing.assert_close(y.mean((0, 2, 3)), goal_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y.std((0, 2, 3), correction=0), goal_std, rtol=1e-4, atol=1e-4)
        data = torch.cat(seen).double()
        torch.testing.assert_close(reset.state_dict()["running_mean"], data.mean((0, 2, 3)).float(),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reset.running_var, data.var((0, 2, 3), correction=0).float(),
                                   rtol=1e-5, atol=1e-6)
    reset.mode = "apply"
    x = batches[0]
    mean, var = data.mean((0, 2, 3)), data.var((0, 2, 3), correction=0)
    expected = (x.double() - mean[:, None, None]) / var[:, None, None].sqrt() * goal_std[:, None, None] \
        + goal_mean[:, None, None]
    torch.testing.assert_close(reset(x), expected.float(), rtol=1e-4, atol=1e-4)


def _addcmul(x, dim, scale, shift):
    shape = broadcast_shape(x.ndim, dim)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@pytest.mark.parametrize("everywhere", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", [((7, 5, 33, 31), 1), ((64, 100, 17), 1), ((5, 17), 1), ((5, 17), -1),
                                       ((3, 9, 4), -1), ((1, 33, 65), 1), ((4, 1, 10), 1), ((2, 6, 3), 0)])
def test_channel_affine_computes_addcmul_on_every_layout(shape, dim, dtype, everywhere, monkeypatch):
    """``channel_affine`` (a large batch's multiply-add in collect mode) gives addcmul's x * scale +
    shift: the same bits where BatchNorm's inference kernel and addcmul round alike on this CPU
    (a probe decides; both fuse the multiply-add where it was measured), else within one rounding
    of the product; with signed zeros, a zero scale and an all-zero shift (scale-only) among the
    channels. ``everywhere``: the kernel for every size and for rows too (``_AFFINE_MIN`` 0)."""
    import passes.reset as reset_mod
    from passes.reset import channel_affine

    if everywhere:
        monkeypatch.setattr(reset_mod, "_AFFINE_MIN", 0)
    torch.manual_seed(0)
    probe = torch.randn(300, 5, 37, dtype=dtype)  # (above ``_AFFINE_MIN``: the kernel's own numbers)
    ps, pt = torch.rand(5, dtype=dtype) * 3, torch.randn(5, dtype=dtype)
    exact = torch.equal(channel_affine(probe, 1, ps, pt), _addcmul(probe, 1, ps, pt))
    c = shape[dim % len(shape)]
    for trial in range(3):
        x = torch.randn(shape, dtype=dtype) * 10.0 ** trial
        x.view(-1)[0] = -0.0
        scale, shift = torch.rand(c, dtype=dtype) * 3, torch.randn(c, dtype=dtype)
        scale[0], shift[-1] = 0.0, -0.0
        if trial == 2:
            shift = torch.zeros(c, dtype=dtype)
        got, want = channel_affine(x, dim, scale, shift), _addcmul(x, dim, scale, shift)
        assert got.shape == x.shape and got.dtype == dtype
        if exact:
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
        bound = 2 * torch.finfo(dtype).eps * (_addcmul(x, dim, scale, shift.abs()).abs() + x.abs() * scale.max())
        assert ((got - want).abs() <= bound).all()


def test_channel_affine_takes_the_kernel_for_large_maps_only(monkeypatch):
    """BatchNorm's kernel for a contiguous float batch of maps of at least ``_AFFINE_MIN``
    elements; addcmul itself for a channels-last (not contiguous) batch, half types, rows
    (channels last), a small batch and an empty one."""
    from passes.reset import _AFFINE_MIN, channel_affine

    calls = []
    real = torch.native_batch_norm

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch, "native_batch_norm", counted)
    torch.manual_seed(0)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    maps = torch.randn(4, 6, 40, 40)
    assert maps.numel() >= _AFFINE_MIN
    torch.testing.assert_close(channel_affine(maps, 1, scale, shift), _addcmul(maps, 1, scale, shift))
    assert calls == [(4, 6, 1600)]
    for x, dim in ((maps.to(memory_format=torch.channels_last), 1), (maps.half(), 1),
                   (torch.randn(_AFFINE_MIN, 6), -1), (torch.randn(2, 6, 5, 5), 1), (torch.randn(0, 6, 40), 1)):
        s, t = scale.to(x.dtype), shift.to(x.dtype)
        got = channel_affine(x, dim, s, t)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.equal(got, _addcmul(x, dim, s, t))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_collect_in_half_precision_accumulates_float32_statistics(dtype):
    """Half-type activations are summed in float32 (BatchNorm's CPU kernel would return their
    mean in half: 50 +- 0.03), and the output keeps the activation's dtype."""
    torch.manual_seed(0)
    batches = [(torch.randn(6, 5, 4, 4) * 2 + 50.0).to(dtype) for _ in range(3)]
    reset = Reset(5, dim=1, goal_mean=torch.zeros(5), goal_std=torch.ones(5))
    for b in batches:
        assert reset(b).dtype == dtype
    data = torch.cat(batches).double()
    torch.testing.assert_close(reset.running_mean.double(), data.mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(reset.running_var.double(), data.var((0, 2, 3), correction=0), rtol=1e-4, atol=1e-5)


def test_collect_output_has_the_goal_statistics_of_the_batch():
    torch.manual_seed(0)
    goal_mean, goal_std = torch.randn(4), torch.rand(4) + 0.5
    reset = Reset(4, dim=-1, goal_mean=goal_mean, goal_std=goal_std, eps=0.0)
    y = reset(torch.randn(3, 100, 4) * 7 + 3)
    torch.testing.assert_close(y.mean((0, 1)), goal_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.std((0, 1), correction=0), goal_std, rtol=1e-4, atol=1e-4)


def test_apply_uses_running_stats_and_equals_as_affine():
    torch.manual_seed(0)
    reset = Reset(3, dim=1, goal_mean=torch.tensor([1.0, 2.0, 3.0]), goal_std=torch.tensor([0.5, 1.0, 2.0]))
    mean, var = torch.randn(3), torch.rand(3) + 0.1
    reset.set_running(mean, var)
    reset.mode = "apply"
    x = torch.randn(8, 3, 2)
    expected = (x - mean[:, None]) / torch.sqrt(var[:, None] + reset.eps) * reset.goal_std[:, None] + reset.goal_mean[:, None]
    torch.testing.assert_close(reset(x), expected)
    scale, shift = reset.as_affine()
    torch.testing.assert_close(reset(x), (x.double() * scale[:, None] + shift[:, None]).float())
    assert reset.count == 0  # apply mode accumulates nothing


def test_reset_errors_name_the_problem():
    reset = Reset(3, dim=1, source="conv1")
    with pytest.raises(PassError, match="conv1.*3 channels.*4"):
        reset(torch.randn(2, 4))
    with pytest.raises(PassError, match=r"shape \(3,\)"):
        reset.set_running(torch.zeros(2), torch.ones(2))
    with pytest.raises(PassError, match="var >= 0"):
        reset.set_running(torch.zeros(3), -torch.ones(3))
    with pytest.raises(PassError, match="goal"):
        Reset(2, goal_std=torch.tensor([1.0, -1.0]))


def test_channel_affine_broadcasts_along_dim():
    scale, shift = torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0])
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(ChannelAffine(scale, shift, dim=1)(x), x * scale[:, None] + shift[:, None])
    torch.testing.assert_close(ChannelAffine(scale, shift, dim=-1)(x.transpose(1, 2)), x.transpose(1, 2) * scale + shift)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_insert_resets_structure_and_numbers(how):
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(16, 3)
    gm = torch.fx.symbolic_trace(model) if how == "fx" else torch.export.export(model, (x,)).module()
    name = next(n.name for n in gm.graph.nodes if n.name in ("fc1", "linear"))
    goal_mean, goal_std = torch.randn(8), torch.rand(8) + 0.5
    result = insert_resets(gm, {name: ResetSpec(-1, goal_mean, goal_std)})
    out = result.graph_module
    # structural
    assert result.counts == {"resets": 1} and result.modified
    found = resets(out)
    assert list(found) == [name] and found[name].mode == "collect"
    reset_node = next(n for n in out.graph.nodes if n.op == "call_module" and n.target.startswith("_gr_reset"))
    assert reset_node.args[0].name == name and [u.name for u in reset_node.users][0] != name
    # numeric: collect mode normalises fc1's output with batch statistics
    h = model.fc1(x)
    normed = (h - h.mean(0)) / torch.sqrt(h.var(0, correction=0) + 1e-5) * goal_std + goal_mean
    torch.testing.assert_close(out(x), model.fc2(normed.relu()))
    set_mode(out, "apply")
    # the running buffers are written when apply mode is set (not at the first read, which could
    # be inside an export trace); read them raw, past the attribute access that would write them
    raw = found[name]._buffers
    torch.testing.assert_close(raw["running_mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw["running_var"], h.var(0, correction=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out(x), model.fc2(normed.relu()), rtol=1e-5, atol=1e-5)


def test_set_mode_apply_without_statistics_is_refused():
    gm = torch.fx.symbolic_trace(Mlp())
    out = insert_resets(gm, {"fc1": ResetSpec(-1, torch.zeros(8), torch.ones(8))}).graph_module
    with pytest.raises(PassError, match="'fc1'.*no statistics"):
        set_mode(out, "apply")
    with pytest.raises(PassError, match="mode"):
        set_mode(out, "train")
    resets(out)["fc1"].set_running(torch.zeros(8), torch.ones(8))
    set_mode(out, "apply")
    assert resets(out)["fc1"].mode == "apply"
    with pytest.raises(PassError, match="'fc9'"):
        insert_resets(gm, {"fc9": ResetSpec(-1, torch.zeros(8), torch.ones(8))})


def test_reset_sums_add_across_streams_and_calibration_fixes_the_shift():
    """Resets (their fused batch-norm path) add across streams too; with the shift chosen by
    ``calibrate`` from one shared example, streams that start on different batches make exactly the
    per-batch sums one stream makes."""
    torch.manual_seed(0)
    xs = [torch.randn(16, 4) * 0.5 - 40 for _ in range(5)]
    example = xs[0][:2]

    def run(batches):
        r = Reset(4, dim=1)
        r.calibrating = True
        r(example)
        r.calibrating = False
        for x in batches:
            r(x)
        return r

    one, a, b = run(xs), run(xs[:3]), run(xs[3:])
    assert torch.equal(a.sums.shift, b.sums.shift)
    joined = Reset(4, dim=1)
    joined.load_raw_totals([u + v for u, v in zip(a.raw_totals(), b.raw_totals())])
    assert joined.count == one.count == 80
    torch.testing.assert_close(joined.running_mean, one.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(joined.running_var, one.running_var, rtol=1e-9, atol=0)
    sums = ChannelSums(1)
    sums.calibrate(example)
    with pytest.raises(PassError, match="before the first batch"):
        sums.update(xs[1])
        sums.calibrate(example)


def test_a_reset_fed_the_wrong_channels_names_itself_and_the_axis():
    """The channel check names the reset (its message is built only on an error) and what is wrong."""
    r = Reset(4, dim=1, source="fc1")
    with pytest.raises(PassError, match=r"reset at 'fc1' has 4 channels but its input has 3 along axis 1 "
                                        r"\(shape \(2, 3\)\); check the channel axis"):
        r(torch.randn(2, 3))
    r = Reset(4, dim=2, source="fc1")
    with pytest.raises(PassError, match=r"reset at 'fc1': channel axis 2 is out of range for an input of shape \(2, 4\)"):
        r(torch.randn(2, 4))
    assert Reset(4, dim=-1, source="fc1")(torch.randn(5, 4)).shape == (5, 4)


def test_restart_starts_afresh_with_new_goals_in_new_buffers():
    """``Reset.restart``: collect mode, no statistics, the new goals; the tensors it held before
    are not written (a module kept for reuse shares them with others)."""
    torch.manual_seed(0)
    r = Reset(4, dim=1, goal_mean=torch.zeros(4), goal_std=torch.ones(4), source="conv")
    r(torch.randn(8, 4) * 3 + 1)
    r.mode = "apply"
    old = {k: (t, t.clone()) for k, t in r._buffers.items()}
    r.restart(torch.full((4,), 2.0), torch.full((4,), 0.5))
    assert r.mode == "collect" and r.count == 0 and not r.ready and r.last_ndim is None
    assert torch.equal(r.goal_mean, torch.full((4,), 2.0)) and torch.equal(r.goal_std, torch.full((4,), 0.5))
    for k, (t, values) in old.items():
        assert r._buffers[k] is not t and torch.equal(t, values), k
    x = torch.randn(16, 4) * 5 - 3
    y = r(x)  # normalised to the new goals, from this batch alone
    torch.testing.assert_close(y.mean(0), torch.full((4,), 2.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(r.running_mean, x.double().mean(0).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(PassError, match="goal statistics must be finite"):
        r.restart(torch.full((4,), float("nan")), torch.ones(4))
    with pytest.raises(PassError, match=r"shape \(4,\)"):
        r.restart(torch.zeros(3), torch.ones(3))


def test_restart_all_checks_every_goal_at_once_and_names_the_bad_one():
    """``restart_all`` restarts every reset with its goals, checked together; a non-finite mean
    or a negative std is still refused, naming the reset it was meant for."""
    from passes.reset import restart_all

    found = {f"fc{i}": Reset(3, dim=1, goal_mean=torch.zeros(3), goal_std=torch.ones(3), source=f"fc{i}")
             for i in range(3)}
    goals = {k: (torch.full((3,), float(i)), torch.full((3,), 1.0 + i)) for i, k in enumerate(found)}
    restart_all(found, goals)
    for k, r in found.items():
        assert r.mode == "collect" and torch.equal(r.goal_mean, goals[k][0]) and torch.equal(r.goal_std, goals[k][1])
    bad = dict(goals, fc1=(torch.zeros(3), torch.tensor([1.0, -0.5, 1.0])))
    with pytest.raises(PassError, match="reset at 'fc1'.*goal_std >= 0"):
        restart_all(found, bad)
    bad = dict(goals, fc2=(torch.tensor([0.0, float("inf"), 0.0]), torch.ones(3)))
    with pytest.raises(PassError, match="reset at 'fc2'.*finite"):
        restart_all(found, bad)
    restart_all({}, {})  # nothing to restart
