"""Streaming per-channel moments of tensors, on the tensor's device: the sums every statistic is made of.

Channel matrix. For a tensor x and a channel axis ``dim`` (1 for NCHW conv outputs, -1 for
linear outputs and channels-last layouts), ``channel_matrix(x, dim)`` moves ``dim`` to the front
and flattens every other axis into samples: X (C, N) with N = x.numel() / C. With ``index``
(LongTensor (C, R) of positions along ``dim``) channel c is made of the R positions index[c, :]
(e.g. one unit replicated over R heads), each replica giving extra samples: X (C, R*N).

Streaming moments (``ChannelSums``). Each batch adds its per-channel sum and sum of squares,
reduced in the activation's dtype (float32 for half types) along the tensor's contiguous axis
where it has one (no copy of the activation; across the rows of an (N, C) matrix as one
matrix-vector product with ones), to float64 totals S1, S2 and the count n (the per-batch sums
wait in a short list and are added together). A batch may instead be given by its mean and
variance (or inverse std) from a fused batch-norm kernel (``add_moments``, used by resets). When the
first batch (or the examples given to ``calibrate`` before it) shows a channel whose mean is large
against its spread (mean^2 > 10 var), every batch is summed about a fixed per-channel shift K (that
batch's mean; one subtraction per batch), so that

    mean = S1 / n + K,     population variance = S2 / n - (S1 / n)^2

does not cancel (float32 sums of x and x^2 would lose the variance of, say, mean 100, std 3).

Two streams side by side (``pair_update``, ``pair_calibrate``: a ``PairTap``'s A and B at one node).
Where both tensors are (N, C) rows (channels on the last axis: linear layers, tokens), the shifted
rows of A and B and their squares are written into one working buffer (N, 4C) that every tap of a
pass shares (``PairScratch``: the same memory at every node, still in the cache), one product with
ones gives [S1_a, S1_b, S2_a, S2_b], and one copy puts it in a waiting buffer both sides share:
the same products of the same numbers as each side's own ``update``, in half the ops and none of
their four activation-sized temporaries (the paper MLP's observed nodes: 16.2 -> 8.0 ops per node
and batch). Bit for bit the same sums where the CPU's BLAS adds each column of the product in one
order whatever the matrix's width (the machines this was first measured on); MKL on an AVX-512
machine adds the columns past the last full 16-wide block in another order (seen on widths 6 and
24), and the two agree to float32 rounding (tests/test_moments_launches.py). Which path a batch
takes depends on its tensors' shape, dtype and layout only.

Cross moments of two tensors (``CrossMoments``, ``PairTap``), e.g. the same point in models A
and B fed the same batch, X_a (Ca, N), X_b (Cb, N): per batch one matmul X_a X_b^T in the
activation's dtype (as batched matmuls over a leading axis for conv maps, without forming the
channel matrix), accumulated by the matmul itself into a waiting total in that dtype that reaches
the float64 total S_ab every ``_CROSS_PENDING`` batches, about the same shifts, and

    cov = S_ab / n - (S1_a / n)(S1_b / n)^T,
    corr_ij = cov_ij / (std_a_i std_b_j), and 0 where either std is <= eps (never NaN)

Nothing is stored across batches except these sums (and one buffer of ``_PENDING`` per-batch sums
of C numbers each, one waiting Ca x Cb product): memory O(C) per observer, O(Ca*Cb) per
cross-moment table.

Totals about zero, for adding the sums of several streams (e.g. one per process of a distributed
run, each about its own shift): ``raw_totals()`` gives float64 (n, R1, R2) with, about K,

    R1 = S1 + n K,      R2 = S2 + 2 K S1 + n K^2         (sums of x and x^2)
    R_ab = S_ab + K_a S1_b^T + S1_a K_b^T + n K_a K_b^T   (sum of x_a x_b^T, ``cross_raw_total``)

which add exactly across streams (sums of the same quantity), and ``load_raw_totals`` takes such
sums back (shift zero). A stream that has seen no batch gives zeros of its ``channels``. Read about
zero, the variance R2 / n - (R1 / n)^2 cancels only to float64's precision: a relative error of
about 1e-16 mean^2 / var (1e-12 at mean / std = 100); the float32 per-batch sums, where a shift
matters, keep theirs.
"""

from __future__ import annotations

import functools

import torch

from passes.errors import PassError


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


# Above this ratio of mean^2 to variance in any channel of the first batch, ``ChannelSums`` sums
# x - shift instead of x (shift = that batch's mean): E[x^2] - E[x]^2 from float32 sums of x would
# otherwise lose more than ~1e-6 of the variance, and X_a X_b^T - n m_a m_b^T likewise.
_SHIFT_RATIO = 10.0


_EXACT = (torch.float32, torch.float64)  # dtypes reduced as they are (others in float32)


