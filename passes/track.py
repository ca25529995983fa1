"""Per-channel statistics of intermediate tensors, streamed on the tensor's device.

Channel matrix. For a tensor x and a channel axis ``dim`` (1 for NCHW conv outputs, -1 for
linear outputs and channels-last layouts), ``channel_matrix(x, dim)`` moves ``dim`` to the front
and flattens every other axis into samples: X (C, N) with N = x.numel() / C. With ``index``
(LongTensor (C, R) of positions along ``dim``) channel c is made of the R positions index[c, :]
(e.g. one unit replicated over R heads), each replica giving extra samples: X (C, R*N).

Streaming moments (``Moments``). Each batch b contributes its count n_b, per-channel mean m_b and
centred second moment M2_b (float32 sums and norms per channel, reduced along the contiguous
axes first, or ``var_mean`` where E[x^2] - E[x]^2 would cancel: no float64 copy of the activation
is ever made; see ``batch_moments``); batches are merged in float64 with Chan et al.'s pairwise update,

    n = n_1 + n_b,   d = m_b - m_1,   m = m_1 + d n_b / n,   M2 = M2_1 + M2_b + d^2 n_1 n_b / n,

so mean = m and the population variance = M2 / n, free of the cancellation of sum(x^2) - n mean^2.

Cross moments of two tensors (``CrossMoments``), e.g. the same point in models A and B fed the
same batch, X_a (Ca, N), X_b (Cb, N): per batch the centred product
C_b = (X_a - m_a)(X_b - m_b)^T (one matmul in the activation's dtype), merged in float64 by

    C = C_1 + C_b + (m_a,b - m_a,1)(m_b,b - m_b,1)^T n_1 n_b / n

    cov = C / n,   corr_ij = cov_ij / (std_a_i std_b_j), and 0 where either std is <= eps (never NaN)

Nothing is stored across batches except these sums: memory O(C) per observer, O(Ca*Cb) per
cross-moment table.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule

from passes.base import PassResult, finish, start
from passes.errors import PassError
from passes.modules import get_module, insert_module_after, inserted_modules, module_device, named_nodes

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


class Moments:
    """Streaming count, mean and centred second moment per channel (float64; see the module doc)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, n: int, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Merge one batch of ``n`` samples with per-channel ``mean`` and population ``var``.
        Returns (mean_batch - mean_before, n_before * n / n_total) for cross-moment updates."""
        mean = mean.detach().double()
        m2 = var.detach().double() * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return torch.zeros_like(mean), 0.0
        if mean.shape != self.mean.shape:
            raise PassError(f"a batch with {mean.shape[0]} channels cannot be merged with earlier "
                            f"batches of {self.mean.shape[0]} channels")
        total = self.n + n
        delta = mean - self.mean
        weight = self.n * n / total
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * weight
        self.n = total
        return delta, weight

    @property
    def var(self) -> torch.Tensor:
        return (self.m2 / self.n).clamp_min(0.0)


def _reduce_dims(ndim: int, dim: int) -> list[int]:
    dim = dim % ndim
    return [d for d in range(ndim) if d != dim]


# Above this ratio of mean^2 to variance, E[x^2] - E[x]^2 from float32 sums loses more than ~1e-4
# of the variance: such batches take the exact (slower, Welford) reduction instead.
_CANCELLATION = 1e3


def _split(x: torch.Tensor, dim: int) -> tuple[int, int, int] | None:
    """(pre, C, post) such that a contiguous ``x`` is a (pre, C, post) view with channels in the
    middle; None when ``x`` is not contiguous."""
    if not x.is_contiguous():
        return None
    dim %= x.ndim
    pre = 1
    for s in x.shape[:dim]:
        pre *= s
    c = x.shape[dim]
    return pre, c, (x.numel() // (pre * c) if pre * c else 0)


# Up to this many elements a (N, C) batch is squared into a temporary (<= 4 MB in float32).
_SMALL = 1 << 20

# Below this many positions per (sample, channel) a channel-matrix copy and one matmul beat
# batched matmuls over the samples (measured on CPU: 8x8 maps copy, 16x16 and larger batch).
_BATCHED_MIN = 256


@torch.no_grad()
def batch_moments(x: torch.Tensor, dim: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, population variance) per channel of one batch, means and variances in float64.

    float32 inputs use the two fastest reductions torch has (sum and vector_norm, no temporary
    copy of x; a contiguous x is seen as (pre, C, post) and reduced over its contiguous ``post``
    axis first, then over ``pre`` in float64; a small (N, C) batch squares into a temporary, which
    is faster than vector_norm along the strided axis) and fall back to ``var_mean`` for a batch where
    cancellation would cost accuracy; other dtypes use ``var_mean`` in float32/float64 directly."""
    dims = _reduce_dims(x.ndim, dim)
    n = x.numel() // x.shape[dim] if x.ndim else 1
    if x.dtype == torch.float32 and dims and not x.is_cuda:  # on CUDA var_mean is fast, and a
        # cancellation check would wait for the device every batch
        split = _split(x, dim)
        if split is not None and split[2] > 1 and split[0] > 0:
            v = x.view(split)
            s = v.sum(2).double().sum(0)
            sq = torch.linalg.vector_norm(v, 2, dim=2).double().square().sum(0)
        elif split is not None and split[2] == 1 and x.numel() <= _SMALL:
            s = x.sum(dims).double()  # (N, C) with C contiguous: x * x beats a strided vector_norm
            sq = torch.mul(x, x).sum(dims).double()
        else:
            s = x.sum(dims).double()
            sq = torch.linalg.vector_norm(x, 2, dim=dims).double().square()
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0)
        if not bool((mean * mean > _CANCELLATION * var).any()):
            return n, mean, var
    xf = x if x.dtype == torch.float64 else x.float()
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return n, mean.double(), var.double()


