"""Shape ops: view/reshape/flatten, permute/transpose, expand/repeat, cat/stack/split, indexing.

A merged axis carries the Kronecker product of its parts' layouts (row-major: channels in blocks of
the spatial size after a flatten); a split axis is factored into fresh variables (heads x head
dims). A concatenation carries each input's layout on its own block. Picking positions (an int
index, a partial slice) fixes the axis it picks from.
"""

from __future__ import annotations

import torch

from graphrepair.discovery.axes import Fixed, cat, kron
from graphrepair.discovery.context import Context, op_name
from graphrepair.discovery.rules.elementwise import no_tensor
from graphrepair.discovery.rules.registry import module, nn, norm_dim, op, unknown


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
    if op_name(ctx.node) in ("t", "numpy_T"):
        return out[::-1] if len(out) == 2 else out
    d0, d1 = ctx.arg("dim0", index=1), ctx.arg("dim1", index=2)
    if d0 is None and d1 is None:  # swapaxes names them axis0/axis1
        d0, d1 = ctx.arg("axis0", index=1), ctx.arg("axis1", index=2)
    if not isinstance(d0, int) or not isinstance(d1, int):
        return unknown(ctx)
    d0, d1 = norm_dim(d0, len(xa)), norm_dim(d1, len(xa))
    out[d0], out[d1] = out[d1], out[d0]
    return out


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
        return unknown(ctx, f"tensor indexing at node '{ctx.node.name}'")
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
            if not traced and i.indices(xs[d]) == (0, xs[d], 1):
                out.append(xa[d])  # a full slice keeps the axis
            else:  # positions are picked (bounds known only at run time count as picked)
                ctx.fix(xa[d], f"sliced at node '{ctx.node.name}'", d, src.name)
                out.append(None)
            d += 1
        else:
            return unknown(ctx)
    out.extend(xa[d:])
    shape = ctx.out_shape()
    return [Fixed(shape[k], "slice") if e is None else e for k, e in enumerate(out)]


@op("slice")
def slice_op(ctx: Context):
    """aten.slice(x, dim, start, end, step): a full slice keeps the axis, else it is fixed."""
    x = ctx.input()
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    dim = norm_dim(ctx.arg("dim", 0, index=1), len(xa))
    out = list(xa)
    if xs[dim] != os_[dim]:
        ctx.fix(xa[dim], f"sliced at node '{ctx.node.name}'", dim, x.name)
        out[dim] = Fixed(os_[dim], "slice")
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
