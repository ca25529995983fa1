"""Reductions, order-dependent ops, pooling and resampling.

A reduction over some axes is invariant under any permutation of them; the other axes pass
through. cumsum/argmax/sort... depend on the order along their axis, which is fixed. Pooling and
resampling act on the trailing spatial axes: the channel axis passes through.
"""

from __future__ import annotations

import re

import torch
import torch.fx

from graphrepair.discovery.axes import Fixed
from graphrepair.discovery.context import Context, op_name
from graphrepair.discovery.rules.registry import broadcast_into, module, nn, norm_dim, op, spatial, unknown
from graphrepair.discovery.trace import TensorInfo


@op("mean sum amax amin std var logsumexp prod nansum nanmean norm linalg_vector_norm var_mean std_mean")
def reduction(ctx: Context):
    """Sum/mean/max/norm... over some axes: invariant under any permutation of the reduced axes;
    the other axes pass through. ``dim`` is read by name (argument 1 of ``norm`` is ``p``)."""
    x = ctx.input()
    xa, os_ = ctx.axes(x), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    named = ctx.named_args()
    if named is None and len(ctx.node.args) > 1:  # no schema names argument 1: do not guess
        return unknown(ctx, f"cannot read the reduced axes of {op_name(ctx.node)} at node "
                            f"'{ctx.node.name}'")
    dims = ctx.arg("dim")
    if isinstance(ctx.info(ctx.node), tuple):  # max/min with dim: (values, indices)
        return unknown(ctx)
    if dims is None or dims == [] or dims == ():
        reduced = set(range(len(xa)))
    else:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        if not all(isinstance(d, int) for d in dims):
            return unknown(ctx)
        reduced = {norm_dim(d, len(xa)) for d in dims}
    keep = [e for k, e in enumerate(xa) if k not in reduced]
    if len(os_) == len(xa):  # keepdim
        return [Fixed(1) if k in reduced else e for k, e in enumerate(xa)]
    if len(os_) != len(keep):
        return unknown(ctx)
    return keep


@op("cumsum cumprod argmax argmin sort argsort topk cummax cummin flip roll")
def position_dependent(ctx: Context):
    """cumsum/argmax/sort/topk/flip/roll...: the result depends on the order along the op's axes,
    which are fixed (``dim``, or ``dims`` for flip and roll; sort and topk default to the last)."""
    x = ctx.input()
    xa = ctx.axes(x)
    if xa is None or ctx.named_args() is None:
        return unknown(ctx)
    name = op_name(ctx.node)
    dims = ctx.arg("dims") if name in ("flip", "roll") else ctx.arg("dim")
    if dims is None and name in ("sort", "argsort", "topk"):
        dims = -1
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims or not all(isinstance(d, int) for d in dims):
        return unknown(ctx)  # argmax without dim, roll without dims: the flat order
    dims = {norm_dim(d, len(xa)) for d in dims}
    for d in sorted(dims):
        ctx.fix(xa[d], f"{name} depends on the order of axis {d}", d, x.name)
    info = ctx.info(ctx.node)
    outs = list(info) if isinstance(info, tuple) else [info]  # sort/topk/cummax: (values, indices)
    if not all(isinstance(i, TensorInfo) and len(i.shape) == len(xa) for i in outs):
        return unknown(ctx)
    laid = [[Fixed(i.shape[d], f"{name} output") if d in dims else e for d, e in enumerate(xa)]
            for i in outs]
    return tuple(laid) if isinstance(info, tuple) else laid[0]


@op("tril triu tril_ triu_")
def triangular(ctx: Context):
    """tril/triu keep an entry or zero it by its row and column positions: the last two axes of
    the input (a weight masked in the forward, say) are fixed, and so are the output's; the
    leading axes pass through."""
    x = ctx.input()
    xa = ctx.axes(x)
    info = ctx.info(ctx.node)
    if xa is None or len(xa) < 2 or not isinstance(info, TensorInfo) or len(info.shape) != len(xa):
        return unknown(ctx)
    name = op_name(ctx.node)
    for d in (len(xa) - 2, len(xa) - 1):
        ctx.fix(xa[d], f"{name} depends on the positions along axis {d}", d, x.name)
    return xa[:-2] + [Fixed(s, f"{name} output") for s in info.shape[-2:]]


@op("cosine_similarity pairwise_distance")
def paired_reduction(ctx: Context):
    """cosine_similarity(x1, x2, dim) and pairwise_distance(x1, x2) (over the last axis): x1 and
    x2 broadcast together as an elementwise op, then the axis is reduced, which is invariant under
    a permutation both carry; the other axes pass through."""
    x1, x2, os_ = ctx.arg("x1", index=0), ctx.arg("x2", index=1), ctx.out_shape()
    if not all(isinstance(x, torch.fx.Node) and ctx.shape(x) is not None for x in (x1, x2)) or os_ is None:
        return unknown(ctx)
    shape = tuple(torch.broadcast_shapes(tuple(ctx.shape(x1)), tuple(ctx.shape(x2))))
    full = ctx.fresh_axes(shape)
    if not shape or any(ctx.axes(x) is None or not broadcast_into(ctx, ctx.axes(x), ctx.shape(x), full)
                        for x in (x1, x2)):
        return unknown(ctx)
    if op_name(ctx.node) == "cosine_similarity":
        dim, keep = ctx.arg("dim", 1, index=2), False
    else:
        dim, keep = -1, bool(ctx.arg("keepdim", False, index=4))
    if not isinstance(dim, int):
        return unknown(ctx)
    d = norm_dim(dim, len(shape))
    out = full[:d] + ([Fixed(1)] if keep else []) + full[d + 1:]
    return out if [e.size for e in out] == list(os_) else unknown(ctx)


