"""Shape ops: view/reshape/flatten, permute/transpose, expand/repeat, cat/stack/split, indexing.

A merged axis carries the Kronecker product of its parts' layouts (row-major: channels in blocks of
the spatial size after a flatten); a split axis is factored into fresh variables (heads x head
dims). A concatenation carries each input's layout on its own block, and a contiguous slice
takes one block of its input's (the input cut there). Picking positions (an int index, a strided
slice, bounds known only at run time) fixes the axis it picks from.
"""

from __future__ import annotations

import torch

from graphrepair.discovery.axes import Fixed, cat, kron
from graphrepair.discovery.context import STRUCTURAL, Context, is_aten, op_name
from graphrepair.discovery.rules.elementwise import no_tensor
from graphrepair.discovery.rules.registry import module, nn, norm_dim, op, spatial, unknown


def reshape_axes(ctx: Context, in_axes, in_shape, out_shape):
    """view/reshape/flatten/unflatten: group input and output axes into runs of equal product.
    A merged axis carries kron(first, second, ...) (row-major); a split axis is factored into
    fresh variables, one per new axis (a restriction, hence safe)."""
    out = [Fixed(1)] * len(out_shape)
    ii = [k for k, s in enumerate(in_shape) if s != 1]
    oo = [k for k, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ii) or j < len(oo):
        if i >= len(ii) or j >= len(oo):
            return None
        gi, go = [ii[i]], [oo[j]]
        pi, po = in_shape[ii[i]], out_shape[oo[j]]
        i += 1
        j += 1
        while pi != po:
            if pi < po:
                if i >= len(ii):
                    return None
                gi.append(ii[i])
                pi *= in_shape[ii[i]]
                i += 1
            else:
                if j >= len(oo):
                    return None
                go.append(oo[j])
                po *= out_shape[oo[j]]
                j += 1
        merged = in_axes[gi[0]]
        for k in gi[1:]:
            merged = kron(merged, in_axes[k])
        if len(go) == 1:
            out[go[0]] = merged
            continue
        parts = [ctx.fresh(out_shape[k]) for k in go]
        split = parts[0]
        for p in parts[1:]:
            split = kron(split, p)
        ctx.unify(merged, split)
        for k, p in zip(go, parts):
            out[k] = p
    return out


@op("view reshape _unsafe_view flatten unflatten view_as reshape_as")
def reshape(ctx: Context):
    x = ctx.input()
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    out = reshape_axes(ctx, xa, xs, os_)
    return unknown(ctx) if out is None else out


@module(nn.Flatten, nn.Unflatten)
def flatten_module(ctx: Context):
    return reshape(ctx)


@op("permute")
def permute_op(ctx: Context):
    xa = ctx.axes(ctx.input())
    named = ctx.named_args()
    dims = (named.get("dims") if named is not None else ctx.node.kwargs.get("dims", ctx.node.args[1:])) or ()
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):  # x.permute((0, 2, 1))
        dims = dims[0]
    if xa is None or len(dims) != len(xa) or not all(isinstance(d, int) for d in dims):
        return unknown(ctx)
    return [xa[norm_dim(d, len(xa))] for d in dims]


@op("transpose t swapaxes swapdims")
def transpose(ctx: Context):
    xa = ctx.axes(ctx.input())
    if xa is None:
        return unknown(ctx)
    out = list(xa)
    if op_name(ctx.node) == "t":
        return out[::-1] if len(out) == 2 else out
    d0, d1 = ctx.arg("dim0", index=1), ctx.arg("dim1", index=2)
    if d0 is None and d1 is None:  # swapaxes names them axis0/axis1
        d0, d1 = ctx.arg("axis0", index=1), ctx.arg("axis1", index=2)
    if not isinstance(d0, int) or not isinstance(d1, int):
        return unknown(ctx)
    d0, d1 = norm_dim(d0, len(xa)), norm_dim(d1, len(xa))
    out[d0], out[d1] = out[d1], out[d0]
    return out