def without_grad(fn):
    """``torch.no_grad()`` as a decorator, except that a call made with gradients already off (a
    pass's forward runs under its own no_grad) does not enter the context again: the taps and
    resets of a pass are called per node and batch, and entering and leaving costs about 1.5 us
    a call (the paper MLP's merge of 5,000 examples makes about 650 such calls)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=32)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


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
        """Per-channel sum and sum of squares (reduced in the tensor's dtype along its contiguous
        axis where there is one, then in float64 over a leading axis; no copy of the tensor)."""
        t = self.t
        if self.kind == "rows":
            # across rows a matrix-vector product with ones beats sum(0) (measured ~2x on CPU
            # inside a forward pass: one BLAS call instead of a strided reduction)
            s = _ones(t.shape[0], t.dtype, t.device) @ t
            sq = _sum_of_squares(t)
        elif self.kind == "cols":
            s = t.sum(1)
            sq = torch.linalg.vector_norm(t, 2, dim=1).square()
        else:
            s = t.sum(2).sum(0, dtype=torch.float64)
            sq = torch.linalg.vector_norm(t, 2, dim=2).square().sum(0, dtype=torch.float64)
        return s, sq


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Per column of an (N, C) matrix, the sum of its squares: the squared rows times ones, one
    matrix-vector product per block of rows that squares into at most ``_SMALL`` elements (the
    whole matrix at once where it fits), the blocks' sums added in order. ``vector_norm(dim=0)``
    reads the matrix across its rows, 6-12x slower on the CPU (a LLaMA MLP's 2048 x 2816
    activations: 10.8 ms against 1.9 ms)."""
    n, c = t.shape
    rows = max(1, _SMALL // max(c, 1))
    if n <= rows:
        return _ones(n, t.dtype, t.device) @ torch.mul(t, t)
    ones = _ones(rows, t.dtype, t.device)
    buf = torch.empty(rows, c, dtype=t.dtype, device=t.device)
    out = None
    for i in range(0, n, rows):
        block = t[i:i + rows]
        part = ones[:len(block)] @ torch.mul(block, block, out=buf[:len(block)])
        out = part if out is None else out.add_(part)
    return out


def broadcast_shape(ndim: int, dim: int) -> list[int]:
    """The shape that broadcasts a (C,) vector along axis ``dim`` of an ``ndim``-axis tensor."""
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return shape


def _layout(x: torch.Tensor, dim, index: torch.Tensor | None, shift: torch.Tensor | None) -> _Layout:
    if x.dtype not in _EXACT:
        x = x.float()
    if isinstance(dim, tuple):  # joint channels: the product of several axes, as (N, C) rows
        dims = [d % x.ndim for d in dim]
        m = x.movedim(dims, list(range(x.ndim - len(dims), x.ndim)))
        m = m.reshape(-1, m.shape[-len(dims):].numel())
        return _Layout("rows", m if shift is None else m - shift)
    if index is not None:
        m = channel_matrix(x, dim, index)
        return _Layout("cols", m if shift is None else m - shift[:, None])
    if shift is not None:
        x = x - shift.view(broadcast_shape(x.ndim, dim))
    split = _split(x, dim)
    if split is None:
        return _Layout("cols", channel_matrix(x, dim))
    pre, c, post = split
    if post == 1:
        return _Layout("rows", x.view(pre, c))
    if pre == 1:
        return _Layout("cols", x.view(c, post))
    return _Layout("batched", x.view(pre, c, post))


# Per-batch sums wait in a buffer allocated once, (_PENDING, 2, C) float64, and reach the totals
# this many batches at a time: one reduction per flush instead of small float64 additions on every
# batch, and no small tensors kept alive between the activations (on CPU those would fragment the
# heap that the activations are allocated from, and each batch's activations would land on fresh
# memory: page faults and cold caches).
_PENDING = 64


def _large_mean(mean: torch.Tensor, meansq: torch.Tensor) -> torch.Tensor:
    """Per channel, whether the mean is large against the spread (``_SHIFT_RATIO``), from the
    float64 mean and mean of squares of unshifted values: where so, sums are taken about a shift."""
    return mean * mean > _SHIFT_RATIO * (meansq - mean * mean)


class ChannelSums:
    """Streaming per-channel count, mean and variance of tensors with channels along ``dim``
    (``index`` (C, R): channel c is made of the positions index[c, :], see ``channel_matrix``;
    ``dim`` a tuple of axes: every position of their product, flattened in order, is a channel).

    Per batch: the sums of x and x^2 per channel, reduced in the activation's dtype (float32 for
    half types) and added to float64 totals: two reductions and no copy of x. A fixed per-channel
    shift, the first batch's mean, is subtracted first when that batch shows a mean large against
    its spread (``_SHIFT_RATIO``), so that var = E[(x-K)^2] - E[x-K]^2 does not cancel:

        mean = S1 / n + K,      var = S2 / n - (S1 / n)^2.

    A batch may also be given by its moments (``add_moments``: count, mean and variance or
    BatchNorm's inverse std, as a fused batch-norm kernel returns them). Batches wait in a buffer
    (``_PENDING``) and are added to the totals together when it fills or a result is read.
    """

    def __init__(self, dim, index: torch.Tensor | None = None, channels: int | None = None) -> None:
        self.dim = dim
        self.index = None if index is None else index.long()
        # the number of channels, when known before any batch (a stream that sees none still
        # gives totals of the right size: ``raw_totals``)
        self.channels = channels if index is None else int(index.shape[0])
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.decided = False  # the shift (or none) is chosen: by ``calibrate`` or the first batch
        self._tot: torch.Tensor | None = None  # (2, C) float64: S1, S2
        self._s1 = self._s2 = None  # its rows (views, made once)
        self._wait: torch.Tensor | None = None  # (_PENDING, 2, C) float64: S1, S2 of waiting batches
        self._waiting = 0
        # waiting batches given by moments: (_PENDING, 2, C) float64 mean and variance or inverse
        # std, with their counts and eps (None for a variance)
        self._mwait: torch.Tensor | None = None
        self._mn: list[int] = []
        self._meps: list[float | None] = []
        # latest (n, S1, S2) of one batch, shifted, in the reduction's dtype (``PairTap`` and ``Reset``
        # drop it once read: see ``pair_tap.KeptBatches``)
        self.batch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def s1(self) -> torch.Tensor | None:
        """Float64 total of x - shift per channel."""
        self._flush()
        return self._s1

    @property
    def s2(self) -> torch.Tensor | None:
        """Float64 total of (x - shift)^2 per channel."""
        self._flush()
        return self._s2

    def _check(self, c: int) -> None:
        if c != self._tot.shape[1]:
            raise PassError(f"a batch with {c} channels cannot be merged with earlier batches "
                            f"of {self._tot.shape[1]} channels")

    @without_grad
    def update(self, x: torch.Tensor) -> _Layout:
        """Add one batch; returns it as a layout (shifted), for ``cross_product``."""
        if x.requires_grad:  # (an op of its own: only where needed)
            x = x.detach()
        if self.index is not None and self.index.device != x.device:
            self.index = self.index.to(x.device)
        lay = _layout(x, self.dim, self.index, self.shift)
        s, sq = lay.sums()
        n = lay.samples
        if self._tot is None:
            if not self.decided and self._decide(s, sq, n, lay.t.dtype) is not None:
                lay = _layout(x, self.dim, self.index, self.shift)
                s, sq = lay.sums()
            self.n = n
            self._set_totals(torch.stack([s, sq]).double())
            self.batch = (n, s, sq)
            return lay
        self._check(s.shape[0])
        self.n += n
        if self._wait is None:
            self._wait = self._tot.new_empty((_PENDING, *self._tot.shape))
        torch.stack([s, sq], out=self._wait[self._waiting])
        self._waiting += 1
        if self._waiting >= _PENDING:
            self._flush()
        self.batch = (n, s, sq)
        return lay

    def _decide(self, s: torch.Tensor, sq: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Choose the shift from one batch's unshifted sums (see ``_SHIFT_RATIO``)."""
        mean = s.double() / max(n, 1)
        self.decided = True
        if bool(_large_mean(mean, sq.double() / max(n, 1)).any()):
            self.shift = mean.to(dtype)
        return self.shift

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, choices: ShiftChoices | None = None) -> None:
        """Choose the shift from ``x`` (e.g. two examples every process of a distributed run
        shares) instead of from the first batch, without counting ``x``: streams that see
        different first batches then sum every batch about the same shift, and their float32
        per-batch sums are the ones a single stream would make. Only before the first batch.
        ``choices``: the shift is chosen when it decides, with those of other sums."""
        if self._tot is not None:
            raise PassError("calibrate comes before the first batch")
        x = x.detach()
        if self.index is not None and self.index.device != x.device:
            self.index = self.index.to(x.device)
        self.shift, self.decided = None, False
        lay = _layout(x, self.dim, self.index, None)
        if choices is not None:
            choices.add(self, *lay.sums(), lay.samples, lay.t.dtype)
        else:
            self._decide(*lay.sums(), lay.samples, lay.t.dtype)

    @without_grad
    def add_moments(self, n: int, mean: torch.Tensor, var: torch.Tensor | None = None, *,
                    invstd: torch.Tensor | None = None, eps: float = 0.0) -> None:
        """Add a batch of ``n`` samples given by its per-channel mean and population variance, or
        BatchNorm's inverse std 1 / sqrt(var + eps) instead of the variance (as a fused
        batch-norm kernel computes them, centred, in one read of the batch). About the shift K
        (the first batch's mean): S1 += n (mean - K), S2 += n (var + (mean - K)^2)."""
        if (var is None) == (invstd is None):
            raise PassError("add_moments needs the variance or the inverse std (one of them)")
        v, e = (var, None) if invstd is None else (invstd, float(eps))
        if self._tot is None:
            if not self.decided:
                self.shift, self.decided = mean.detach().clone(), True
            d = mean.double() if self.shift is None else mean.double() - self.shift.double()
            self.n = n
            self._set_totals(torch.stack([n * d, (self._variance(v[None], e)[0] + d * d) * n]))
            return
        self._check(mean.shape[0])
        self.n += n
        if self._mwait is None:
            self._mwait = self._tot.new_empty((_PENDING, *self._tot.shape))
        torch.stack([mean.detach(), v.detach()], out=self._mwait[len(self._mn)])
        self._mn.append(n)
        self._meps.append(e)
        if len(self._mn) >= _PENDING:
            self._flush()

    def _set_totals(self, tot: torch.Tensor) -> None:
        self._tot = tot
        self._s1, self._s2 = tot.unbind(0)

    @staticmethod
    def _variance(v: torch.Tensor, eps: float | None) -> torch.Tensor:
        v = v.double()
        return v if eps is None else (v.pow(-2) - eps).clamp_min(0.0)

    def _flush(self) -> None:
        if self._waiting:
            # reduced as a contiguous block, as a buffer of its own is: a view into the buffer both
            # sides of a pair share (``pair_update``) may otherwise be reduced in another order
            self._tot.add_(self._wait[:self._waiting].contiguous().sum(0))
            self._waiting = 0
        if not self._mn:
            return
        waiting = self._mwait[:len(self._mn)]
        ns = torch.tensor(self._mn, dtype=torch.float64, device=self._tot.device)[:, None]
        d = waiting[:, 0] if self.shift is None else waiting[:, 0] - self.shift.double()
        for eps in set(self._meps):
            rows = [i for i, e in enumerate(self._meps) if e == eps]
            if len(rows) < len(self._meps):
                rows = torch.tensor(rows, device=self._tot.device)
                ni, di, vi = ns[rows], d[rows], waiting[rows, 1]
            else:
                ni, di, vi = ns, d, waiting[:, 1]
            var = self._variance(vi, eps)
            self._s1.add_((ni * di).sum(0))
            self._s2.add_((ni * torch.addcmul(var, di, di)).sum(0))
        self._mn.clear()
        self._meps.clear()

    def _need_data(self) -> None:
        if self.n == 0:
            raise PassError("no samples seen yet; call update(x) first")

    def raw_totals(self) -> list[torch.Tensor]:
        """[n (1,), R1 (C,), R2 (C,)]: float64 count and sums of x and x^2 about zero (see the
        module doc); zeros of ``channels`` before any batch."""
        if self._tot is None:
            if self.channels is None:
                raise PassError("these sums have seen no batch and do not know their channel count; "
                                "give channels= when making them")
            zeros = torch.zeros(self.channels, dtype=torch.float64)
            return [zeros.new_zeros(1), zeros, zeros.clone()]
        self._flush()
        n = float(self.n)
        s1, s2 = self._s1, self._s2
        if self.shift is not None:
            k = self.shift.double()
            s2 = s2 + 2 * k * s1 + n * k * k
            s1 = s1 + n * k
        return [s1.new_full((1,), n), s1.clone(), s2.clone()]

    def load_raw_totals(self, parts: list[torch.Tensor]) -> None:
        """Replace the totals by [n, R1, R2] about zero (``raw_totals``' form, e.g. their sum over
        several streams); later batches add to them, unshifted."""
        n, s1, s2 = parts
        self._flush()
        self.n = int(round(float(n.reshape(-1)[0])))
        self.shift, self.decided = None, True
        self._wait, self._waiting = None, 0
        self.batch = None
        self._set_totals(torch.stack([s1.double(), s2.double()]))

    @property
    def shifted_mean(self) -> torch.Tensor:
        self._need_data()
        return self.s1 / self.n

    def _moments(self, n: int, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (mean, population variance) from sums of x - shift and (x - shift)^2."""
        m = s1.double() / n
        var = (s2.double() / n - m * m).clamp_min(0.0)
        return (m if self.shift is None else m + self.shift.double()), var

    def batch_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 mean and population variance of the latest batch given to ``update``."""
        if self.batch is None:
            raise PassError("no batch seen yet; call update(x) first")
        return self._moments(*self.batch)

    @staticmethod
    def moments_of_sums(counts: list[int], s1: torch.Tensor, s2: torch.Tensor,
                        shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (means, population variances), (k, C) each, of k batches given as their counts
        and (k, C) sums of x - shift and (x - shift)^2 (in the reduction's dtype or float64),
        summed about ``shift`` (as it was then): the moments ``batch_moments`` would have given
        after each, read once for all of them (no op per batch while the pass runs). Sums of
        several streams at once, (k, ..., C), give moments of that shape (``shift`` None: each
        stream's shift is the caller's to add)."""
        n = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=s1.device)
        n = n.view(-1, *[1] * (s1.ndim - 1))
        m = s1.double() / n
        var = (s2.double() / n - m * m).clamp_min(0.0)
        return (m if shift is None else m + shift.double()), var

    @property
    def mean(self) -> torch.Tensor:
        self._need_data()
        return self._moments(self.n, self.s1, self.s2)[0]

    @property
    def var(self) -> torch.Tensor:
        self._need_data()
        return self._moments(self.n, self.s1, self.s2)[1]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``mean``, ``var``), computed once."""
        self._need_data()
        return self._moments(self.n, self.s1, self.s2)




def moments_all(sums: list[ChannelSums]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``s.moments()`` (float64 mean, population variance) of each of ``sums``, bit for bit: the
    same float64 operations on the same numbers. Sums of one channel count and device are read
    together, as the rows of one (k, C) table, each with its own count and shift, in a fixed
    number of ops for all of them instead of about eight each (a 20-layer MLP's joint pass
    summarises 80 of them); their results are rows of that table. A sums with no samples raises
    as ``moments`` does."""
    out: list = [None] * len(sums)
    classes: dict[tuple, list[int]] = {}
    for j, s in enumerate(sums):
        if s.n > 0 and s.s1 is not None:
            classes.setdefault((s.s1.shape, s.s1.device), []).append(j)
    for (_, device), js in classes.items():
        if len(js) < 2:
            continue
        group = [sums[j] for j in js]
        n = torch.tensor([float(s.n) for s in group], dtype=torch.float64, device=device)[:, None]
        m = torch.stack([s.s1 for s in group]) / n  # as ``_moments`` (the totals are float64)
        var = (torch.stack([s.s2 for s in group]) / n - m * m).clamp_min(0.0)
        shifted = [k for k, s in enumerate(group) if s.shift is not None]
        if shifted:  # m + shift.double(), row by row (stack widens exactly)
            m.index_add_(0, torch.tensor(shifted, device=device),
                         torch.stack([group[k].shift.to(device) for k in shifted]).double())
        for k, j in enumerate(js):
            out[j] = (m[k], var[k])
    return [o if o is not None else s.moments() for o, s in zip(out, sums)]


class PairScratch:
    """One working buffer per (samples, channels, dtype, device), shared by every tap of a joint
    pass (``pair_update``): the shifted copies of A's and B's rows and their squares are written
    into the same memory at every node, which stays in the cache, instead of four fresh
    activation-sized tensors per node and batch. Holds at most a few (N, 4C) buffers of up to
    4 * ``_SMALL`` elements; freed with the pass's taps."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def get(self, n: int, c: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(ones (1, N), buffer (N, 4C), A rows, B rows, A and B rows, their squares): the views
        are made once."""
        key = (n, c, dtype, device)
        got = self._bufs.get(key)
        if got is None:
            if len(self._bufs) >= 4:  # batch sizes change rarely (a last, smaller batch)
                self._bufs.clear()
            buf = torch.empty(n, 4 * c, dtype=dtype, device=device)
            got = self._bufs[key] = (torch.ones(1, n, dtype=dtype, device=device), buf, buf[:, :c],
                                     buf[:, c:2 * c], buf[:, :2 * c], buf[:, 2 * c:])
        return got


def _rows(sa: ChannelSums, sb: ChannelSums, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(N, C) when A's and B's values are rows ``pair_update`` sums together (see there), else None."""
    if (a.dtype not in _EXACT or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device
            or sa.index is not None or sb.index is not None
            or not isinstance(sa.dim, int) or sa.dim != sb.dim or a.ndim == 0
            or sa.dim % a.ndim != a.ndim - 1 or a.numel() > _SMALL
            or not a.is_contiguous() or not b.is_contiguous()):
        return None
    c = a.shape[-1]
    n = a.numel() // c if c else 0
    if n == 0 or any(t._tot is not None and t._tot.shape[1] != c for t in (sa, sb)):
        return None  # (``update`` says what is wrong with a batch of another width)
    return n, c


def _both_sums(a: torch.Tensor, b: torch.Tensor, n: int, c: int, ka: torch.Tensor | None,
               kb: torch.Tensor | None, scratch: PairScratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([S1_a, S1_b, S2_a, S2_b] (1, 4C), a - ka, b - kb) of (N, C) rows a and b (see ``pair_update``);
    the shifted rows are views of ``scratch``'s buffer."""
    ones, buf, da, db, dab, sq = scratch.get(n, c, a.dtype, a.device)
    for t, d, k in ((a, da, ka), (b, db, kb)):
        t = t if t.ndim == 2 else t.view(n, c)
        if k is None:
            d.copy_(t)
        else:
            torch.sub(t, k, out=d)
    torch.mul(dab, dab, out=sq)
    return torch.mm(ones, buf), da, db


def pair_calibrate(sa: ChannelSums, sb: ChannelSums, a: torch.Tensor, b: torch.Tensor,
                   scratch: PairScratch, choices: ShiftChoices | None = None) -> bool:
    """``sa.calibrate(a, choices)`` and ``sb.calibrate(b, choices)`` in one go for rows
    (``pair_update``): the four sums from one product, each side's shift then decided by its own
    ``_decide`` (or by ``choices``). False where this does not apply (the caller calibrates each
    side)."""
    if sa._tot is not None or sb._tot is not None:
        return False  # (``calibrate`` says why not)
    dims = _rows(sa, sb, a, b)
    if dims is None:
        return False
    n, c = dims
    v = _both_sums(a.detach(), b.detach(), n, c, None, None, scratch)[0].view(2, 2, c)  # a new tensor
    for i, t in enumerate((sa, sb)):
        t.shift, t.decided = None, False
        if choices is not None:
            choices.add(t, v[0, i], v[1, i], n, a.dtype)
        else:
            t._decide(v[0, i], v[1, i], n, a.dtype)
    return True


class ShiftChoices:
    """The shifts of many ``ChannelSums`` chosen together: a calibration pass hands each sums'
    unshifted totals of the example here (``ChannelSums.calibrate``, ``pair_calibrate``), and
    ``decide`` makes the choice ``_decide`` makes for each, with the same float64 arithmetic on
    the same numbers (the same shifts, bit for bit), in a fixed number of ops for all of them
    instead of about ten per sums. The paper MLP's calibration of its 20-layer pair holds 80
    sums: about 800 small ops become about 15."""

    def __init__(self):
        self._held: list[tuple[ChannelSums, torch.Tensor, torch.Tensor, int, torch.dtype]] = []

    def add(self, sums: ChannelSums, s: torch.Tensor, sq: torch.Tensor, n: int, dtype: torch.dtype) -> None:
        """Hold ``sums``' unshifted sum and sum of squares of ``n`` samples (its shift undecided
        until ``decide``)."""
        sums.shift, sums.decided = None, False
        self._held.append((sums, s.reshape(-1), sq.reshape(-1), max(n, 1), dtype))

    @torch.no_grad()
    def decide(self) -> None:
        """Choose every shift held (per device), then hold nothing."""
        held, self._held = self._held, []
        by_device: dict[torch.device, list] = {}
        for h in held:
            by_device.setdefault(h[1].device, []).append(h)
        for device, items in by_device.items():
            sizes = torch.tensor([s.numel() for _, s, _, _, _ in items], device=device)
            count = torch.tensor([float(n) for _, _, _, n, _ in items], dtype=torch.float64,
                                 device=device).repeat_interleave(sizes)
            # as ``_decide``: s.double() / n, sq.double() / n (cat widens float32 exactly)
            mean = torch.cat([s for _, s, _, _, _ in items]).double() / count
            large = _large_mean(mean, torch.cat([sq for _, _, sq, _, _ in items]).double() / count)
            owner = torch.arange(len(items), device=device).repeat_interleave(sizes)
            flagged = torch.zeros(len(items), dtype=torch.long, device=device).index_add_(0, owner, large.long())
            start = 0
            for (sums, s, _, _, dtype), k, many in zip(items, sizes.tolist(), flagged.tolist()):
                sums.decided = True
                if many:
                    sums.shift = mean[start:start + k].to(dtype, copy=True)
                start += k


def pair_update(sa: ChannelSums, sb: ChannelSums, a: torch.Tensor, b: torch.Tensor,
                scratch: PairScratch) -> tuple[_Layout, _Layout, torch.Tensor] | None:
    """``sa.update(a)`` and ``sb.update(b)`` in one go where A's and B's values are (N, C) rows
    (channels on the last axis of contiguous tensors of one shape, float32 or float64, at most
    ``_SMALL`` elements, shifts already chosen): the shifted rows of both and their squares are
    written into one buffer of ``scratch`` and one matrix-vector product with ones gives all four
    sums, ``v`` = [S1_a, S1_b, S2_a, S2_b] (float32, (1, 4C)), which reach both waiting buffers in
    one copy. The sums are the ones ``update`` computes (the same products of the same numbers,
    the same float64 totals; summed in the same order where the BLAS does, see the module doc).
    Returns the two shifted layouts (for ``cross_product``) and ``v``; None where this does not
    apply (the caller then updates each side on its own)."""
    dims = _rows(sa, sb, a, b) if sa.decided and sb.decided else None
    if dims is None or any(k is not None and k.dtype != a.dtype for k in (sa.shift, sb.shift)):
        return None
    n, c = dims
    v, da, db = _both_sums(a, b, n, c, sa.shift, sb.shift, scratch)
    sums = v.view(2, 2, c)  # (S1 | S2, A | B, C)
    if sa._tot is None or sb._tot is None:
        for i, t in enumerate((sa, sb)):
            t.n = n
            t._set_totals(sums[:, i].to(torch.float64, copy=True))  # (never a view of ``v``, kept per batch)
    else:
        if sa._wait is None and sb._wait is None:
            # one waiting buffer for both, (_PENDING, 2, 2, C): S1 and S2 of A and of B
            both = sa._tot.new_empty((_PENDING, 2, 2, c))
            sa._wait, sb._wait = both[:, :, 0], both[:, :, 1]
        if (sa._wait is not None and sb._wait is not None and sa._wait._base is not None
                and sa._wait._base is sb._wait._base and sa._waiting == sb._waiting):
            sa._wait._base[sa._waiting].copy_(sums)
        else:  # one side was read (and flushed) alone: each side into its own rows, as ``update`` puts it
            for i, t in enumerate((sa, sb)):
                if t._wait is None:
                    t._wait = t._tot.new_empty((_PENDING, *t._tot.shape))
                t._wait[t._waiting].copy_(sums[:, i])
        for t in (sa, sb):
            t.n += n
            t._waiting += 1
            if t._waiting >= _PENDING:
                t._flush()
    sa.batch = sb.batch = None  # (``PairTap`` keeps ``v`` for the batch's moments)
    return _Layout("rows", da), _Layout("rows", db), v


def cross_product(la: _Layout, lb: _Layout, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """X_a X_b^T (Ca, Cb) of two layouts of one batch's samples, in their dtype, one (batched)
    matmul. With ``out`` the product is written into it, or with ``add`` added to what it holds
    (the matmul accumulates into it), and ``out`` is returned."""
    if la.kind == lb.kind == "rows":
        a, b = la.t.T, lb.t
    elif la.kind == lb.kind == "batched" and la.t.shape[0] == lb.t.shape[0] and la.t.shape[2] >= _BATCHED_MIN:
        prod = torch.bmm(la.t, lb.t.transpose(1, 2)).sum(0)
        return prod if out is None else out.add_(prod) if add else out.copy_(prod)
    else:
        a, b = la.cols(), lb.cols()
        if a.shape[1] != b.shape[1]:
            raise PassError(f"the two tensors have {a.shape[1]} and {b.shape[1]} samples per channel; "
                            "both must come from the same batch")
        b = b.T
    # beta 0: what ``out`` held is not read (nor NaN in it propagated)
    return a @ b if out is None else out.addmm_(a, b, beta=1.0 if add else 0.0)


# Per-batch cross products are summed in the activation's dtype (float32 for half types) this many
# batches at a time, the matmul accumulating into the waiting total, before they reach the float64
# total: one conversion and addition per flush instead of per batch.
_CROSS_PENDING = 16


class CrossSum:
    """Float64 total of X_a X_b^T over batches (see ``_CROSS_PENDING``)."""

    __slots__ = ("_total", "_wait", "_waiting")

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._wait: torch.Tensor | None = None
        self._waiting = 0

    def add(self, la: _Layout, lb: _Layout) -> None:
        if self._wait is None:
            self._wait = cross_product(la, lb)
        else:
            cross_product(la, lb, self._wait, add=self._waiting > 0)
        self._waiting += 1
        if self._waiting >= _CROSS_PENDING:
            self._flush()

    def _flush(self) -> None:
        if self._waiting:
            if self._total is None:
                self._total = self._wait.to(torch.float64, copy=True)
            else:
                self._total.add_(self._wait)
            self._waiting = 0

    @property
    def total(self) -> torch.Tensor | None:
        """The float64 total (None before the first batch)."""
        self._flush()
        return self._total

    def load_total(self, total: torch.Tensor) -> None:
        """Replace the total (e.g. by ``cross_raw_total``s summed over streams)."""
        self._wait, self._waiting = None, 0
        self._total = total.double()


def cross_raw_total(sa: ChannelSums, sb: ChannelSums, sab: CrossSum) -> torch.Tensor:
    """The float64 sum of x_a x_b^T about zero (see the module doc) from sums about the shifts of
    ``sa`` and ``sb``; zeros (Ca, Cb) before any batch."""
    total = sab.total
    if total is None:
        ca, cb = (s.raw_totals()[1].shape[0] for s in (sa, sb))
        return torch.zeros(ca, cb, dtype=torch.float64)
    n = float(sa.n)
    s1a, s1b = sa.s1.double(), sb.s1.double()
    out = total.clone()
    ka = None if sa.shift is None else sa.shift.double()
    kb = None if sb.shift is None else sb.shift.double()
    if ka is not None:
        out += torch.outer(ka, s1b)
    if kb is not None:
        out += torch.outer(s1a, kb)
    if ka is not None and kb is not None:
        out += n * torch.outer(ka, kb)
    return out


def covariance(sa: ChannelSums, sb: ChannelSums, sab: torch.Tensor) -> torch.Tensor:
    """Population cross-covariance from the shifted sums: S_ab / n - (S1_a / n)(S1_b / n)^T."""
    return (sab / sa.n).sub_(torch.outer(sa.shifted_mean, sb.shifted_mean))  # (one (Ca, Cb) tensor less)


def correlation(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation from a covariance; rows/columns of channels with std <= eps are 0.
    One (Ca, Cb) result and no other temporary of that size (the matrices of a wide layer take
    tens of megabytes each): cov scaled by 1/std per row and per column, 0 for dead channels."""
    std_a, std_b = var_a.sqrt(), var_b.sqrt()
    out = cov / std_a[:, None]
    out.div_(std_b[None, :])
    # 0 in the rows and columns of dead channels, whatever the covariance holds there (NaN too):
    # one masked fill (a boolean index per axis costs a search for its True entries)
    out.masked_fill_(~(std_a > eps)[:, None] | ~(std_b > eps)[None, :], 0.0)
    return out.clamp_(-1.0, 1.0)


# correlations of at most this many entries are taken together (``correlations_together``), at most
# ``_STACKED`` entries at a time
_SMALL_CORR = 1 << 16
_STACKED = 1 << 21


def correlations_together(items: list[tuple[torch.Tensor, "ChannelSums", "ChannelSums", torch.Tensor, torch.Tensor]],
                          eps: float = 1e-12) -> list[torch.Tensor | None]:
    """``correlation(covariance(sa, sb, sab), var_a, var_b, eps)`` of the small ones of ``items``
    ((sab, sa, sb, var_a, var_b) each), bit for bit: the same float64 operations on the same
    numbers (divisions, products, square roots: each correctly rounded, whatever the layout).
    Matrices of at most ``_SMALL_CORR`` entries of one shape and device are taken together, as
    the slices of one (k, Ca, Cb) stack of at most ``_STACKED`` entries, in a fixed number of
    ops instead of about fifteen each (the paper MLP's joint pass: 20 correlations of 128 x 128).
    None for the others: a wide layer's take tens of megabytes, and the caller makes each when it
    reads it (one at a time, not all at once). A result is a slice of its stack."""
    out: list = [None] * len(items)
    classes: dict[tuple, list[int]] = {}
    for j, (sab, sa, sb, _, _) in enumerate(items):
        if sab.numel() <= _SMALL_CORR and sa.n > 0 and sb.n > 0:
            classes.setdefault((tuple(sab.shape), sab.dtype, sab.device), []).append(j)
    for (shape, _, device), js in classes.items():
        per = max(2, _STACKED // max(1, shape[0] * shape[1]))
        for start in range(0, len(js), per):
            part = js[start:start + per]
            if len(part) < 2:
                continue
            sab, sa, sb, va, vb = zip(*(items[j] for j in part))
            na = torch.tensor([float(s.n) for s in sa], dtype=torch.float64, device=device)[:, None]
            nb = torch.tensor([float(s.n) for s in sb], dtype=torch.float64, device=device)[:, None]
            # ``covariance``: S_ab / n - outer(S1_a / n, S1_b / n)
            cov = torch.stack(sab) / na[:, :, None]
            cov.sub_((torch.stack([s.s1 for s in sa]) / na)[:, :, None] * (torch.stack([s.s1 for s in sb]) / nb)[:, None, :])
            # ``correlation``
            std_a, std_b = torch.stack(va).sqrt(), torch.stack(vb).sqrt()
            cov.div_(std_a[:, :, None]).div_(std_b[:, None, :])
            cov.masked_fill_(~(std_a > eps)[:, :, None] | ~(std_b > eps)[:, None, :], 0.0)
            for j, c in zip(part, cov.clamp_(-1.0, 1.0).unbind(0)):
                out[j] = c
    return out


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
        self._sab = CrossSum()

    @property
    def n(self) -> int:
        return 0 if self.a is None else self.a.n

    @without_grad
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
        self._sab.add(la, lb)

    @property
    def sab(self) -> torch.Tensor:
        """Float64 total of X_a X_b^T (about the shifts), (Ca, Cb)."""
        total = self._sab.total
        return torch.zeros(self.ca, self.cb, dtype=torch.float64, device=self.device) if total is None else total

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

