"""The joint pass's statistics cost a fixed, small number of ops per observed node and batch
(``passes.moments``, ``passes.pair_tap``): counted with torch.profiler on the CPU (not timed)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from passes.moments import ChannelSums
from passes.pair_tap import PairTap, TapView


def _top_level_ops(tap: PairTap, batches) -> float:
    """aten ops the tap calls itself (not those inside another aten op), per batch."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for a, b in batches:
            with record_function("tap"):
                tap(a, b)
    count = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p, chain = e.cpu_parent, []
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if "tap" in chain and not any(n.startswith("aten::") for n in chain[:chain.index("tap")]):
            count += 1
    return count / len(batches)


def _same_order() -> bool:
    """Whether this CPU's BLAS gives each column of ones @ X the same sum whatever X's width: a
    tap's pair of sides (``moments.pair_update``: ones @ [A | B | A^2 | B^2]) then sums exactly
    what each side's own ``ChannelSums`` sums (ones @ A), as on the machines this was first
    measured on; MKL on an AVX-512 machine sums the columns past the last full 16-wide block in
    another order (seen on widths 6 and 24), and the two agree to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    for n, c in ((32, 6), (500, 24), (600, 70), (64, 32)):
        x = torch.randn(n, 4 * c, generator=g) + 5.0
        if not torch.equal(torch.ones(n) @ x[:, :c].contiguous(), torch.mm(torch.ones(1, n), x)[0, :c]):
            return False
    return True


_SAME_ORDER = _same_order()
_ROUNDING = dict(rtol=1e-5, atol=1e-6)  # float32 sums of a batch, in another order


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **_ROUNDING)


def _batches(shape, k, offset=0.0):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g) + offset, torch.randn(shape, generator=g) + offset) for _ in range(k)]


# bound: ops per side (its sums, kept in the waiting buffer); the cross products take up to 4 more
@pytest.mark.parametrize("shape, dim, bound", [((64, 32), 1, 8), ((4, 8, 16, 16), 1, 9)])
@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: mean large against the spread, summed about a shift
def test_ops_per_batch_do_not_grow_with_kept_batches(shape, dim, bound, offset):
    """One side's sums (and the cross products) take a bounded number of ops; keeping every
    batch's moments for REPAIR's goals adds one (the batch's sums copied into the kept rows,
    ``pair_tap.KeptBatches``), however many batches were kept before."""
    plain = PairTap([TapView(dim, None, True)], shape=shape)
    kept = PairTap([TapView(dim, None, True)], shape=shape)
    kept.keep_batches(0)
    for tap in (plain, kept):
        tap(*_batches(shape, 1, offset)[0])  # the first batch allocates the waiting buffers
    batches = _batches(shape, 4, offset)
    n_plain, n_kept = _top_level_ops(plain, batches), _top_level_ops(kept, batches)
    assert n_kept == n_plain + 1
    for _ in range(3):  # past the kept rows' first 16 (the buffer doubles): still one more op
        for a, b in _batches(shape, 6, offset):
            plain(a, b)
            kept(a, b)
    assert _top_level_ops(kept, batches) == _top_level_ops(plain, batches) + 1
    assert len(kept.per_batch[0].counts) == 1 + 4 + 18 + 4
    assert n_plain <= 2 * bound + 4 + (4 if offset else 0)  # the shift: a view and a subtraction per side


def test_kept_batch_moments_are_each_batchs_own():
    shape = (32, 6)
    tap = PairTap([TapView(1, None, True)], shape=shape)
    tap.keep_batches(0)
    batches = _batches(shape, 5, offset=20.0)
    for a, b in batches:
        tap(a, b)
    got = tap.batch_moments(0)
    assert len(got) == 5
    for (a, b), (ma, va, mb, vb) in zip(batches, got):
        for x, m, v in ((a, ma, va), (b, mb, vb)):
            torch.testing.assert_close(m, x.double().mean(0), rtol=0, atol=1e-5)
            torch.testing.assert_close(v, x.double().var(0, correction=0), rtol=1e-5, atol=1e-6)
    # the same as each batch's moments read right after it (``ChannelSums.batch_moments``): the
    # tap sums both sides in one product, each side alone in its own (see ``_same_order``)
    alone = ChannelSums(1)
    for a, _ in batches:
        alone.update(a)
    _same(got[-1][0], alone.batch_moments()[0], exact=_SAME_ORDER)
    _same(got[-1][1], alone.batch_moments()[1], exact=_SAME_ORDER)


@pytest.mark.parametrize("shape, index", [((32, 6), None), ((600, 70), None),  # rows summed together
                                          ((32, 6), [[0], [2], [5]]),  # some channels: each side alone, float32 sums
                                          ((4, 6, 5, 5), None)])  # conv: each side alone, float64 sums
def test_kept_batches_are_rows_of_one_buffer_made_once_and_doubled(shape, index):
    """Kept batches are rows of one float64 buffer, made at the first batch and doubled when
    full (not a few small tensors per batch among the freed activations, which fragment glibc's
    heap); each side's latest sums are not held past the tap's call. Across the doublings each
    batch's moments stay its own: those of a ChannelSums that saw only that batch (bit for bit
    where the two take their sums by the same product, ``_SAME_ORDER``)."""
    index = None if index is None else torch.tensor(index)
    tap = PairTap([TapView(1, index, True)], shape=shape)
    tap.keep_batches(0)
    batches = _batches(shape, 40, offset=5.0)
    buffers = []
    for a, b in batches:
        tap(a, b)
        buffers.append(tap.per_batch[0]._rows)
        assert tap.sums[0][0].batch is None and tap.sums[0][1].batch is None
    assert len({id(t) for t in buffers}) == 3  # 16 rows, then 32, then 64
    assert [len(t) for t in (buffers[0], buffers[16], buffers[32])] == [16, 32, 64]
    got = tap.batch_moments(0)
    assert len(got) == 40
    sa, sb = tap.sums[0]
    for (a, b), kept in zip(batches, got):
        for x, side, m, v in ((a, sa, *kept[:2]), (b, sb, *kept[2:])):
            alone = ChannelSums(1, index)
            alone.shift, alone.decided = side.shift, True  # about the shift the tap chose
            alone.update(x)
            want_m, want_v = alone.batch_moments()
            _same(m, want_m, exact=index is not None or len(shape) > 2 or _SAME_ORDER)
            _same(v, want_v, exact=index is not None or len(shape) > 2 or _SAME_ORDER)


def test_kept_batches_keep_their_shift_after_the_totals_are_replaced():
    """A distributed run replaces the totals (``load_raw_totals``, shift dropped) after the pass:
    each kept batch is still read about the shift it was summed about."""
    shape = (32, 4)
    tap = PairTap([TapView(1, None, True)], shape=shape)
    tap.keep_batches(0)
    batches = _batches(shape, 3, offset=100.0)
    for a, b in batches:
        tap(a, b)
    assert tap.sums[0][0].shift is not None
    before = tap.batch_moments(0)
    tap.load_raw_totals(tap.raw_totals())
    assert tap.sums[0][0].shift is None
    for x, y in zip(before, tap.batch_moments(0)):
        for p, q in zip(x, y):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("shape, dim", [((64, 32), 1), ((4, 10, 32), -1), ((8, 3), 1), ((500, 24), 1)])
@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sums_of_both_sides_match_each_side_alone(shape, dim, offset, dtype):
    """Channels on the last axis (linear layers, tokens): a tap sums A's and B's rows together
    (``moments.pair_update``, one product for the four sums) into the totals, per-batch moments
    and cross products that each side's own ``ChannelSums`` gives, in fewer ops: the same
    products of the same numbers, bit for bit where the CPU's BLAS sums a column of ones @ X in
    one order whatever X's width (``_SAME_ORDER``), else to float32 rounding (and then the
    shifts, each the example's mean, may differ in their last bits: the moments do not)."""
    from passes.moments import CrossSum, covariance

    tap = PairTap([TapView(dim, None, True)], shape=shape)
    tap.keep_batches(0)
    alone = (ChannelSums(dim), ChannelSums(dim))
    cross, kept = CrossSum(), []
    batches = [tuple(x.to(dtype) for x in ab) for ab in _batches(shape, 70, offset)]  # more than one flush
    batches[-1] = tuple(x[:1] for x in batches[-1])  # a last, smaller batch
    example = tuple(x.to(dtype) for x in _batches(shape, 1, offset)[0])
    tap.calibrating = True
    tap(*example)
    tap.calibrating = False
    for s, x in zip(alone, example):
        s.calibrate(x)
    for k, (a, b) in enumerate(batches):
        tap(a, b)
        la, lb = alone[0].update(a), alone[1].update(b)
        kept.append(tuple(alone[0].batch_moments()) + tuple(alone[1].batch_moments()))
        cross.add(la, lb)
        if k == 30:  # a read in the middle of the pass
            _same(tap.moments(0)[0].mean, alone[0].mean, exact=_SAME_ORDER)
    for mine, theirs in zip(tap.moments(0), alone):
        assert mine.n == theirs.n and (mine.shift is None) == (theirs.shift is None) == (offset == 0.0)
        if _SAME_ORDER:
            assert torch.equal(mine.s1, theirs.s1) and torch.equal(mine.s2, theirs.s2)
        _same(mine.mean, theirs.mean, exact=_SAME_ORDER)
        _same(mine.var, theirs.var, exact=_SAME_ORDER)
    if _SAME_ORDER:
        assert torch.equal(tap.cross[0].total, cross.total)
    _same(tap.cov(0), covariance(*alone, cross.total), exact=_SAME_ORDER)
    for got, want in zip(tap.batch_moments(0), kept):
        for p, q in zip(got, want):
            _same(p, q, exact=_SAME_ORDER)
    if len(shape) > 1 and shape[0] > 8:  # the four sums and the cross products: at most 12 ops a batch
        assert _top_level_ops(tap, [tuple(x.to(dtype) for x in ab) for ab in _batches(shape, 4, offset)]) <= 12