@op("numpy_T")
def reversed_axes(ctx: Context):
    """``x.T`` (aten.numpy_T, e.g. Falcon's ``x @ W.T``): every axis reversed."""
    xa = ctx.axes(ctx.input())
    return unknown(ctx) if xa is None else list(reversed(xa))


@op("mT mH adjoint")
def last_two_swapped(ctx: Context):
    """``x.mT`` / ``x.mH`` / ``x.adjoint()``: the last two axes swapped (mH also conjugates, an
    elementwise op)."""
    xa = ctx.axes(ctx.input())
    if xa is None or len(xa) < 2:
        return unknown(ctx)
    return xa[:-2] + [xa[-1], xa[-2]]


@op("movedim moveaxis")
def movedim(ctx: Context):
    xa = ctx.axes(ctx.input())
    src, dst = ctx.arg("source", index=1), ctx.arg("destination", index=2)
    if xa is None or not isinstance(src, int) or not isinstance(dst, int):
        return unknown(ctx)
    out = list(xa)
    e = out.pop(norm_dim(src, len(xa)))
    out.insert(norm_dim(dst, len(xa)), e)
    return out


@op("expand expand_as broadcast_to")
def expand(ctx: Context):
    """Broadcast size-1 axes: every copy holds the same values, so the new axes are free."""
    xa, xs, os_ = ctx.axes(ctx.input()), ctx.shape(ctx.input()), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    out = ctx.fresh_axes(os_)
    for k in range(1, len(xs) + 1):
        if xs[-k] == os_[-k]:
            ctx.unify(xa[-k], out[-k])
    return out


@op("repeat")
def repeat(ctx: Context):
    """x.repeat(r0, r1, ...): axis k becomes kron(fixed[r_k], axis k) (the same permutation in every copy)."""
    xa, xs, os_ = ctx.axes(ctx.input()), ctx.shape(ctx.input()), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    lead = len(os_) - len(xs)
    out = [Fixed(s, "repeat") for s in os_[:lead]]
    for k, e in enumerate(xa):
        r = os_[lead + k] // xs[k]
        out.append(kron(Fixed(r, "repeat copies"), e) if xs[k] > 1 else Fixed(os_[lead + k], "repeat"))
    return out


@op("repeat_interleave")
def repeat_interleave(ctx: Context):
    """x.repeat_interleave(r, dim) with a whole number r: each position along ``dim`` becomes r
    copies in a row, kron(axis, fixed[r]) (grouped-query attention's key/value heads repeated for
    their query heads); repeats given per position, or no ``dim`` (the flattened tensor): fixed."""
    x = ctx.input()
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    r, dim = ctx.arg("repeats", index=1), ctx.arg("dim", index=2)
    if xa is None or os_ is None or not isinstance(r, int) or not isinstance(dim, int) or len(os_) != len(xs):
        return unknown(ctx)
    dim = norm_dim(dim, len(xa))
    if os_[dim] != xs[dim] * r:
        return unknown(ctx)
    return xa[:dim] + [kron(xa[dim], Fixed(r, "repeat_interleave copies"))] + xa[dim + 1:]


@op("squeeze unsqueeze squeeze_ unsqueeze_")
def squeeze_unsqueeze(ctx: Context):
    xa, os_ = ctx.axes(ctx.input()), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    kept = [e for e in xa if e.size != 1]
    out, it = [], iter(kept)
    for s in os_:
        out.append(Fixed(1) if s == 1 else next(it))
    return out


@op("cat concat concatenate")
def cat_op(ctx: Context):
    """Concatenation: the joined axis carries each input's layout on its own block."""
    tensors = ctx.arg("tensors", index=0)
    dim = ctx.arg("dim", 0, index=1)
    axes = [ctx.axes(t) for t in tensors]
    if any(a is None for a in axes):
        return unknown(ctx)
    axes = [a for a, t in zip(axes, tensors) if ctx.shape(t) != (0,)]
    nd = len(axes[0])
    dim = norm_dim(dim, nd)
    out = []
    for d in range(nd):
        if d == dim:
            out.append(cat([a[d] for a in axes]))
        else:
            for a in axes[1:]:
                ctx.unify(axes[0][d], a[d])
            out.append(axes[0][d])
    if len(axes) > 1:
        ctx.join("concat")
    return out


