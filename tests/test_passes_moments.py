"""passes.moments: channel matrices, streaming channel sums, cross moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passes import ChannelSums, CrossMoments, PassError, channel_matrix, moments

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


def test_channel_matrix_moves_the_channel_axis_first():
    x = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    m = channel_matrix(x, 1)
    assert m.shape == (3, 8)
    torch.testing.assert_close(m[1], x[:, 1, :].reshape(-1))
    torch.testing.assert_close(channel_matrix(x, -1)[2], x[..., 2].reshape(-1))


def test_channel_matrix_with_index_stacks_replicas_as_samples():
    x = torch.randn(5, 6)  # 6 positions = 2 channels x 3 replicas
    index = torch.tensor([[0, 2, 4], [1, 3, 5]])
    m = channel_matrix(x, 1, index)
    assert m.shape == (2, 15)
    torch.testing.assert_close(m[0], x[:, [0, 2, 4]].T.reshape(-1))
    with pytest.raises(PassError, match="index"):
        channel_matrix(x, 1, torch.tensor([0, 1]))
    with pytest.raises(PassError, match="out of range"):
        channel_matrix(x, 2)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])  # mean/std = 5
def test_cross_moments_corr_equals_numpy_corrcoef(dtype, rtol):
    torch.manual_seed(0)
    mix = torch.randn(3, 4, dtype=dtype)
    a_batches, b_batches = [], []
    cm = CrossMoments(3, 4)
    for _ in range(5):
        a = torch.randn(3, 50, dtype=dtype) + 5.0
        b = mix.T @ a + 0.5 * torch.randn(4, 50, dtype=dtype)
        cm.update(a, b)
        a_batches.append(a)
        b_batches.append(b)
    a, b = torch.cat(a_batches, 1).double().numpy(), torch.cat(b_batches, 1).double().numpy()
    expected = np.corrcoef(a, b)[:3, 3:]
    np.testing.assert_allclose(cm.corr().numpy(), expected, rtol=rtol, atol=rtol * 1e-3)
    cov = np.cov(a, b, bias=True)[:3, 3:]
    np.testing.assert_allclose(cm.cov().numpy(), cov, rtol=rtol, atol=rtol * 1e-3)


def test_cross_moments_zero_variance_gives_zero_not_nan():
    cm = CrossMoments(2, 2)
    a = torch.stack([torch.ones(10), torch.randn(10)])
    b = torch.stack([torch.randn(10), torch.full((10,), 3.0)])
    cm.update(a, b)
    corr = cm.corr()
    assert torch.isfinite(corr).all()
    assert corr[0].abs().sum() == 0 and corr[:, 1].abs().sum() == 0
    with pytest.raises(PassError, match="same batch"):
        cm.update(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(PassError, match=r"\(2, N\)"):
        cm.update(torch.randn(3, 3), torch.randn(2, 3))


@pytest.mark.parametrize("pending", [1, 2, 64])
def test_add_moments_merges_batches_like_update(pending, monkeypatch):
    """A batch given by its (count, mean, population variance), or BatchNorm's inverse std, adds
    to the sums exactly as the batch itself does, about a shift (mean 100, std 3 does not cancel),
    and the kinds may mix; however many batches wait before reaching the totals (``pending``)."""
    import passes.moments as moments

    monkeypatch.setattr(moments, "_PENDING", pending)
    torch.manual_seed(0)
    batches = [torch.randn(n, 5, dtype=torch.float64) * 3 + 100.0 for n in (7, 9, 4, 6, 5)]
    eps = 1e-3
    by_moments, mixed = ChannelSums(1), ChannelSums(1)
    for i, b in enumerate(batches):
        mean, var = b.mean(0).float(), b.var(0, correction=0).float()
        by_moments.add_moments(b.shape[0], mean, var)
        if i in (1, 3):
            mixed.update(b.float())
        elif i == 2:
            mixed.add_moments(b.shape[0], mean, invstd=torch.rsqrt(b.var(0, correction=0) + eps).float(), eps=eps)
        else:
            mixed.add_moments(b.shape[0], mean, var)
        if i not in (2, 4):  # let batches wait, then read
            continue
        data = torch.cat(batches[:i + 1])
        for sums in (by_moments, mixed):
            assert sums.n == data.shape[0]
            torch.testing.assert_close(sums.mean, data.mean(0), rtol=1e-7, atol=0)
            torch.testing.assert_close(sums.var, data.var(0, correction=0), rtol=1e-5, atol=0)
    with pytest.raises(PassError, match="channels"):
        by_moments.add_moments(3, torch.zeros(4), torch.ones(4))
    with pytest.raises(PassError, match="one of them"):
        by_moments.add_moments(3, torch.zeros(5))


def test_channel_sums_keep_no_tensor_per_batch(monkeypatch):
    """Waiting batches are written into one buffer allocated on the second batch and reused after
    every flush (no small tensors accumulate between a pass's activations), and the totals still
    match the data after several flushes."""
    import passes.moments as moments

    monkeypatch.setattr(moments, "_PENDING", 3)
    torch.manual_seed(0)
    batches = [torch.randn(6, 4) * 2 + 5 for _ in range(10)]
    sums = ChannelSums(1)
    sums.update(batches[0])
    sums.update(batches[1])
    buffer = sums._wait.data_ptr()
    for b in batches[2:]:
        sums.update(b)
        assert sums._wait.data_ptr() == buffer and sums._waiting < 3
    data = torch.cat(batches).double()
    torch.testing.assert_close(sums.mean, data.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums.var, data.var(0, correction=0), rtol=1e-5, atol=0)


def test_channel_sums_batch_moments_are_the_latest_batch_about_the_shift():
    """The latest batch's own mean and variance (what a reset normalises with on its sums path),
    at mean 100 / std 3 where a shift is taken: equal to the batch's, not to the running totals."""
    torch.manual_seed(0)
    sums = ChannelSums(1)
    with pytest.raises(PassError, match="no batch"):
        sums.batch_moments()
    first, second = torch.randn(50, 4) * 3 + 100, torch.randn(40, 4) * 2 + 90
    sums.update(first)
    assert sums.shift is not None
    sums.update(second)
    mean, var = sums.batch_moments()
    torch.testing.assert_close(mean, second.double().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, second.double().var(0, correction=0), rtol=1e-4, atol=0)
    both = torch.cat([first, second]).double()
    torch.testing.assert_close(sums.mean, both.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums.var, both.var(0, correction=0), rtol=1e-5, atol=0)


def test_shift_choices_decide_every_shift_as_each_sums_alone_would():
    """A calibration pass hands its sums to one ``ShiftChoices`` and decides them all at once:
    the same shifts, bit for bit, as each ``ChannelSums.calibrate`` deciding alone, for rows,
    columns and conv maps, float32 and float64, a replicated index, channels with a large mean
    (a shift) and without (none), and a pair of row tensors (``pair_calibrate``)."""
    from passes.moments import PairScratch, ShiftChoices, pair_calibrate

    g = torch.Generator().manual_seed(0)

    def values(shape, offset, dtype):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + offset
        return x.to(dtype)

    cases = []  # (dim, index, x)
    for dtype in (torch.float32, torch.float64):
        for offset in (0.0, 100.0):
            cases += [(-1, None, values((7, 5), offset, dtype)), (1, None, values((3, 4, 6, 2), offset, dtype)),
                      (0, None, values((6, 9), offset, dtype)),
                      (1, torch.tensor([[0, 2], [1, 3]]), values((5, 4), offset, dtype))]
    large = values((4, 3), 0.0, torch.float32)
    large[:, 1] += 1000.0  # one channel far from zero: the whole tensor is shifted
    cases.append((-1, None, large))
    alone, together, choices = [], [], ShiftChoices()
    for dim, index, x in cases:
        a, b = ChannelSums(dim, index), ChannelSums(dim, index)
        a.calibrate(x)
        b.calibrate(x, choices)
        assert not b.decided  # held until ``decide``
        alone.append(a)
        together.append(b)
    ra, rb = values((8, 6), 50.0, torch.float32), values((8, 6), 0.0, torch.float32)
    pa, pb = ChannelSums(-1), ChannelSums(-1)
    qa, qb = ChannelSums(-1), ChannelSums(-1)
    assert pair_calibrate(pa, pb, ra, rb, PairScratch())
    assert pair_calibrate(qa, qb, ra, rb, PairScratch(), choices)
    alone += [pa, pb]
    together += [qa, qb]
    choices.decide()
    shifted = 0
    for a, b in zip(alone, together):
        assert b.decided and (a.shift is None) == (b.shift is None)
        if a.shift is not None:
            shifted += 1
            assert a.shift.dtype == b.shift.dtype and torch.equal(a.shift, b.shift)
            assert b.shift._base is None  # its own tensor, not a view of the choices' working one
    assert 0 < shifted < len(alone)  # both outcomes were tested
    choices.decide()  # holds nothing any more: a second decide changes nothing
    assert all(b.decided for b in together)


def test_moments_all_reads_every_sums_as_it_reads_itself():
    """``moments.moments_all`` reads sums of one channel count together: every mean and variance
    equals, bit for bit, that sums' own ``moments()``; shifted and unshifted sums, float32 and
    float64 data, other counts, a channel count seen once; a sums without samples raises as its
    own ``moments`` does."""
    from passes import PassError
    from passes.moments import moments_all

    g = torch.Generator().manual_seed(0)
    sums = []
    for c, n, offset, dtype in [(5, 7, 0.0, torch.float32), (5, 3, 200.0, torch.float32), (5, 9, 0.0, torch.float64),
                                (5, 4, -50.0, torch.float64), (3, 6, 0.0, torch.float32), (3, 6, 80.0, torch.float32),
                                (7, 5, 1.0, torch.float32)]:
        s = ChannelSums(-1)
        for _ in range(2):
            s.update((torch.randn(n, c, generator=g, dtype=torch.float64) * 2 + offset).to(dtype))
        sums.append(s)
    assert any(s.shift is not None for s in sums) and any(s.shift is None for s in sums)
    for s, (mean, var) in zip(sums, moments_all(sums)):
        own_mean, own_var = s.moments()
        assert torch.equal(mean, own_mean) and torch.equal(var, own_var)
    with pytest.raises(PassError, match="no samples"):
        moments_all(sums[:2] + [ChannelSums(-1, channels=5)])


def test_correlations_together_are_each_correlation_bit_for_bit(monkeypatch):
    """``moments.correlations_together`` takes the small correlations of one shape together: each
    equals, bit for bit, its own ``correlation(covariance(...))``; sums about shifts far from 0,
    dead channels, other counts, a stack made in parts (``_STACKED``). A part of one, a shape
    seen once and a matrix wider than ``_SMALL_CORR`` come back None (the caller makes them)."""
    from passes.moments import correlation, correlations_together, covariance

    monkeypatch.setattr(moments, "_STACKED", 2 * 6 * 4)  # parts of two 6 x 4 matrices
    g = torch.Generator().manual_seed(0)
    items, expected = [], []
    for ca, cb, n, offset in [(6, 4, 7, 0.0), (6, 4, 9, 150.0), (6, 4, 5, -40.0), (6, 4, 8, 0.0), (6, 4, 6, 3.0),
                              (5, 5, 7, 0.0), (300, 300, 4, 0.0)]:
        cm = CrossMoments(ca, cb)
        for _ in range(2):
            xa = torch.randn(ca, n, generator=g) * 2 + offset
            xa[0] = 1.5  # a dead channel of A
            xb = torch.randn(cb, n, generator=g) + offset
            xb[-1] = -2.0  # and of B
            cm.update(xa, xb)
        items.append((cm.sab, cm.a, cm.b, cm.var_a, cm.var_b))
        expected.append(correlation(covariance(cm.a, cm.b, cm.sab), cm.var_a, cm.var_b, 1e-6))
    assert items[1][1].shift is not None and items[2][2].shift is not None  # sums about their shifts
    got = correlations_together(items, 1e-6)
    assert [k for k, c in enumerate(got) if c is None] == [4, 5, 6]
    for c, e in zip(got[:4], expected):
        assert torch.equal(c, e)
        assert c[0].abs().sum() == 0 and c[:, -1].abs().sum() == 0 and c.abs().max() > 0.1


@pytest.mark.parametrize("shape", [(2048, 2816), (9, moments._SMALL // 4 + 3), (100, 7)])
def test_sums_of_squares_of_large_rows_in_blocks(shape):
    """A rows matrix too large to square at once is squared block by block (each block at most
    ``_SMALL`` elements) and each block's column sums added in order: the sums of squares to
    float32 rounding, and the sum of the blocks' own products bit for bit; what fits is squared
    whole, as before."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=gen) * 3 + 1
    got = moments._sum_of_squares(t)
    truth = (t.double() ** 2).sum(0)
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    torch.testing.assert_close(got.double(), truth, rtol=2e-6, atol=0)
    rows = max(1, moments._SMALL // shape[1])
    blocks = [t[i:i + rows] for i in range(0, shape[0], rows)]
    want = None
    for b in blocks:
        part = torch.ones(len(b)) @ (b * b)
        want = part if want is None else want + part
    assert torch.equal(got, want)
    assert (len(blocks) > 1) == (t.numel() > moments._SMALL)
    # through ChannelSums: S2 of the batch is these sums
    sums = moments.ChannelSums(1)
    sums.decided = True  # no shift: the sums of x itself
    sums.update(t)
    torch.testing.assert_close(sums.s2, got.double(), rtol=0, atol=0)


def test_correlation_zeroes_dead_rows_and_columns_whatever_the_covariance_holds():
    # channels 1 of A and 2 of B never vary: their rows / columns are 0, even where the
    # covariance holds NaN or infinity; the rest is cov / (std_a std_b), clamped to [-1, 1]
    torch.manual_seed(0)
    cov = torch.randn(4, 5, dtype=torch.float64)
    var_a = torch.tensor([2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    var_b = torch.tensor([1.0, 4.0, 0.0, 0.25, 9.0], dtype=torch.float64)
    cov[1, 3] = float("nan")
    cov[0, 2] = float("inf")
    cov[3, 4] = 100.0  # beyond what a covariance can be: clamped
    got = moments.correlation(cov, var_a, var_b, 1e-12)
    want = cov / np.sqrt(var_a.numpy())[:, None] / np.sqrt(var_b.numpy())[None, :]
    want[1, :] = 0.0
    want[:, 2] = 0.0
    want = want.clamp(-1.0, 1.0)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[3, 4] == 1.0
    assert bool((got[1] == 0).all()) and bool((got[:, 2] == 0).all())
    # the covariance given is not changed
    assert torch.isnan(cov[1, 3]) and cov[3, 4] == 100.0


def test_without_grad_turns_gradients_off_inside_only():
    w = torch.ones(3, requires_grad=True)

    @moments.without_grad
    def scaled(x):
        """doc"""
        return x * w, torch.is_grad_enabled()

    y, inside = scaled(torch.ones(3))
    assert not inside and not y.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        y, inside = scaled(torch.ones(3))
        assert not inside and not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and scaled.__name__ == "scaled" and scaled.__doc__ == "doc"
    # a tap called with gradients on (outside a pass) records no graph either
    from passes.pair_tap import PairTap, TapView
    tap = PairTap([TapView(1, None, True)], shape=(4, 3))
    a = torch.randn(4, 3, requires_grad=True)
    tap(a * 2, a * 3)
    assert not tap.moments(0)[0].s1.requires_grad and not tap.cov(0).requires_grad
