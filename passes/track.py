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


class CrossMoments:
    """Streaming covariance and correlation between two sets of channels (see the module doc).

    ``update(xa, xb)`` takes channel matrices (Ca, N) and (Cb, N) whose columns are the same
    samples (e.g. ``obs_a.last`` and ``obs_b.last`` after feeding one batch to both models).
    ``moments_a`` / ``moments_b``: the (count, mean, variance) of the same matrices when already
    known (``obs.batch``), so that they are not reduced twice. With ``dim`` != 0 (or tensors of
    other than 2 axes), ``xa`` and ``xb`` are the tensors themselves with channels along ``dim``
    (``channel_matrix(x, dim)`` is what is meant; e.g. an observer's ``kept()``): a contiguous
    (pre, C, post) tensor with a long ``post`` axis is multiplied as ``pre`` batched matmuls, without
    forming the channel matrix.
    """

    def __init__(self, ca: int, cb: int, device: torch.device | str | None = None) -> None:
        self.ca, self.cb = ca, cb
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.a, self.b = Moments(), Moments()
        self.c = torch.zeros(ca, cb, dtype=torch.float64, device=self.device)  # centred co-moment

    @property
    def n(self) -> int:
        return self.a.n

    @torch.no_grad()
    def update(self, xa: torch.Tensor, xb: torch.Tensor,
               moments_a: tuple[int, torch.Tensor, torch.Tensor] | None = None,
               moments_b: tuple[int, torch.Tensor, torch.Tensor] | None = None, dim: int = 0) -> None:
        if dim != 0 or xa.ndim != 2 or xb.ndim != 2:
            self._update_nd(xa, xb, moments_a, moments_b, dim)
            return
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
        a = xa.detach().to(self.device)
        b = xb.detach().to(self.device)
        if not a.is_floating_point():
            a, b = a.float(), b.float()
        n, mean_a, var_a = batch_moments(a, 0) if moments_a is None else _given(moments_a, a)
        _, mean_b, var_b = batch_moments(b, 0) if moments_b is None else _given(moments_b, b)
        # centred product of the batch: one matmul; means are subtracted afterwards unless they
        # are large against the spread, where the product is formed from centred copies instead
        big = lambda m, v: bool((m * m > 10.0 * v).any())  # noqa: E731
        if a.is_cuda or big(mean_a, var_a) or big(mean_b, var_b):  # CUDA: always centre, no host sync
            c_batch = ((a - mean_a[:, None].to(a.dtype)) @ (b - mean_b[:, None].to(b.dtype)).T).double()
        else:
            c_batch = (a @ b.T).double() - n * torch.outer(mean_a, mean_b)
        delta_a, weight = self.a.add(n, mean_a, var_a)
        delta_b, _ = self.b.add(n, mean_b, var_b)
        self.c += c_batch + torch.outer(delta_a, delta_b) * weight

    @torch.no_grad()
    def _update_nd(self, xa, xb, moments_a, moments_b, dim: int) -> None:
        """``update`` for tensors with channels along ``dim`` (see the class doc)."""
        for x in (xa, xb):
            if not isinstance(x, torch.Tensor) or not -x.ndim <= dim < x.ndim:
                raise PassError(f"CrossMoments.update: channel axis {dim} is out of range for "
                                f"{tuple(getattr(x, 'shape', ()))}")
        a = xa.detach().to(self.device)
        b = xb.detach().to(self.device)
        sa, sb = _split(a, dim), _split(b, dim)
        batched = (sa is not None and sb is not None and a.is_floating_point() and a.dtype == b.dtype
                   and sa[0] == sb[0] and sa[2] == sb[2] and sa[2] >= _BATCHED_MIN
                   and (sa[1], sb[1]) == (self.ca, self.cb))
        if not batched or a.is_cuda:  # CUDA: centred channel matrices, no host sync per batch
            self.update(channel_matrix(a, dim), channel_matrix(b, dim), moments_a, moments_b)
            return
        n, mean_a, var_a = batch_moments(a, dim) if moments_a is None else moments_a
        _, mean_b, var_b = batch_moments(b, dim) if moments_b is None else moments_b
        mean_a, var_a = mean_a.to(self.device, torch.float64), var_a.to(self.device, torch.float64)
        mean_b, var_b = mean_b.to(self.device, torch.float64), var_b.to(self.device, torch.float64)
        if n != sa[0] * sa[2] or mean_a.shape != (self.ca,) or mean_b.shape != (self.cb,):
            raise PassError("CrossMoments.update: the given moments do not belong to these tensors")
        big = lambda m, v: bool((m * m > 10.0 * v).any())  # noqa: E731
        if big(mean_a, var_a) or big(mean_b, var_b):  # centred copies needed: as channel matrices
            self.update(channel_matrix(a, dim), channel_matrix(b, dim), (n, mean_a, var_a), (n, mean_b, var_b))
            return
        # sum over pre of the (C, post) @ (post, C) products: X_a X_b^T without a channel-matrix copy
        c_batch = torch.bmm(a.view(sa), b.view(sb).transpose(1, 2)).double().sum(0)
        c_batch -= n * torch.outer(mean_a, mean_b)
        delta_a, weight = self.a.add(n, mean_a, var_a)
        delta_b, _ = self.b.add(n, mean_b, var_b)
        self.c += c_batch + torch.outer(delta_a, delta_b) * weight

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
        return self.c / self.n

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation (Ca, Cb); rows/columns of channels with std <= eps are 0."""
        std_a, std_b = self.var_a.sqrt(), self.var_b.sqrt()
        denom = torch.outer(std_a, std_b)
        live = torch.outer(std_a > eps, std_b > eps)
        out = torch.where(live, self.cov() / torch.where(live, denom, 1.0), 0.0)
        return out.clamp(-1.0, 1.0)


def _given(moments: tuple[int, torch.Tensor, torch.Tensor], x: torch.Tensor):
    n, mean, var = moments
    if n != x.shape[1] or mean.shape != (x.shape[0],) or var.shape != (x.shape[0],):
        raise PassError(f"CrossMoments.update: given moments of {n} samples and {tuple(mean.shape)} "
                        f"channels do not belong to a ({x.shape[0]}, {x.shape[1]}) channel matrix")
    return n, mean.to(device=x.device, dtype=torch.float64), var.to(device=x.device, dtype=torch.float64)


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