@op("stack")
def stack(ctx: Context):
    tensors = ctx.arg("tensors", index=0)
    dim = ctx.arg("dim", 0, index=1)
    axes = [ctx.axes(t) for t in tensors]
    if any(a is None for a in axes):
        return unknown(ctx)
    for a in axes[1:]:
        for x, y in zip(axes[0], a):
            ctx.unify(x, y)
    out = list(axes[0])
    out.insert(norm_dim(dim, len(out) + 1), Fixed(len(axes), "stacked inputs"))
    return out


@op("split split_with_sizes chunk unbind tensor_split")
def split(ctx: Context):
    """split/chunk/split_with_sizes/unbind: the input axis is the concatenation of the pieces."""
    x = ctx.input()
    xa, info = ctx.axes(x), ctx.info(ctx.node)
    name = op_name(ctx.node)
    if xa is None or not isinstance(info, tuple):
        return unknown(ctx)
    dim = ctx.arg("dim", 0, index=1 if name == "unbind" else 2)
    dim = norm_dim(dim, len(xa))
    if name == "unbind":
        ctx.fix(xa[dim], "unbind splits an axis into separate tensors", dim, x.name)
        return tuple(xa[:dim] + xa[dim + 1:] for _ in info)
    pieces = [ctx.fresh(i.shape[dim]) for i in info]
    ctx.unify(xa[dim], cat(pieces))
    return tuple(xa[:dim] + [p] + xa[dim + 1:] for p in pieces)


def _glu(ctx: Context, dim):
    """glu(x, dim) = a * sigmoid(b) of x's two halves along ``dim``: the halves carry one
    permutation, the output's axis; the other axes pass through."""
    x = ctx.input()
    xa, os_ = ctx.axes(x), ctx.out_shape()
    if xa is None or os_ is None or not isinstance(dim, int) or len(os_) != len(xa):
        return unknown(ctx)
    dim = norm_dim(dim, len(xa))
    a, b = ctx.fresh(os_[dim]), ctx.fresh(os_[dim])
    ctx.unify(xa[dim], cat([a, b]))
    ctx.unify(a, b)
    return xa[:dim] + [a] + xa[dim + 1:]


@op("glu")
def glu(ctx: Context):
    """F.glu / aten.glu along ``dim`` (``_glu``)."""
    return _glu(ctx, ctx.arg("dim", -1, index=1))


@module(nn.GLU)
def glu_module(ctx: Context):
    """nn.GLU along its ``dim`` (``_glu``)."""
    return _glu(ctx, ctx.module().dim)


def _pixel_shuffle(ctx: Context, factor, shuffle: bool):
    """pixel_shuffle(r): input channel c r^2 + i r + j becomes output channel c at sub-position
    (i, j), so the input's channels are kron(output channels, r^2 sub-positions) and only whole
    blocks of r^2 move, with their output channel; pixel_unshuffle the other way round."""
    x = ctx.input()
    xa, xs, out = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or xs is None or out is None or len(xs) < 3 or not isinstance(factor, int):
        return unknown(ctx)
    c = len(xs) - 3
    for d in (c + 1, c + 2):
        ctx.fix(xa[d], "spatial axis of a pixel shuffle", structural=True)
    sub = Fixed(factor * factor, STRUCTURAL + "sub-pixel positions of a pixel shuffle")
    if shuffle:
        channels = ctx.fresh(out[c])
        ctx.unify(xa[c], kron(channels, sub))
    else:
        channels = kron(xa[c], sub)
    return xa[:c] + [channels] + [spatial(s) for s in out[c + 1:]]


@op("pixel_shuffle")
def pixel_shuffle(ctx: Context):
    return _pixel_shuffle(ctx, ctx.arg("upscale_factor", index=1), True)


