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
from passes.moments import ChannelSums, CrossSum, PairScratch, covariance, cross_raw_total, pair_calibrate, pair_update


@dataclass(frozen=True)
class TapView:
    """What a ``PairTap`` measures on its node: channel axis ``dim`` (a tuple of axes: their
    product, flattened in order, is the channel axis), optional (C, R) ``index``, and whether to
    keep the A-B cross products (``cross``)."""

    dim: int | tuple
    index: torch.Tensor | None = None
    cross: bool = False


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
        self.calibrating = False  # forward chooses the sums' shifts instead of adding a batch
        # view -> per batch the sums of A and of B (``ChannelSums.batch``) and their shifts, for the views
        # ``keep_batches`` names (REPAIR's reset points: the goal of each batch, see
        # graphrepair.merging.merge); turned into moments when read (``batch_moments``)
        self.per_batch: dict[int, list[tuple]] = {}

    def keep_batches(self, i: int) -> None:
        """Keep view ``i``'s mean and variance of every batch, of A and of B."""
        self.per_batch.setdefault(i, [])

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise PassError(f"the tap at node {self.source!r} received a {type(a).__name__}, not a "
                            "tensor; tap a node whose value is a single tensor")
        if self.calibrating:  # ``ChannelSums.calibrate``: the shifts, nothing counted
            for sa, sb in self.sums:
                if not pair_calibrate(sa, sb, a, b, self.scratch):
                    sa.calibrate(a)
                    sb.calibrate(b)
            return
        for i, (v, (sa, sb)) in enumerate(zip(self.views, self.sums)):
            both = pair_update(sa, sb, a, b, self.scratch)
            if both is None:
                la, lb = sa.update(a), sb.update(b)
                if i in self.per_batch:
                    self.per_batch[i].append((sa.batch, sa.shift, sb.batch, sb.shift))
            else:
                la, lb, sums = both
                if i in self.per_batch:  # [S1_a, S1_b, S2_a, S2_b] of the batch: split when read
                    self.per_batch[i].append((a.numel() // a.shape[-1], sums, sa.shift, sb.shift))
            if v.cross:
                self.cross[i].add(la, lb)

    def moments(self, i: int) -> tuple[ChannelSums, ChannelSums]:
        return self.sums[i]

    def batch_moments(self, i: int) -> list[tuple[torch.Tensor, ...]]:
        """Per batch seen by view ``i`` (``keep_batches``): (mean A, var A, mean B, var B), float64."""
        kept = self.per_batch.get(i, [])
        if not kept:
            return []
        # the shifts are chosen before the first batch and kept (``load_raw_totals`` may drop
        # them after the pass: each batch is read about the shift it was summed about)
        if all(isinstance(k[0], int) for k in kept):  # summed together (``pair_update``): one stack
            sums = torch.stack([k[1] for k in kept]).view(len(kept), 2, 2, -1)  # (k, S1 | S2, A | B, C)
            counts = [k[0] for k in kept]
            ma, va = ChannelSums.moments_of_sums(counts, sums[:, 0, 0], sums[:, 1, 0], kept[0][2])
            mb, vb = ChannelSums.moments_of_sums(counts, sums[:, 0, 1], sums[:, 1, 1], kept[0][3])
        else:
            sides = [self._sides(k) for k in kept]
            ma, va = ChannelSums.moments_of([k[0] for k in sides], sides[0][1])
            mb, vb = ChannelSums.moments_of([k[2] for k in sides], sides[0][3])
        return list(zip(ma.unbind(0), va.unbind(0), mb.unbind(0), vb.unbind(0)))

    @staticmethod
    def _sides(kept: tuple) -> tuple:
        """A kept batch as ((n, S1_a, S2_a), shift A, (n, S1_b, S2_b), shift B)."""
        if not isinstance(kept[0], int):  # (sa.batch, shift A, sb.batch, shift B) already
            return kept
        n, sums, ka, kb = kept
        s = sums.view(2, 2, -1)
        return (n, s[0, 0], s[1, 0]), ka, (n, s[0, 1], s[1, 1]), kb

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
        total = None if self.cross[i] is None else self.cross[i].total
        if total is None:
            raise PassError(f"the tap at node {self.source!r} has no cross products for view {i}")
        return covariance(*self.sums[i], total)


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
