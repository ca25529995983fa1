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
from passes.moments import ChannelSums, CrossSum, covariance


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
    Read the results with ``moments(i)`` -> (ChannelSums A, ChannelSums B) and ``cov(i)``."""

    def __init__(self, views: list[TapView], source: str = "") -> None:
        super().__init__()
        self.views = list(views)
        self.source = source
        self.sums = [(ChannelSums(v.dim, v.index), ChannelSums(v.dim, v.index)) for v in self.views]
        self.cross = [CrossSum() if v.cross else None for v in self.views]

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise PassError(f"the tap at node {self.source!r} received a {type(a).__name__}, not a "
                            "tensor; tap a node whose value is a single tensor")
        for i, (v, (sa, sb)) in enumerate(zip(self.views, self.sums)):
            la, lb = sa.update(a), sb.update(b)
            if v.cross:
                self.cross[i].add(la, lb)

    def moments(self, i: int) -> tuple[ChannelSums, ChannelSums]:
        return self.sums[i]

    def cov(self, i: int) -> torch.Tensor:
        """A-B cross-covariance of view ``i`` (float64)."""
        total = None if self.cross[i] is None else self.cross[i].total
        if total is None:
            raise PassError(f"the tap at node {self.source!r} has no cross products for view {i}")
        return covariance(*self.sums[i], total)