class ChannelObserver(nn.Module):
    """Identity module that accumulates per-channel count, mean and variance of its input.

    ``dim`` is the channel axis; ``index`` (C, R) groups positions along it (see the module doc).
    With ``keep=True`` the channel matrix (activation dtype) of the latest batch is kept in ``.last``
    (overwritten each batch) so that a caller can update a ``CrossMoments`` table, and its
    (count, mean, variance) in ``.batch``, which ``CrossMoments.update`` can take instead of
    reducing the matrix again. With ``defer=True`` (set by ``insert_observers`` when no op of the
    graph writes in place) the batch itself is kept and the channel matrix is only formed when
    ``.last`` is read, so a caller that can use the tensor as it is (``kept()``) skips that copy.
    ``source`` names the graph node observed (set by ``insert_observers``).
    """

    def __init__(
        self,
        dim: int,
        index: torch.Tensor | None = None,
        keep: bool = False,
        source: str = "",
        defer: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.keep = keep
        self.defer = defer
        self._raw: torch.Tensor | None = None
        self._raw_version = 0
        self._last: torch.Tensor | None = None
        self.enabled = True
        self.source = source
        self.register_buffer("index", None if index is None else index.long(), persistent=False)
        self.last: torch.Tensor | None = None
        self.batch: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.moments = Moments()

    @property
    def count(self) -> int:
        return self.moments.n

    @property
    def last(self) -> torch.Tensor | None:
        """The latest batch as a channel matrix (with ``keep``; None once cleared)."""
        if self._last is None and self._raw is not None:
            self._last = channel_matrix(self._checked_raw(), self.dim)
        return self._last

    @last.setter
    def last(self, value: torch.Tensor | None) -> None:
        self._last, self._raw = value, None

    def _checked_raw(self) -> torch.Tensor:
        if self._raw._version != self._raw_version:
            raise PassError(
                f"the tensor observed at node {self.source!r} was modified in place after the observer "
                "saw it; insert the observers with defer=False for graphs with in-place ops"
            )
        return self._raw

    def kept(self) -> tuple[torch.Tensor, int] | None:
        """The latest batch as (tensor, channel axis): the observed tensor itself when deferred,
        else (``.last``, 0); None when nothing is kept."""
        if self._raw is not None and self._last is None:
            return self._checked_raw(), self.dim
        last = self.last
        return None if last is None else (last, 0)

    def reset_stats(self) -> None:
        """Forget every batch seen so far."""
        self.moments = Moments()
        self.last = None
        self.batch = None

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
        if self.index is None:
            batch = batch_moments(x, self.dim)  # reduces x in place, no copy
            if self.keep and self.defer:
                self.last = None
                self._raw, self._raw_version = x, x._version
            else:
                self.last = channel_matrix(x, self.dim) if self.keep else None
        else:
            m = channel_matrix(x, self.dim, self.index)
            batch = batch_moments(m, 0)
            self.last = m if self.keep else None
        self.moments.add(*batch)
        self.batch = batch if self.keep else None

    def _need_data(self) -> None:
        if self.count == 0:
            raise PassError(
                f"observer at node {self.source!r} has seen no data; run the model on some batches "
                "with the observer enabled first"
            )

    @property
    def num_channels(self) -> int:
        self._need_data()
        return int(self.moments.mean.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean (float64, (C,))."""
        self._need_data()
        return self.moments.mean

    @property
    def var(self) -> torch.Tensor:
        """Per-channel population variance (float64, (C,))."""
        self._need_data()
        return self.moments.var

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, source={self.source!r}, keep={self.keep}, count={self.count}"


# Above this ratio of mean^2 to variance in any channel of the first batch, ``ChannelSums`` sums
# x - shift instead of x (shift = that batch's mean): E[x^2] - E[x]^2 from float32 sums of x would
# otherwise lose more than ~1e-6 of the variance, and X_a X_b^T - n m_a m_b^T likewise.
_SHIFT_RATIO = 10.0


class _Layout:
    """A tensor seen as channels x samples without a copy where possible: ``kind`` "rows" is an
    (N, C) matrix, "cols" a (C, N) matrix, "batched" a contiguous (pre, C, post) view."""

    __slots__ = ("kind", "t")

    def __init__(self, kind: str, t: torch.Tensor) -> None:
        self.kind, self.t = kind, t

    @property
    def channels(self) -> int:
        return self.t.shape[1] if self.kind in ("rows", "batched") else self.t.shape[0]

    @property
    def samples(self) -> int:
        return self.t.numel() // self.channels if self.channels else 0

    def cols(self) -> torch.Tensor:
        """The (C, N) channel matrix (a copy only for "batched")."""
        if self.kind == "cols":
            return self.t
        if self.kind == "rows":
            return self.t.T
        return self.t.transpose(0, 1).reshape(self.t.shape[1], -1)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel sum and sum of squares, float64 (reduced in the tensor's dtype first, along
        its contiguous axis where there is one; no copy of the tensor)."""
        t = self.t
        if self.kind == "rows":
            s = t.sum(0)
            sq = torch.mul(t, t).sum(0) if t.numel() <= _SMALL else torch.linalg.vector_norm(t, 2, dim=0).square()
        elif self.kind == "cols":
            s = t.sum(1)
            sq = torch.linalg.vector_norm(t, 2, dim=1).square()
        else:
            s = t.sum(2).sum(0, dtype=torch.float64)
            sq = torch.linalg.vector_norm(t, 2, dim=2).square().sum(0, dtype=torch.float64)
        return s.double(), sq.double()


def _layout(x: torch.Tensor, dim: int, index: torch.Tensor | None, shift: torch.Tensor | None) -> _Layout:
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if index is not None:
        m = channel_matrix(x, dim, index)
        return _Layout("cols", m if shift is None else m - shift[:, None])
    if shift is not None:
        shape = [1] * x.ndim
        shape[dim % x.ndim] = -1
        x = x - shift.view(shape)
    split = _split(x, dim)
    if split is None:
        return _Layout("cols", channel_matrix(x, dim))
    pre, c, post = split
    if post == 1:
        return _Layout("rows", x.view(pre, c))
    if pre == 1:
        return _Layout("cols", x.view(c, post))
    return _Layout("batched", x.view(pre, c, post))


class ChannelSums:
    """Streaming per-channel count, mean and variance of tensors with channels along ``dim``
    (``index`` (C, R): channel c is made of the positions index[c, :], see ``channel_matrix``).

    Per batch: the sums of x and x^2 per channel, reduced in the activation's dtype (float32 for
    half types) and added to float64 totals: two reductions and no copy of x. A fixed per-channel
    shift, the first batch's mean, is subtracted first when that batch shows a mean large against
    its spread (``_SHIFT_RATIO``), so that var = E[(x-K)^2] - E[x-K]^2 does not cancel:

        mean = S1 / n + K,      var = S2 / n - (S1 / n)^2.
    """

    def __init__(self, dim: int, index: torch.Tensor | None = None) -> None:
        self.dim = dim
        self.index = None if index is None else index.long()
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> _Layout:
        """Add one batch; returns it as a layout (shifted), for ``cross_product``."""
        x = x.detach()
        if self.index is not None and self.index.device != x.device:
            self.index = self.index.to(x.device)
        lay = _layout(x, self.dim, self.index, self.shift)
        s, sq = lay.sums()
        n = lay.samples
        if self.s1 is None:
            mean = s / max(n, 1)
            if bool((mean * mean > _SHIFT_RATIO * (sq / max(n, 1) - mean * mean)).any()):
                self.shift = mean.to(lay.t.dtype)
                lay = _layout(x, self.dim, self.index, self.shift)
                s, sq = lay.sums()
            self.n, self.s1, self.s2 = n, s, sq
            return lay
        if s.shape != self.s1.shape:
            raise PassError(f"a batch with {s.shape[0]} channels cannot be merged with earlier batches "
                            f"of {self.s1.shape[0]} channels")
        self.n += n
        self.s1 += s
        self.s2 += sq
        return lay

    def _need_data(self) -> None:
        if self.n == 0:
            raise PassError("no samples seen yet; call update(x) first")

    @property
    def shifted_mean(self) -> torch.Tensor:
        self._need_data()
        return self.s1 / self.n

    @property
    def mean(self) -> torch.Tensor:
        m = self.shifted_mean
        return m if self.shift is None else m + self.shift.double()

    @property
    def var(self) -> torch.Tensor:
        m = self.shifted_mean
        return (self.s2 / self.n - m * m).clamp_min(0.0)


def cross_product(la: _Layout, lb: _Layout) -> torch.Tensor:
    """X_a X_b^T (Ca, Cb) of two layouts of one batch's samples, in their dtype, one (batched) matmul."""
    if la.kind == lb.kind == "rows":
        return la.t.T @ lb.t
    if la.kind == lb.kind == "batched" and la.t.shape[0] == lb.t.shape[0] and la.t.shape[2] >= _BATCHED_MIN:
        return torch.bmm(la.t, lb.t.transpose(1, 2)).sum(0)
    a, b = la.cols(), lb.cols()
    if a.shape[1] != b.shape[1]:
        raise PassError(f"the two tensors have {a.shape[1]} and {b.shape[1]} samples per channel; "
                        "both must come from the same batch")
    return a @ b.T


def covariance(sa: ChannelSums, sb: ChannelSums, sab: torch.Tensor) -> torch.Tensor:
    """Population cross-covariance from the shifted sums: S_ab / n - (S1_a / n)(S1_b / n)^T."""
    return sab / sa.n - torch.outer(sa.shifted_mean, sb.shifted_mean)


def correlation(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation from a covariance; rows/columns of channels with std <= eps are 0."""
    std_a, std_b = var_a.sqrt(), var_b.sqrt()
    live = torch.outer(std_a > eps, std_b > eps)
    out = torch.where(live, cov / torch.where(live, torch.outer(std_a, std_b), 1.0), 0.0)
    return out.clamp(-1.0, 1.0)


class CrossMoments:
    """Streaming covariance and correlation between two sets of channels (see the module doc).

    ``update(xa, xb)`` takes channel matrices (Ca, N) and (Cb, N) whose columns are the same
    samples (e.g. the same point of models A and B fed one batch); with ``dim`` the tensors
    themselves with channels along ``dim`` (what ``channel_matrix(x, dim)`` would give).
    Per batch one matmul in the activation's dtype, summed in float64 (``ChannelSums`` shifts).
    """

    def __init__(self, ca: int, cb: int, device: torch.device | str | None = None) -> None:
        self.ca, self.cb = ca, cb
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.a: ChannelSums | None = None
        self.b: ChannelSums | None = None
        self.sab = torch.zeros(ca, cb, dtype=torch.float64, device=self.device)

    @property
    def n(self) -> int:
        return 0 if self.a is None else self.a.n

    @torch.no_grad()
    def update(self, xa: torch.Tensor, xb: torch.Tensor, dim: int = 0) -> None:
        for x in (xa, xb):
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or not -x.ndim <= dim < x.ndim:
                raise PassError(f"CrossMoments.update: channel axis {dim} is out of range for "
                                f"{tuple(getattr(x, 'shape', ()))}")
        if xa.shape[dim] != self.ca or xb.shape[dim] != self.cb:
            raise PassError(
                f"CrossMoments({self.ca}, {self.cb}).update needs channel matrices ({self.ca}, N) and "
                f"({self.cb}, N), got {tuple(xa.shape)} and {tuple(xb.shape)}; "
                "use channel_matrix(x, dim) or pass dim"
            )
        if xa.numel() // self.ca != xb.numel() // self.cb:
            raise PassError(
                f"CrossMoments.update: the two tensors have {xa.numel() // self.ca} and "
                f"{xb.numel() // self.cb} samples; both must come from the same batch"
            )
        if self.a is None:
            self.a, self.b = ChannelSums(dim), ChannelSums(dim)
        la = self.a.update(xa.to(self.device))
        lb = self.b.update(xb.to(self.device))
        self.sab += cross_product(la, lb)

    def _need_data(self) -> None:
        if self.n == 0:
            raise PassError("CrossMoments has seen no samples; call update(xa, xb) first")

    @property
    def mean_a(self) -> torch.Tensor:
        self._need_data()
        return self.a.mean

    @property
    def mean_b(self) -> torch.Tensor:
        self._need_data()
        return self.b.mean

    @property
    def var_a(self) -> torch.Tensor:
        self._need_data()
        return self.a.var

    @property
    def var_b(self) -> torch.Tensor:
        self._need_data()
        return self.b.var

    def cov(self) -> torch.Tensor:
        """Population cross-covariance (Ca, Cb), float64."""
        self._need_data()
        return covariance(self.a, self.b, self.sab)

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation (Ca, Cb); rows/columns of channels with std <= eps are 0."""
        return correlation(self.cov(), self.var_a, self.var_b, eps)


@dataclass(frozen=True)
class TapView:
    """What a ``PairTap`` measures on its node: channel axis ``dim``, optional (C, R) ``index``,
    and whether to keep the A-B cross products (``cross``)."""

    dim: int
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
        self.cross: list[torch.Tensor | None] = [None] * len(self.views)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise PassError(f"the tap at node {self.source!r} received a {type(a).__name__}, not a "
                            "tensor; tap a node whose value is a single tensor")
        for i, (v, (sa, sb)) in enumerate(zip(self.views, self.sums)):
            la, lb = sa.update(a), sb.update(b)
            if v.cross:
                prod = cross_product(la, lb)
                if self.cross[i] is None:
                    self.cross[i] = prod.double()
                else:
                    self.cross[i] += prod

    def moments(self, i: int) -> tuple[ChannelSums, ChannelSums]:
        return self.sums[i]

    def cov(self, i: int) -> torch.Tensor:
        """A-B cross-covariance of view ``i`` (float64)."""
        if self.cross[i] is None:
            raise PassError(f"the tap at node {self.source!r} has no cross products for view {i}")
        return covariance(*self.sums[i], self.cross[i])


@dataclass(frozen=True)
class ObserverSpec:
    """Where to observe: channel axis ``dim``, optional (C, R) ``index``, keep the last batch."""

    dim: int
    index: torch.Tensor | None = None
    keep: bool = False


_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def writes_in_place(gm: GraphModule) -> bool:
    """Conservatively, whether any op of ``gm`` may write into an existing tensor (a module or
    function with ``inplace`` set, a trailing-underscore method or function, augmented assignment,
    item assignment, an ``out=`` argument)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if getattr(get_module(gm, node), "inplace", False) is not False:
                return True
        elif node.op in ("call_function", "call_method"):
            target = node.target
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if target in _IN_PLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__")):
                return True
            if "out" in node.kwargs or node.kwargs.get("inplace", False) is not False:
                return True
            if node.op == "call_function" and any(a is True for a in node.args[1:]):
                return True  # e.g. F.relu(x, True); conservative
    return False


def insert_observers(
    gm: GraphModule, points: dict[str, ObserverSpec], inplace: bool = False
) -> PassResult:
    """Insert a ChannelObserver after each node named in ``points``.

    counts: {"observers": number inserted}. Look the observers up with ``observers(gm)``.
    """
    gm = start(gm, inplace, "insert_observers")
    nodes = named_nodes(gm, points, "insert_observers")
    device = module_device(gm)
    defer = not writes_in_place(gm)  # else a kept batch could change before it is read
    for name, spec in points.items():
        index = None if spec.index is None else spec.index.to(device)
        observer = ChannelObserver(spec.dim, index=index, keep=spec.keep, source=name,
                                   defer=defer and spec.keep and index is None)
        insert_module_after(gm, nodes[name], observer, OBSERVER_PREFIX)
    finish(gm)
    return PassResult(gm, bool(points), {"observers": len(points)}, [])


def observers(gm: GraphModule) -> dict[str, ChannelObserver]:
    """The observers in ``gm``'s graph, keyed by the name of the node each observes."""
    return inserted_modules(gm, ChannelObserver)