@op("pixel_unshuffle")
def pixel_unshuffle(ctx: Context):
    return _pixel_shuffle(ctx, ctx.arg("downscale_factor", index=1), False)


@module(nn.PixelShuffle)
def pixel_shuffle_module(ctx: Context):
    return _pixel_shuffle(ctx, ctx.module().upscale_factor, True)


@module(nn.PixelUnshuffle)
def pixel_unshuffle_module(ctx: Context):
    return _pixel_shuffle(ctx, ctx.module().downscale_factor, False)


def _kernel_size(v, k: int) -> int | None:
    """The number of kernel positions of an unfold/fold ``kernel_size`` (an int or k ints)."""
    sizes = [v] * k if isinstance(v, int) else list(v) if isinstance(v, (tuple, list)) else None
    if sizes is None or len(sizes) != k or not all(isinstance(n, int) for n in sizes):
        return None
    count = 1
    for n in sizes:
        count *= n
    return count


def _im2col(ctx: Context, kernel_size, unfold: bool):
    """unfold (im2col): channel c's kernel positions become rows c K .. c K + K - 1 of the
    output's second axis (K positions of the kernel), its last axis the sliding blocks: the rows
    are kron(channels, K), the blocks fixed. fold is the inverse: its input rows are kron(output
    channels, K)."""
    x = ctx.input()
    xa, xs, out = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or xs is None or out is None:
        return unknown(ctx)
    k = _kernel_size(kernel_size, 2)
    if unfold:
        if len(xs) not in (3, 4) or k is None:
            return unknown(ctx)
        c = len(xs) - 3
        for d in (c + 1, c + 2):
            ctx.fix(xa[d], "spatial axis of an unfold", structural=True)
        rows = kron(xa[c], Fixed(k, STRUCTURAL + "kernel positions of an unfold"))
        return xa[:c] + [rows, spatial(out[-1], "sliding blocks of an unfold")]
    if len(xs) not in (2, 3) or k is None:
        return unknown(ctx)
    c = len(xs) - 2
    ctx.fix(xa[c + 1], "sliding blocks of a fold", structural=True)
    channels = ctx.fresh(out[c])
    ctx.unify(xa[c], kron(channels, Fixed(k, STRUCTURAL + "kernel positions of a fold")))
    return xa[:c] + [channels] + [spatial(n) for n in out[c + 1:]]


@op("unfold im2col")
def unfold_op(ctx: Context):
    if op_name(ctx.node) == "unfold" and (ctx.node.op == "call_method" or is_aten(ctx.node)):
        return unknown(ctx)  # Tensor.unfold (aten.unfold): a sliding window along one axis, not im2col
    return _im2col(ctx, ctx.arg("kernel_size", index=1), True)


@op("fold col2im")
def fold_op(ctx: Context):
    return _im2col(ctx, ctx.arg("kernel_size", index=2), False)


@module(nn.Unfold)
def unfold_module(ctx: Context):
    return _im2col(ctx, ctx.module().kernel_size, True)


@module(nn.Fold)
def fold_module(ctx: Context):
    return _im2col(ctx, ctx.module().kernel_size, False)


@op("grid_sample grid_sampler grid_sampler_2d grid_sampler_3d")
def grid_sample(ctx: Context):
    """Each channel is sampled at the grid's points, the same for every channel: the channels
    pass through, the grid's axes (the output's spatial axes) are data."""
    x = ctx.input()
    xa, xs, out = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    ga = ctx.axes(ctx.arg("grid", index=1))
    if xa is None or xs is None or out is None or ga is None or len(xs) not in (4, 5) or len(out) != len(xs):
        return unknown(ctx)
    for d in range(2, len(xs)):
        ctx.fix(xa[d], "spatial axis sampled by a grid", structural=True)
    for d, e in enumerate(ga):
        ctx.fix(e, "a sampling grid's axis", d, structural=True)
    ctx.unify(xa[0], ga[0])
    return [xa[0], xa[1]] + [spatial(n, "sampled by a grid") for n in out[2:]]


