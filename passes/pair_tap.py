"""The tap of a paired graph (``passes.pair``): called with the same node's value in models A and B,
it streams per-channel sums of each and, where asked, the A-B cross products X_a X_b^T
(``passes.moments``), so that covariances and correlations of the two models come from one pass
with no activation held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from passes.errors import PassError
from passes.moments import (ChannelSums, CrossSum, PairScratch, ShiftChoices, covariance, cross_raw_total, pair_calibrate,
                            pair_update, without_grad)


@dataclass(frozen=True)
class TapView:
    """What a ``PairTap`` measures on its node: channel axis ``dim`` (a tuple of axes: their
    product, flattened in order, is the channel axis), optional (C, R) ``index``, and whether to
    keep the A-B cross products (``cross``)."""

    dim: int | tuple
    index: torch.Tensor | None = None
    cross: bool = False


class KeptBatches:
    """The sums of every batch one view of a ``PairTap`` saw, of A and of B, kept for REPAIR's
    per-batch goals: each batch's example count, and its S1 and S2 of A and of B as one row,
    [S1_a, S1_b, S2_a, S2_b] (4, C), of a float64 buffer (widening the sums is exact, and their
    moments are taken in float64: the same moments as from the sums themselves).

    The buffer is made at the first batch and doubled when full, so the pass does not leave a
    few small tensors per batch among the large ones it frees (nor does a tap hold each side's
    latest sums until the next batch: ``PairTap.forward``). Such long-lived small blocks split the
    heap's freed activations, glibc then cannot fit the next batch's activations in them, and the
    heap grows instead, each new page faulted in. The BN ResNet20 of width 2, 5,000 examples, one
    merge (a throwaway script reading glibc's ``mallinfo2``, at most 0.5 GB in use throughout):
    with a tensor per kept batch and the latest sums held, 6.3 GB of heap, 1.64 M page faults,
    44 s; kept rows only, 3.4 GB, 0.96 M, 35 s; both, 1.0 GB, 0.12 - 0.24 M, 34 - 35 s. The
    price is one copy per kept view and batch.
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        # A's and B's shifts, as chosen before the first batch and kept for every batch (a distributed
        # run's ``load_raw_totals`` may drop the sums' own after the pass)
        self.shifts: tuple = (None, None)
        self._rows: torch.Tensor | None = None  # (capacity, 4, C) float64
        self._views: tuple = ()  # its rows as (4, C) and as (1, 4C) views, made with the buffer

    def row(self, n: int, shift_a, shift_b, like: torch.Tensor, flat: bool = False) -> torch.Tensor:
        """The (4, C) row for the next batch, of ``n`` examples, on ``like``'s device (C: the
        last axis of ``like``, (C,) or (1, 4C)); ``flat``: as (1, 4C). Views made with the buffer:
        no op per batch."""
        k = len(self.counts)
        if self._rows is None or k == self._rows.shape[0]:
            c = like.shape[-1] // 4 if flat else like.shape[-1]
            grown = torch.empty((max(16, 2 * k), 4, c), dtype=torch.float64, device=like.device)
            if k:
                grown[:k].copy_(self._rows)
            self._rows = grown
            self._views = (grown.unbind(0), grown.view(grown.shape[0], 1, 4 * c).unbind(0))
        if not k:
            self.shifts = (shift_a, shift_b)
        self.counts.append(n)
        return self._views[flat][k]

    def moments(self) -> list[tuple[torch.Tensor, ...]]:
        """Per batch: (mean A, var A, mean B, var B), float64."""
        rows = self.rows()
        return [] if rows is None else list(zip(*(r.unbind(0) for r in rows)))

    def rows(self) -> tuple[torch.Tensor, ...] | None:
        """(mean A, var A, mean B, var B), float64, each (batches, C): row t is batch t's (what
        ``moments`` gives batch by batch); None before any batch. A's and B's are taken together
        by ``ChannelSums.moments_of_sums``, each side's shift added after: the same float64
        operations on the same numbers as for each side alone."""
        if not self.counts:
            return None
        s = self._rows[:len(self.counts)]
        m, var = ChannelSums.moments_of_sums(self.counts, s[:, :2], s[:, 2:], None)  # (k, A | B, C)
        for side, shift in enumerate(self.shifts):
            if shift is not None:
                m[:, side] += shift.double()
        return m[:, 0], var[:, 0], m[:, 1], var[:, 1]


class PairTap(nn.Module):
    """Called with the same node's value in models A and B (``passes.pair``): per view, the
    per-channel sums of A and of B, and with ``cross`` the float64 sum of X_a X_b^T.
    Read the results with ``moments(i)`` -> (ChannelSums A, ChannelSums B) and ``cov(i)``.
    ``shape``: the shape of the tapped value (any batch size), so that each view knows its channel
    count before any batch (``raw_totals`` of a tap that saw none)."""

    def __init__(self, views: list[TapView], source: str = "", shape: tuple | None = None,
                 scratch: PairScratch | None = None) -> None:
        super().__init__()
        self.views = list(views)
        self.source = source
        # the working buffer of A's and B's rows (``moments.pair_update``), shared by the taps of one pass
        self.scratch = PairScratch() if scratch is None else scratch
        self.sums = [tuple(ChannelSums(v.dim, v.index, _channels(v, shape)) for _ in "ab") for v in self.views]
        self.cross = [CrossSum() if v.cross else None for v in self.views]
        # forward chooses the sums' shifts instead of adding a batch: True, each now; a
        # ``moments.ShiftChoices``, all of a pass's together when it decides
        self.calibrating: bool | ShiftChoices = False
        # view -> the sums of A and of B of every batch, for the views ``keep_batches`` names (REPAIR's
        # reset points: the goal of each batch, see graphrepair.merging.merge); turned into moments
        # when read (``batch_moments``)
        self.per_batch: dict[int, KeptBatches] = {}

    def keep_batches(self, i: int) -> None:
        """Keep view ``i``'s mean and variance of every batch, of A and of B."""
        self.per_batch.setdefault(i, KeptBatches())

    @without_grad
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise PassError(f"the tap at node {self.source!r} received a {type(a).__name__}, not a "
                            "tensor; tap a node whose value is a single tensor")
        if self.calibrating:  # ``ChannelSums.calibrate``: the shifts, nothing counted
            choices = self.calibrating if isinstance(self.calibrating, ShiftChoices) else None
            for sa, sb in self.sums:
                if not pair_calibrate(sa, sb, a, b, self.scratch, choices):
                    sa.calibrate(a, choices)
                    sb.calibrate(b, choices)
            return
        for i, (v, (sa, sb)) in enumerate(zip(self.views, self.sums)):
            both = pair_update(sa, sb, a, b, self.scratch)
            kept = self.per_batch.get(i)
            if both is None:
                la, lb = sa.update(a), sb.update(b)
                if kept is not None:
                    (n, s1a, s2a), (_, s1b, s2b) = sa.batch, sb.batch
                    torch.stack([s1a, s1b, s2a, s2b], out=kept.row(n, sa.shift, sb.shift, s1a))
                # not held until the next batch, among its activations (see ``KeptBatches``)
                sa.batch = sb.batch = None
            else:
                la, lb, sums = both
                if kept is not None:  # [S1_a, S1_b, S2_a, S2_b] of the batch
                    kept.row(a.numel() // a.shape[-1], sa.shift, sb.shift, sums, flat=True).copy_(sums)
            if v.cross:
                self.cross[i].add(la, lb)

    def moments(self, i: int) -> tuple[ChannelSums, ChannelSums]:
        return self.sums[i]

    def batch_moments(self, i: int) -> list[tuple[torch.Tensor, ...]]:
        """Per batch seen by view ``i`` (``keep_batches``): (mean A, var A, mean B, var B), float64."""
        kept = self.per_batch.get(i)
        return [] if kept is None else kept.moments()

    def batch_rows(self, i: int) -> tuple[torch.Tensor, ...] | None:
        """``batch_moments(i)`` as four (batches, C) tensors (``KeptBatches.rows``); None when view
        ``i`` kept no batch."""
        kept = self.per_batch.get(i)
        return None if kept is None else kept.rows()

    def raw_totals(self) -> list[torch.Tensor]:
        """Every sum of the tap about zero, view by view (A's, B's, the cross products): what
        adds exactly across streams (``passes.moments``); ``load_raw_totals`` takes them back."""
        parts = []
        for (sa, sb), cross in zip(self.sums, self.cross):
            parts += sa.raw_totals() + sb.raw_totals()
            if cross is not None:
                parts.append(cross_raw_total(sa, sb, cross))
        return parts

    def load_raw_totals(self, parts: list[torch.Tensor]) -> None:
        parts = list(parts)
        for (sa, sb), cross in zip(self.sums, self.cross):
            sa.load_raw_totals(parts[:3])
            sb.load_raw_totals(parts[3:6])
            del parts[:6]
            if cross is not None:
                cross.load_total(parts.pop(0))

    def drop_cross(self, i: int) -> None:
        """Free view ``i``'s cross products once they have been read (a wide layer's take tens
        of megabytes: freeing each as soon as its correlation exists keeps the two from adding up
        over a whole model); ``cov(i)`` raises afterwards."""
        if self.cross[i] is not None:
            self.cross[i] = None

    def cov(self, i: int) -> torch.Tensor:
        """A-B cross-covariance of view ``i`` (float64)."""
        return covariance(*self.sums[i], self.cross_total(i))

    def cross_total(self, i: int) -> torch.Tensor:
        """The float64 sum of view ``i``'s cross products about the shifts (what ``cov`` reads)."""
        total = None if self.cross[i] is None else self.cross[i].total
        if total is None:
            raise PassError(f"the tap at node {self.source!r} has no cross products for view {i}")
        return total


def _channels(view: TapView, shape: tuple | None) -> int | None:
    if view.index is not None:
        return int(view.index.shape[0])
    if shape is None:
        return None
    if isinstance(view.dim, tuple):
        c = 1
        for d in view.dim:
            c *= shape[d]
        return c
    return shape[view.dim]