@op("cdist")
def cdist(ctx: Context):
    """cdist(x1 (..., P, M), x2 (..., R, M)): distances over the M features, invariant under a
    permutation both carry; P follows x1's rows, R x2's, the leading axes broadcast."""
    x1, x2, os_ = ctx.arg("x1", index=0), ctx.arg("x2", index=1), ctx.out_shape()
    if not all(isinstance(x, torch.fx.Node) and ctx.shape(x) is not None for x in (x1, x2)) or os_ is None:
        return unknown(ctx)
    a1, a2, s1, s2 = ctx.axes(x1), ctx.axes(x2), ctx.shape(x1), ctx.shape(x2)
    if a1 is None or a2 is None or len(s1) < 2 or len(s2) < 2 or s1[-1] != s2[-1] or len(os_) < 2:
        return unknown(ctx)
    ctx.unify(a1[-1], a2[-1])
    out = ctx.fresh_axes(os_)
    if not all(broadcast_into(ctx, xa[:-2], xs[:-2], out[:-2]) for xa, xs in ((a1, s1), (a2, s2))):
        return unknown(ctx)
    ctx.unify(a1[-2], out[-2])
    ctx.unify(a2[-2], out[-1])
    return out


def _pool(ctx: Context, name: str):
    """Pooling/resampling over the trailing spatial axes (k of them, from the op's name: ``2d``;
    else all but the batch and channel axes): the channel axis passes through."""
    x = ctx.input()
    xa, xs, info = ctx.axes(x), ctx.shape(x), ctx.info(ctx.node)
    if xa is None or info is None:
        return unknown(ctx)
    m = re.search(r"([123])d", name)
    k = int(m.group(1)) if m else max(len(xs) - 2, 1)
    c = len(xs) - k - 1
    if c < 0:
        return unknown(ctx)
    for d in range(c + 1, len(xs)):
        ctx.fix(xa[d], "pooled spatial axis", structural=True)
    shapes = [i.shape for i in info] if isinstance(info, tuple) else [info.shape]
    outs = [xa[:c + 1] + [spatial(s) for s in sh[c + 1:]] for sh in shapes]
    return tuple(outs) if isinstance(info, tuple) else outs[0]


@op("""max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    _adaptive_avg_pool2d _adaptive_avg_pool3d max_pool2d_with_indices max_pool3d_with_indices
    max_pool1d_with_indices interpolate upsample_nearest1d upsample_nearest2d upsample_nearest3d
    upsample_bilinear2d upsample_bicubic2d upsample_linear1d upsample_trilinear3d lp_pool1d lp_pool2d lp_pool3d""")
def pool(ctx: Context):
    return _pool(ctx, op_name(ctx.node))


@module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d, nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)
def pool_module(ctx: Context):
    return _pool(ctx, type(ctx.module()).__name__)


@op("einsum")
def einsum(ctx: Context):
    """out[o] = sum over the other letters of the product of the operands, each axis named by a
    letter: when every axis that carries letter L (in any operand, and in the output) is permuted
    by one permutation of L, the products are those of relabelled indices and the sums run over
    the same terms, so the output is permuted on its L axes by the same permutation. All axes of
    one letter are unified (a letter repeated in one operand too: its diagonal). An ellipsis
    (broadcast axes) or a letter whose axes differ in size (size-1 broadcasting) is not read:
    the fallback fixes the axes."""
    n = ctx.node
    eq = n.args[0] if n.args else n.kwargs.get("equation")
    operands = list(n.args[1:]) or list(n.kwargs.get("operands", []))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or "..." in eq:
        return unknown(ctx, f"einsum at node '{n.name}' without an equation of letters only "
                            f"(an ellipsis broadcasts axes)")
    lhs, arrow, rhs = eq.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow:  # implicit output: the letters that occur once, in alphabetical order
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    axes = [ctx.axes(o) for o in operands]
    if (len(terms) != len(operands) or any(a is None or len(a) != len(t) for a, t in zip(axes, terms))
            or not all(c.isalpha() for c in "".join(terms) + rhs)):
        return unknown(ctx)
    by_letter: dict[str, list] = {}
    for term, exprs in zip(terms, axes):
        for letter, e in zip(term, exprs):
            by_letter.setdefault(letter, []).append(e)
    if any(c not in by_letter for c in rhs) or any(len({e.size for e in es}) > 1 for es in by_letter.values()):
        return unknown(ctx, f"einsum at node '{n.name}' broadcasts a letter over axes of different sizes")
    for es in by_letter.values():
        for e in es[1:]:
            ctx.unify(es[0], e)
    return [by_letter[c][0] for c in rhs]