@pytest.mark.parametrize("offset", [0.0, 100.0])  # 100: both sides summed about a shift
def test_kept_batch_rows_are_the_per_batch_moments_bit_for_bit(offset):
    """``PairTap.batch_rows``: every kept batch's (mean A, var A, mean B, var B) as four (batches, C)
    tensors, the same numbers as ``batch_moments`` and as each side's own ``moments_of_sums``."""
    shape = (32, 6)
    tap = PairTap([TapView(1, None, True)], shape=shape)
    tap.keep_batches(0)
    for a, b in _batches(shape, 5, offset):
        tap(a, b)
    rows = tap.batch_rows(0)
    assert len(rows) == 4 and all(r.shape == (5, 6) and r.dtype == torch.float64 for r in rows)
    per_batch = tap.batch_moments(0)
    assert len(per_batch) == 5
    for t, kept in enumerate(per_batch):
        for r, x in zip(rows, kept):
            assert torch.equal(r[t], x)
    kept = tap.per_batch[0]
    s = kept._rows[:5]
    assert (kept.shifts[0] is not None) is (offset > 0)
    for side, (m, v) in enumerate((rows[:2], rows[2:])):
        want_m, want_v = ChannelSums.moments_of_sums(kept.counts, s[:, side], s[:, 2 + side], kept.shifts[side])
        assert torch.equal(m, want_m) and torch.equal(v, want_v)
    assert PairTap([TapView(1, None, True)], shape=shape).batch_rows(0) is None
