"""Elementwise ops, activations, dtype/copy ops, constants and metadata reads.

Elementwise ops broadcast like NumPy: aligned axes of one size carry one permutation, so a
residual add, a gate or a layer scale joins its inputs' groups. Softmax along any axis is
equivariant under a permutation of that axis, and so is F.normalize (a division by a norm along
it). Ops that only read metadata add no constraint.
"""

from __future__ import annotations

import torch.fx

from graphrepair.discovery.context import Context, op_name, tensor_args
from graphrepair.discovery.rules.registry import broadcast_into, fixed_out, module, nn, op, same_as, unknown
from graphrepair.discovery.trace import TensorInfo

ELEMENTWISE = """
add sub rsub mul div floor_divide remainder fmod pow maximum minimum where masked_fill masked_fill_
lerp addcmul addcdiv eq ne gt ge lt le logical_and logical_or logical_xor logical_not bitwise_not
relu relu_ relu6 gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish
hardswish_ hardsigmoid elu elu_ selu celu leaky_relu leaky_relu_ softplus softsign mish logsigmoid
tanhshrink threshold glu_none neg abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt erf erfc square
sin cos reciprocal sign clamp clamp_ clamp_min clamp_max clip nan_to_num isnan isinf isfinite round
floor ceil trunc dropout dropout_ alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d
softmax log_softmax _softmax _log_softmax _safe_softmax softmin normalize hardshrink softshrink rrelu
"""

# In-place forms (``x.add_(y)``, what a symbolic trace keeps of ``out += identity`` in HF's
# ResNet): the result is ``x`` itself holding what the out-of-place op computes, which broadcasts
# ``y`` into ``x``'s shape, so they follow the out-of-place rule.
IN_PLACE = " ".join(f"{name}_" for name in ELEMENTWISE.split() if not name.endswith("_"))

POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Mish,
    nn.LogSigmoid, nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.Softmax2d, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
)


@op(ELEMENTWISE, IN_PLACE)
def elementwise(ctx: Context):
    """Elementwise with NumPy broadcasting: aligned axes of the same size carry one permutation.
    A size-1 (broadcast) axis places no constraint; a residual add joins its inputs' groups."""
    shape = ctx.out_shape()
    if shape is None:
        return unknown(ctx)
    out = ctx.fresh_axes(shape)
    acts = 0
    for a in tensor_args(ctx.node):
        axes, s = ctx.axes(a), ctx.shape(a)
        if axes is None or s is None:
            continue
        if not broadcast_into(ctx, axes, s, out):
            return unknown(ctx)
        if a.op != "get_attr" and len(s) == len(shape) and s == shape and len(s) > 0:
            acts += 1
    name = op_name(ctx.node).rstrip("_")  # an in-place op joins as its out-of-place form
    if acts >= 2:
        ctx.join("residual" if name in ("add", "sub") else "gate" if name == "mul" else "elementwise")
    elif name == "mul" and len([a for a in tensor_args(ctx.node) if a.op != "get_attr"]) >= 2:
        ctx.join("gate")
    return out


@op("""to _to_copy type type_as float double half bfloat16 contiguous clone detach detach_ alias
    lift_fresh_copy zeros_like ones_like empty_like full_like fill_ zero_ requires_grad_ cpu cuda
    _assert_tensor_metadata_passthrough""")
def first_arg(ctx: Context):
    """Same layout as the first tensor argument (to, contiguous, clone, type_as, *_like)."""
    x = ctx.input()
    if ctx.axes(x) is None or ctx.shape(x) != ctx.out_shape():
        return unknown(ctx)
    return same_as(ctx, x)


@op("torchvision.ops.stochastic_depth.stochastic_depth timm.layers.drop.drop_path")
def per_sample_scale(ctx: Context):
    """Stochastic depth (torchvision's fx-wrapped ``stochastic_depth``, timm's ``drop_path`` when
    it is a leaf of the trace): the identity in eval mode, in training a random scale per sample
    (rows of the batch axis), never per channel: every axis follows the input. Matched by the
    function's module and name: a user's function that happens to share the name is not trusted."""
    return first_arg(ctx)


@op("""size dim numel sym_size sym_numel sym_stride stride _assert_tensor_metadata _assert_scalar
    sym_constrain_range_for_size _assert_async _set_grad_enabled __getattribute__""")
def no_tensor(ctx: Context):
    """Ops that only read metadata (size, dim, asserts): no constraint when no tensor comes out."""
    if isinstance(ctx.info(ctx.node), TensorInfo):
        return unknown(ctx)
    return None


@op("arange tensor scalar_tensor linspace eye rand randn randint randn_like rand_like _to_dense")
def constant(ctx: Context):
    """A tensor created in the graph from no tensor: its values may depend on position."""
    return fixed_out(ctx.info(ctx.node), f"constant created at node '{ctx.node.name}'")


@op("zeros ones full empty new_zeros new_ones new_full new_empty")
def uniform_constant(ctx: Context):
    """zeros/ones/full: every position holds the same value, so any permutation keeps it."""
    info = ctx.info(ctx.node)
    return ctx.fresh_axes(info.shape) if isinstance(info, TensorInfo) else None


RESULT_FIELDS = {"values": 0, "indices": 1}  # torch.return_types of topk, sort, max, cummax...


@op("getattr")
def getattr_rule(ctx: Context):
    """``x.T``/``x.mT`` are transposes; ``x.shape``/``x.dtype`` are not tensors; ``.values`` /
    ``.indices`` of a (values, indices) result (topk, sort, max with dim) are its elements."""
    src, attr = ctx.node.args[0], ctx.node.args[1]
    xa = ctx.axes(src)
    if not isinstance(ctx.info(ctx.node), TensorInfo):
        return None
    v = ctx.values.get(src.name) if isinstance(src, torch.fx.Node) else None
    if isinstance(v, tuple) and attr in RESULT_FIELDS and RESULT_FIELDS[attr] < len(v):
        out = v[RESULT_FIELDS[attr]]
        if isinstance(out, list) and len(out) == len(ctx.out_shape()):
            return out
    if xa is not None and attr == "T":
        return list(reversed(xa))
    if xa is not None and attr == "mT":
        return xa[:-2] + [xa[-1], xa[-2]]
    return unknown(ctx)


@module(*POINTWISE_MODULES)
def tensor_identity_module(ctx: Context):
    """Activations, dropout and Identity modules: the output has the input's layout."""
    return first_arg(ctx)


@op("native_dropout")
def multi_output_same(ctx: Context):
    """native_dropout -> (out, mask): both have the input's layout."""
    xa = ctx.axes(ctx.input())
    info = ctx.info(ctx.node)
    if xa is None or not isinstance(info, tuple):
        return unknown(ctx)
    return tuple(list(xa) for _ in info)