@op("getitem")
def getitem(ctx: Context):
    """Tuple element, or tensor indexing: full slices keep an axis; an int or a partial slice
    picks positions, so that axis is fixed."""
    src, idx = ctx.node.args
    v = ctx.values.get(src.name) if hasattr(src, "name") else None
    if isinstance(v, tuple):
        return v[idx] if isinstance(idx, int) and idx < len(v) else None
    xa, xs = ctx.axes(src), ctx.shape(src)
    if xa is None:
        return no_tensor(ctx)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, torch.fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        indices = _as_index_list(idx, len(xa))
        if indices is None:
            return unknown(ctx, f"tensor indexing at node '{ctx.node.name}'")
        return advanced_index(ctx, src, indices)
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d = [], 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(len(xa) - used):
                out.append(xa[d])
                d += 1
        elif i is None:
            out.append(Fixed(1))
        elif isinstance(i, int):
            ctx.fix(xa[d], f"indexed by position at node '{ctx.node.name}'", d, src.name)
            d += 1
        elif isinstance(i, slice):
            traced = any(isinstance(b, torch.fx.Node) for b in (i.start, i.stop, i.step))
            out.append(None if traced else sliced_axis(ctx, src, d, *i.indices(xs[d])))
            if traced:  # bounds known only at run time: positions are picked
                ctx.fix(xa[d], f"sliced at node '{ctx.node.name}'", d, src.name)
            d += 1
        else:
            return unknown(ctx)
    out.extend(xa[d:])
    shape = ctx.out_shape()
    return [Fixed(shape[k], "slice") if e is None else e for k, e in enumerate(out)]


def _as_index_list(idx: tuple, ndim: int) -> list | None:
    """``x[idx]`` with tensor indices as aten.index's list (None for an axis kept whole), when
    ``idx`` holds only tensor nodes, full slices and at most one Ellipsis; else None."""
    out: list = []
    for k, i in enumerate(idx):
        if i is Ellipsis:
            if Ellipsis in idx[k + 1:]:
                return None
            out.extend([None] * (ndim - (len(idx) - 1)))
        elif isinstance(i, slice) and i == slice(None):
            out.append(None)
        elif isinstance(i, torch.fx.Node):
            out.append(i)
        else:
            return None
    return out


def sliced_axis(ctx: Context, x, d: int, start: int, stop: int, step: int):
    """Axis ``d`` of ``x[..., start:stop:step, ...]`` (bounds already clipped by ``slice.indices``).

    A full slice keeps the axis. A contiguous block (step 1) is one block of the axis cut at
    ``start`` and ``stop``: x's layout is restricted to a concatenation (each block permuted within
    itself, as ``split`` does) and the slice carries its block's permutation, so a fused projection
    cut into q, k and v (Phi-3) or a head cut into rotary and pass-through dims (GPT-NeoX, GPT-J)
    keeps what each block may move. A strided slice picks interleaved positions: fixed."""
    xa, n = ctx.axes(x), ctx.shape(x)[d]
    if (start, stop, step) == (0, n, 1):
        return xa[d]
    if step == 1 and 0 <= start <= stop <= n:
        if start == stop:
            return Fixed(0, "empty slice")
        bounds = sorted({start, stop} - {0, n})
        pieces = ctx.solver.split(xa[d], bounds, f"node {ctx.node.name}")
        return pieces[bounds.index(start) + 1 if start else 0]
    ctx.fix(xa[d], f"sliced at node '{ctx.node.name}' with step {step}", d, x.name)
    return Fixed(len(range(start, stop, step)), "slice")


@op("slice")
def slice_op(ctx: Context):
    """aten.slice(x, dim, start, end, step): see ``sliced_axis``; bounds known only at run time
    pick positions (fixed)."""
    x = ctx.input()
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    dim = norm_dim(ctx.arg("dim", 0, index=1), len(xa))
    start, end, step = ctx.arg("start", index=2), ctx.arg("end", index=3), ctx.arg("step", 1, index=4)
    out = list(xa)
    if not all(b is None or isinstance(b, int) for b in (start, end, step)):
        ctx.fix(xa[dim], f"sliced at node '{ctx.node.name}'", dim, x.name)
        out[dim] = Fixed(os_[dim], "slice")
        return out
    out[dim] = sliced_axis(ctx, x, dim, *slice(start, end, step).indices(xs[dim]))
    if out[dim].size != os_[dim]:
        return unknown(ctx)
    return out


