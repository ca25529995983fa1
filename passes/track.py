"""Per-channel statistics of intermediate tensors, streamed in float64 on the tensor's device.

Channel matrix. For a tensor x and a channel axis ``dim`` (1 for NCHW conv outputs, -1 for
linear outputs and channels-last layouts), ``channel_matrix(x, dim)`` moves ``dim`` to the front
and flattens every other axis into samples: X (C, N) with N = x.numel() / C. With ``index``
(LongTensor (C, R) of positions along ``dim``) channel c is made of the R positions index[c, :]
(e.g. one unit replicated over R heads), each replica giving extra samples: X (C, R*N).

Moments of one tensor (``ChannelObserver``). With a per-channel shift k_c taken from the first
batch (any value near the mean avoids the cancellation of sum(x^2) - n mean^2 in float64),
over all n samples seen:

    S1_c = sum (x - k_c),  S2_c = sum (x - k_c)^2
    mean_c = k_c + S1_c / n,   var_c = S2_c / n - (S1_c / n)^2   (population variance)

Cross moments of two tensors (``CrossMoments``), e.g. the same point in models A and B fed the
same batch, X_a (Ca, N), X_b (Cb, N), shifted by k_a, k_b:

    cov = (sum (x_a - k_a)(x_b - k_b)^T) / n - (S1_a / n)(S1_b / n)^T        (Ca, Cb)
    corr_ij = cov_ij / (std_a_i std_b_j), and 0 where either std is <= eps (never NaN)

Nothing is stored across batches except these sums: memory O(C) per observer, O(Ca*Cb) per
cross-moment table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule

from passes.base import PassResult, finish, start
from passes.errors import PassError
from passes.modules import get_module, insert_module_after, module_device

OBSERVER_PREFIX = "_gr_obs"


def channel_matrix(
    x: torch.Tensor,
    dim: int,
    index: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x`` as a (C, samples) matrix with channels along axis ``dim`` (see the module doc)."""
    if not isinstance(x, torch.Tensor):
        raise PassError(f"channel_matrix needs a tensor, got {type(x).__name__}")
    if x.ndim == 0:
        raise PassError("channel_matrix needs a tensor with at least one axis, got a scalar")
    if not -x.ndim <= dim < x.ndim:
        raise PassError(f"channel axis {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    m = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    if index is not None:
        if index.ndim != 2:
            raise PassError(f"index must be a (C, R) LongTensor of positions, got shape {tuple(index.shape)}")
        index = index.to(device=m.device, dtype=torch.long)
        m = m[index].reshape(index.shape[0], -1)  # (C, R, N) -> (C, R*N)
    return m if dtype is None else m.to(dtype)


class ChannelObserver(nn.Module):
    """Identity module that accumulates per-channel count, mean and variance of its input.

    ``dim`` is the channel axis; ``index`` (C, R) groups positions along it (see the module doc).
    With ``keep=True`` the float64 channel matrix of the latest batch is kept in ``.last``
    (overwritten each batch) so that a caller can update a ``CrossMoments`` table.
    ``source`` names the graph node observed (set by ``insert_observers``).
    """

    def __init__(
        self,
        dim: int,
        index: torch.Tensor | None = None,
        keep: bool = False,
        source: str = "",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.keep = keep
        self.enabled = True
        self.source = source
        self.register_buffer("index", None if index is None else index.long(), persistent=False)
        self.last: torch.Tensor | None = None
        self.count = 0
        self.register_buffer("shift", None, persistent=False)
        self.register_buffer("sum", None, persistent=False)
        self.register_buffer("sum_sq", None, persistent=False)

    def reset_stats(self) -> None:
        """Forget every batch seen so far."""
        self.count = 0
        self.shift = self.sum = self.sum_sq = None
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
        m = channel_matrix(x.detach(), self.dim, self.index, dtype=torch.float64)
        if self.sum is None:
            self.shift = m.mean(dim=1)
            self.sum = torch.zeros_like(self.shift)
            self.sum_sq = torch.zeros_like(self.shift)
        elif m.shape[0] != self.sum.shape[0]:
            raise PassError(
                f"observer at node {self.source!r} saw {m.shape[0]} channels along axis {self.dim}, "
                f"earlier batches had {self.sum.shape[0]}"
            )
        d = m - self.shift[:, None]
        self.sum += d.sum(dim=1)
        self.sum_sq += (d * d).sum(dim=1)
        self.count += m.shape[1]
        self.last = m if self.keep else None

    def _need_data(self) -> None:
        if self.count == 0:
            raise PassError(
                f"observer at node {self.source!r} has seen no data; run the model on some batches "
                "with the observer enabled first"
            )

    @property
    def num_channels(self) -> int:
        self._need_data()
        return int(self.sum.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean (float64, (C,))."""
        self._need_data()
        return self.shift + self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        """Per-channel population variance (float64, (C,))."""
        self._need_data()
        m1 = self.sum / self.count
        return (self.sum_sq / self.count - m1 * m1).clamp_min(0.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, source={self.source!r}, keep={self.keep}, count={self.count}"


class CrossMoments:
    """Streaming covariance and correlation between two sets of channels (see the module doc).

    ``update(xa, xb)`` takes channel matrices (Ca, N) and (Cb, N) whose columns are the same
    samples (e.g. ``obs_a.last`` and ``obs_b.last`` after feeding one batch to both models).
    """

    def __init__(self, ca: int, cb: int, device: torch.device | str | None = None) -> None:
        self.ca, self.cb = ca, cb
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift_a: torch.Tensor | None = None
        self.shift_b: torch.Tensor | None = None
        self.sum_a = torch.zeros(ca, **f64)
        self.sum_b = torch.zeros(cb, **f64)
        self.sum_aa = torch.zeros(ca, **f64)
        self.sum_bb = torch.zeros(cb, **f64)
        self.sum_ab = torch.zeros(ca, cb, **f64)

    @torch.no_grad()
    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if xa.ndim != 2 or xb.ndim != 2 or xa.shape[0] != self.ca or xb.shape[0] != self.cb:
            raise PassError(
                f"CrossMoments({self.ca}, {self.cb}).update needs channel matrices ({self.ca}, N) and "
                f"({self.cb}, N), got {tuple(xa.shape)} and {tuple(xb.shape)}; "
                "use channel_matrix(x, dim) or an observer's .last"
            )
        if xa.shape[1] != xb.shape[1]:
            raise PassError(
                f"CrossMoments.update: the two matrices have {xa.shape[1]} and {xb.shape[1]} samples; "
                "both must come from the same batch"
            )
        a = xa.to(device=self.device, dtype=torch.float64)
        b = xb.to(device=self.device, dtype=torch.float64)
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(dim=1), b.mean(dim=1)
        a = a - self.shift_a[:, None]
        b = b - self.shift_b[:, None]
        self.sum_a += a.sum(dim=1)
        self.sum_b += b.sum(dim=1)
        self.sum_aa += (a * a).sum(dim=1)
        self.sum_bb += (b * b).sum(dim=1)
        self.sum_ab += a @ b.T
        self.n += a.shape[1]

    def _need_data(self) -> None:
        if self.n == 0:
            raise PassError("CrossMoments has seen no samples; call update(xa, xb) first")

    @property
    def mean_a(self) -> torch.Tensor:
        self._need_data()
        return self.shift_a + self.sum_a / self.n

    @property
    def mean_b(self) -> torch.Tensor:
        self._need_data()
        return self.shift_b + self.sum_b / self.n

    @property
    def var_a(self) -> torch.Tensor:
        self._need_data()
        m = self.sum_a / self.n
        return (self.sum_aa / self.n - m * m).clamp_min(0.0)

    @property
    def var_b(self) -> torch.Tensor:
        self._need_data()
        m = self.sum_b / self.n
        return (self.sum_bb / self.n - m * m).clamp_min(0.0)

    def cov(self) -> torch.Tensor:
        """Population cross-covariance (Ca, Cb), float64."""
        self._need_data()
        return self.sum_ab / self.n - torch.outer(self.sum_a / self.n, self.sum_b / self.n)

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation (Ca, Cb); rows/columns of channels with std <= eps are 0."""
        std_a, std_b = self.var_a.sqrt(), self.var_b.sqrt()
        denom = torch.outer(std_a, std_b)
        live = torch.outer(std_a > eps, std_b > eps)
        out = torch.where(live, self.cov() / torch.where(live, denom, 1.0), 0.0)
        return out.clamp(-1.0, 1.0)


@dataclass(frozen=True)
class ObserverSpec:
    """Where to observe: channel axis ``dim``, optional (C, R) ``index``, keep the last batch."""

    dim: int
    index: torch.Tensor | None = None
    keep: bool = False


def insert_observers(
    gm: GraphModule, points: dict[str, ObserverSpec], inplace: bool = False
) -> PassResult:
    """Insert a ChannelObserver after each node named in ``points``.

    counts: {"observers": number inserted}. Look the observers up with ``observers(gm)``.
    """
    gm = start(gm, inplace, "insert_observers")
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in points if name not in nodes]
    if missing:
        raise PassError(
            f"insert_observers: no node named {', '.join(map(repr, missing))} in the graph; "
            f"node names are those of gm.graph.nodes (e.g. {', '.join(list(nodes)[:5])})"
        )
    device = module_device(gm)
    for name, spec in points.items():
        index = None if spec.index is None else spec.index.to(device)
        observer = ChannelObserver(spec.dim, index=index, keep=spec.keep, source=name)
        insert_module_after(gm, nodes[name], observer, OBSERVER_PREFIX)
    finish(gm)
    return PassResult(gm, bool(points), {"observers": len(points)}, [])


def observers(gm: GraphModule) -> dict[str, ChannelObserver]:
    """The observers in ``gm``'s graph, keyed by the name of the node each observes."""
    out: dict[str, ChannelObserver] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = get_module(gm, node)
            if isinstance(module, ChannelObserver):
                out[module.source] = module
    return out

