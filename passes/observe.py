"""Observers: identity modules after chosen nodes that stream each node's per-channel mean and
variance (``passes.moments.ChannelSums``), and the pass that inserts them.

``insert_observers(gm, {node: ObserverSpec(dim, index, keep)})`` puts a ``ChannelObserver`` after
each node; ``observers(gm)`` finds them again by the metadata the pass leaves on the nodes it
inserted (``node.meta["graphrepair"]``). With ``keep`` an observer also holds the latest batch's
channel matrix (``.last``), e.g. to compare two models' features batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule

from passes.base import PassResult, finish, graph_pass, start
from passes.errors import PassError
from passes.moments import ChannelSums, channel_matrix
from passes.modules import insert_module_after, inserted_modules, module_device, named_nodes

OBSERVER_PREFIX = "_gr_obs"


class ChannelObserver(nn.Module):
    """Identity module that accumulates per-channel count, mean and variance of its input
    (``ChannelSums``; see the module doc).

    ``dim`` is the channel axis; ``index`` (C, R) groups positions along it (see ``channel_matrix``).
    With ``keep=True`` the channel matrix of the latest batch (activation dtype, never a view of
    the activation, so later in-place ops cannot change it) is kept in ``.last``, overwritten each
    batch. ``source`` names the graph node observed (set by ``insert_observers``).
    """

    def __init__(self, dim: int, index: torch.Tensor | None = None, keep: bool = False, source: str = "",
                 channels: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.keep = keep
        self.channels = channels  # known before any batch: see ``raw_totals``
        self.enabled = True
        self.source = source
        self.register_buffer("index", None if index is None else index.long(), persistent=False)
        self.last: torch.Tensor | None = None
        self.sums = self._new_sums()

    @property
    def count(self) -> int:
        return self.sums.n

    def reset_stats(self) -> None:
        """Forget every batch seen so far."""
        self.sums = self._new_sums()
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.update(x)
        return x

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add one batch to the statistics (what ``forward`` does when enabled)."""
        if not isinstance(x, torch.Tensor):
            raise PassError(
                f"observer at node {self.source!r} received a {type(x).__name__}, not a tensor; "
                "observe a node whose value is a single tensor"
            )
        x = x.detach()
        if not self.keep:
            self.sums.update(x)
            return
        # the kept channel matrix is gathered once and the sums are taken over it (its rows)
        m = channel_matrix(x, self.dim, self.index)
        self.last = m.clone() if m.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else m
        self.sums.update(self.last)

    def _new_sums(self) -> ChannelSums:
        channels = self.channels if self.index is None else int(self.index.shape[0])
        return ChannelSums(0, channels=channels) if self.keep else ChannelSums(self.dim, self.index, channels)

    def raw_totals(self) -> list[torch.Tensor]:
        """The sums about zero (``ChannelSums.raw_totals``); ``load_raw_totals`` takes them back."""
        return self.sums.raw_totals()

    def load_raw_totals(self, parts: list[torch.Tensor]) -> None:
        self.sums.load_raw_totals(parts)

    def _need_data(self) -> None:
        if self.count == 0:
            raise PassError(
                f"observer at node {self.source!r} has seen no data; run the model on some batches "
                "with the observer enabled first"
            )

    @property
    def num_channels(self) -> int:
        self._need_data()
        return int(self.sums.s1.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean (float64, (C,))."""
        self._need_data()
        return self.sums.mean

    @property
    def var(self) -> torch.Tensor:
        """Per-channel population variance (float64, (C,))."""
        self._need_data()
        return self.sums.var

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, source={self.source!r}, keep={self.keep}, count={self.count}"


@dataclass(frozen=True)
class ObserverSpec:
    """Where to observe: channel axis ``dim``, optional (C, R) ``index``, keep the last batch;
    ``channels``, when known, lets an observer that sees no batch give totals of the right size."""

    dim: int
    index: torch.Tensor | None = None
    keep: bool = False
    channels: int | None = None



@graph_pass(in_place=False)
def insert_observers(
    gm: GraphModule, points: dict[str, ObserverSpec], inplace: bool = False
) -> PassResult:
    """Insert a ChannelObserver after each node named in ``points``.

    counts: {"observers": number inserted}. Look the observers up with ``observers(gm)``.
    """
    gm = start(gm, inplace, "insert_observers")
    nodes = named_nodes(gm, points, "insert_observers")
    device = module_device(gm)
    for name, spec in points.items():
        index = None if spec.index is None else spec.index.to(device)
        observer = ChannelObserver(spec.dim, index=index, keep=spec.keep, source=name, channels=spec.channels)
        insert_module_after(gm, nodes[name], observer, OBSERVER_PREFIX, "insert_observers")
    finish(gm)
    return PassResult(gm, bool(points), {"observers": len(points)}, [])


def observers(gm: GraphModule) -> dict[str, ChannelObserver]:
    """The observers in ``gm``'s graph, keyed by the name of the node each observes."""
    return inserted_modules(gm, ChannelObserver)