@op("narrow")
def narrow(ctx: Context):
    """x.narrow(dim, start, length): the contiguous block [start, start + length) of ``dim``."""
    x = ctx.input()
    xa, xs = ctx.axes(x), ctx.shape(x)
    dim, start, length = ctx.arg("dim", index=1), ctx.arg("start", index=2), ctx.arg("length", index=3)
    if xa is None or not all(isinstance(v, int) for v in (dim, start, length)):
        return unknown(ctx)
    dim = norm_dim(dim, len(xa))
    start = start + xs[dim] if start < 0 else start
    out = list(xa)
    out[dim] = sliced_axis(ctx, x, dim, start, start + length, 1)
    return out


@op("select")
def select(ctx: Context):
    """aten.select(x, dim, index): picks one position of an axis (fixed) and drops it."""
    x = ctx.input()
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    dim = norm_dim(ctx.arg("dim", 0, index=1), len(xa))
    ctx.fix(xa[dim], f"indexed by position at node '{ctx.node.name}'", dim, x.name)
    return xa[:dim] + xa[dim + 1:]


@op("torchvision.models.swin_transformer._patch_merging_pad")
def patch_merging_pad(ctx: Context):
    """torchvision's fx-wrapped Swin patch merging: (..., H, W, C) padded to even H and W, then
    the four interleaved (H/2, W/2) sub-grids concatenated on the channels, (..., H/2, W/2, 4C):
    the channel axis is four copies of the input's, kron(4, C); H and W are resampled (fixed)."""
    x = ctx.input()
    xa = ctx.axes(x)
    if xa is None or len(xa) < 3:
        return unknown(ctx)
    for dd in (-3, -2):
        ctx.fix(xa[dd], "patch merging resamples the spatial positions", len(xa) + dd, ctx.node.name,
                structural=True)
    out = ctx.out_shape()
    return xa[:-3] + [Fixed(out[-3], "patch merging"), Fixed(out[-2], "patch merging"),
                      kron(Fixed(4, "the four sub-grids of patch merging"), xa[-1])]


PAD_OPS = """pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
    replication_pad2d replication_pad3d _pad_circular"""


