"""Normalisation layers: BatchNorm/InstanceNorm, LayerNorm/RMSNorm, GroupNorm.

Statistics taken per channel (BatchNorm) or over the normalised trailing axes (LayerNorm) are
equivariant under a permutation of those channels; the affine parameters and running statistics
follow them. GroupNorm's statistics are per block of C/G channels: a permutation must keep every
channel inside its block. The module forms hand the module's parameters to the functional rules.
"""

from __future__ import annotations

from graphrepair.discovery.axes import Fixed, wreath
from graphrepair.discovery.context import Context, op_name, tensor_args
from graphrepair.discovery.rules.registry import fixed_out, module, nn, op, param_axes, unknown
from graphrepair.discovery.trace import TensorInfo


def _channel_vectors(ctx: Context, xa, vectors, channel_axis: int):
    """Per-channel parameters/buffers (BN weight, bias, running stats) follow the channel axis."""
    for va in vectors:
        if va is not None and len(va) == 1 and va[0].size == xa[channel_axis].size:
            ctx.unify(va[0], xa[channel_axis])


def _batch_norm(ctx: Context, x, vectors):
    """Per-channel statistics and affine on axis 1 (0 unbatched): channels may move freely."""
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    c = 1 if len(xa) > 1 else 0
    _channel_vectors(ctx, xa, vectors, c)
    out = list(xa)
    info = ctx.info(ctx.node)
    if isinstance(info, tuple):  # native forms also return (mean, invstd) per channel
        return tuple([out] + [[xa[c]] if isinstance(i, TensorInfo) and i.shape == (xa[c].size,)
                              else fixed_out(i, "batch-norm side output") for i in info[1:]])
    return out


@op("batch_norm _native_batch_norm_legit_no_training _native_batch_norm_legit native_batch_norm "
    "instance_norm")
def batch_norm(ctx: Context):
    x = ctx.input()
    return _batch_norm(ctx, x, [ctx.axes(a) for a in tensor_args(ctx.node) if a is not x])


@module(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def batch_norm_module(ctx: Context):
    return _batch_norm(ctx, ctx.input(), [param_axes(ctx, a) for a in
                                          ("weight", "bias", "running_mean", "running_var")])


def _layer_norm(ctx: Context, x, vectors):
    """Normalisation over the last k axes is permutation-equivariant on each of them; the affine
    parameters follow those axes (channels-last models too)."""
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    for v in vectors:
        if v is None:
            continue
        for d in range(1, len(v) + 1):
            ctx.unify(v[-d], xa[-d])
    return list(xa)


@op("layer_norm native_layer_norm rms_norm")
def layer_norm(ctx: Context):
    x, shape = ctx.input(), ctx.arg("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    vecs = [ctx.axes(ctx.arg("weight"))]
    if op_name(ctx.node) != "rms_norm":
        vecs.append(ctx.axes(ctx.arg("bias")))
    out = _layer_norm(ctx, x, vecs)
    info = ctx.info(ctx.node)
    if isinstance(info, tuple):  # native_layer_norm: (out, mean, rstd) over leading axes
        xa = ctx.axes(x)
        return tuple([out] + [[xa[d] if d < len(xa) - k else Fixed(1) for d in range(len(i.shape))]
                              for i in info[1:]])
    return out


@module(nn.LayerNorm, nn.RMSNorm)
def layer_norm_module(ctx: Context):
    return _layer_norm(ctx, ctx.input(), [param_axes(ctx, "weight"), param_axes(ctx, "bias")])


def _group_norm(ctx: Context, x, groups, vectors):
    """Statistics per block of C/G channels: whole blocks may move, and each be permuted inside
    (a Wreath, ``axes.py``); a channel never leaves the block it is normalised with."""
    xa = ctx.axes(x)
    if xa is None or not isinstance(groups, int) or len(xa) < 2:
        return unknown(ctx)
    c = xa[1]
    if 1 < groups < c.size:
        ctx.unify(c, wreath(ctx.fresh(groups), [ctx.fresh(c.size // groups) for _ in range(groups)]))
    _channel_vectors(ctx, xa, vectors, 1)
    return list(xa)


@op("group_norm native_group_norm")
def group_norm(ctx: Context):
    x = ctx.input()
    vecs = [ctx.axes(ctx.arg("weight")), ctx.axes(ctx.arg("bias"))]
    if op_name(ctx.node) == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
        out = _group_norm(ctx, x, ctx.arg("group"), vecs)
        info = ctx.info(ctx.node)
        if not isinstance(info, tuple):
            return out
        return tuple([out] + [fixed_out(i, "group-norm statistics") for i in info[1:]])
    return _group_norm(ctx, x, ctx.arg("num_groups"), vecs)


@module(nn.GroupNorm)
def group_norm_module(ctx: Context):
    return _group_norm(ctx, ctx.input(), ctx.module().num_groups,
                       [param_axes(ctx, "weight"), param_axes(ctx, "bias")])