def pad_axes(ctx: Context, x, amounts):
    """Padding ``amounts`` (pairs from the last axis backwards, F.pad's order) on input ``x``: an
    axis with nothing added or cut keeps its layout (every position is padded alike in every
    channel: the constant, the reflection and the replication act along the padded axes only); a
    padded axis is resampled, so it is fixed."""
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or os_ is None or len(xs) != len(os_) or not isinstance(amounts, (list, tuple)) \
            or len(amounts) % 2 or len(amounts) // 2 > len(xa):
        return unknown(ctx)
    out = list(xa)
    for k in range(len(amounts) // 2):
        d = len(xa) - 1 - k
        before, after = amounts[2 * k], amounts[2 * k + 1]
        if before == 0 and after == 0 and xs[d] == os_[d]:
            continue
        ctx.fix(xa[d], f"padded at node '{ctx.node.name}'", d, x.name)  # an amount known only at run time counts as padding
        out[d] = Fixed(os_[d], "padded axis")
    return out


@op(PAD_OPS)
def pad(ctx: Context):
    """F.pad / aten.constant_pad_nd / reflection and replication pads (see ``pad_axes``)."""
    amounts = ctx.arg("pad", index=1)
    if amounts is None:
        amounts = ctx.arg("padding", index=1)
    return pad_axes(ctx, ctx.input(), amounts)


@module(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
        nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
def pad_module(ctx: Context):
    """The padding modules: their ``padding`` tuple is F.pad's."""
    return pad_axes(ctx, ctx.input(), tuple(ctx.module().padding))


def advanced_index(ctx: Context, x, indices):
    """``x[i0, i1, ...]`` with index tensors (aten.index.Tensor; ``None`` keeps an axis whole):
    an axis read through an index tensor is picked by position (fixed), and the index's own axes
    come out fixed (and are fixed in the index: a stored index must not move either); an axis
    kept whole keeps its layout. NumPy's placement: the index axes stand where the indexed axes
    were when these are adjacent, else first."""
    xa = ctx.axes(x)
    if xa is None or not isinstance(indices, (list, tuple)) or len(indices) > len(xa):
        return unknown(ctx)
    picked = [k for k, i in enumerate(indices) if i is not None]
    if not picked:
        return unknown(ctx)
    for k in picked:
        i = indices[k]
        if not isinstance(i, torch.fx.Node) or ctx.shape(i) is None:
            return unknown(ctx)
        if ctx.info(i).dtype == torch.bool:
            return unknown(ctx, f"boolean mask indexing at node '{ctx.node.name}'")
    os_ = ctx.out_shape()
    n_index = len(os_) - (len(xa) - len(picked))  # the broadcast index's axes
    if os_ is None or n_index < 0:
        return unknown(ctx)
    for k in picked:
        ctx.fix(xa[k], f"indexed by a tensor at node '{ctx.node.name}'", k, x.name)
        for d, e in enumerate(ctx.axes(indices[k]) or []):
            ctx.fix(e, f"index tensor of node '{ctx.node.name}'", d, indices[k].name)
    kept = [k for k in range(len(xa)) if k not in picked]
    adjacent = picked == list(range(picked[0], picked[-1] + 1))
    at = picked[0] if adjacent else 0
    before = [xa[k] for k in kept if k < at] if adjacent else []
    after = [xa[k] for k in kept if k > at] if adjacent else [xa[k] for k in kept]
    middle = [Fixed(os_[len(before) + j], "index positions") for j in range(n_index)]
    out = before + middle + after
    if [e.size for e in out] != list(os_):
        return unknown(ctx)
    return out


@op("index _unsafe_index")
def index(ctx: Context):
    """aten.index.Tensor (tensor indexing in an exported graph, e.g. CLIP's pooled token)."""
    return advanced_index(ctx, ctx.input(), ctx.arg("indices", index=1))


@op("gather take_along_dim")
def gather(ctx: Context):
    """torch.gather(x, dim, index): ``out[..., j, ...] = x[..., index[..., j, ...], ...]`` along
    ``dim``, elementwise along the other axes. Along ``dim`` x is read by position (fixed) and the
    output follows the index's layout; along another axis, when index and x have the same size,
    out, x and index carry one permutation (DeBERTa's relative-position scores: the heads merged
    with the batch stay free); an index shorter than x there reads a leading part of x: fixed."""
    x, index = ctx.input(), ctx.arg("index", index=2)
    if index is None:
        index = ctx.arg("indices", index=1)
    dim = ctx.arg("dim", index=1 if op_name(ctx.node) == "gather" else 2)
    xa, ia, xs, is_ = ctx.axes(x), ctx.axes(index), ctx.shape(x), ctx.shape(index)
    if xa is None or ia is None or not isinstance(dim, int) or len(xa) != len(ia) or ctx.out_shape() != is_:
        return unknown(ctx)
    dim = norm_dim(dim, len(xa))
    out = []
    for d in range(len(xa)):
        if d == dim:
            ctx.fix(xa[d], f"gathered by position at node '{ctx.node.name}'", d, x.name)
            out.append(ia[d])
        elif xs[d] == is_[d]:
            ctx.unify(xa[d], ia[d])
            out.append(xa[d])
        else:
            reason = f"gather at node '{ctx.node.name}' reads a leading part of axis {d}"
            ctx.fix(xa[d], reason, d, x.name)
            ctx.fix(ia[d], reason, d, index.name)
            out.append(Fixed(is_[d], reason))
    return out
