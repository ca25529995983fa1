"""One rule per op kind: which axes must carry the same permutation.

A rule receives the discovery ``Context`` (``ctx.node`` is the node) and returns the axis
expressions of the node's output: a list (one expression per axis) for a tensor, a tuple of such
lists for a tuple of tensors, None for a non-tensor. Rules are keyed by a canonical op name shared
by the module call (``nn.Linear``), the functional form (``F.linear``) and the ATen op
(``aten.linear``), see ``discover.op_name``. Adding an op is adding a row to ``RULES`` or
``MODULE_RULES``. Anything not in the tables fixes every axis it touches (``unknown``).

Axis conventions: Linear weight (out, in) acting on the last axis; ConvNd weight
(out, in/groups, *kernel) with channels on axis 1 (or 0 for unbatched input); ConvTransposeNd
weight (in, out/groups, *kernel); Embedding weight (num, dim).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from graphrepair.discovery.axes import Fixed, cat, kron
from graphrepair.discovery.discover import Context, _tensor_args, is_aten, op_name
from graphrepair.discovery.trace import TensorInfo

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _same_as(ctx: Context, x) -> list:
    return list(ctx.axes(x))


def _spatial(size: int, what: str = "spatial axis") -> Fixed:
    return Fixed(size, "structural: " + what)


def elementwise(ctx: Context):
    """Elementwise with NumPy broadcasting: aligned axes of the same size carry one permutation.
    A size-1 (broadcast) axis places no constraint; a residual add joins its inputs' groups."""
    shape = ctx.out_shape()
    if shape is None:
        return unknown(ctx)
    out = ctx.fresh_axes(shape)
    acts = 0
    for a in _tensor_args(ctx.node):
        axes, s = ctx.axes(a), ctx.shape(a)
        if axes is None or s is None:
            continue
        if len(s) > len(shape):
            return unknown(ctx)
        if a.op != "get_attr" and len(s) == len(shape) and s == shape and len(s) > 0:
            acts += 1
        for k in range(1, len(s) + 1):
            if s[-k] == shape[-k] and s[-k] > 1:
                ctx.unify(axes[-k], out[-k])
    if acts >= 2:
        name = op_name(ctx.node)
        ctx.join("residual" if name in ("add", "sub") else "gate" if name == "mul" else "elementwise")
    elif op_name(ctx.node) == "mul" and len([a for a in _tensor_args(ctx.node) if a.op != "get_attr"]) >= 2:
        ctx.join("gate")
    return out


def unknown(ctx: Context, why: str | None = None):
    """No rule: fix every axis the op touches, with the reason."""
    n = ctx.node
    desc = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    if n.op == "call_module":
        desc = f"module {type(ctx.module()).__name__}"
    reason = why or f"no rule for {desc} at node '{n.name}'"
    ctx.fix_all(reason)
    return _fixed_out(ctx.info(n), reason)


def _fixed_out(info, reason):
    if isinstance(info, TensorInfo):
        return [Fixed(s, reason) for s in info.shape]
    if isinstance(info, tuple):
        return tuple(_fixed_out(i, reason) for i in info)
    return None


def no_tensor(ctx: Context):
    """Ops that only read metadata (size, dim, asserts): no constraint when no tensor comes out."""
    if isinstance(ctx.info(ctx.node), TensorInfo):
        return unknown(ctx)
    return None


def constant(ctx: Context):
    """A tensor created in the graph from no tensor: its values may depend on position."""
    return _fixed_out(ctx.info(ctx.node), f"constant created at node '{ctx.node.name}'")


def uniform_constant(ctx: Context):
    """zeros/ones/full: every position holds the same value, so any permutation keeps it."""
    info = ctx.info(ctx.node)
    return ctx.fresh_axes(info.shape) if isinstance(info, TensorInfo) else None


def first_arg(ctx: Context):
    """Same layout as the first tensor argument (to, contiguous, clone, type_as, *_like)."""
    x = ctx.node.args[0] if ctx.node.args else None
    ax_ = ctx.axes(x)
    if ax_ is None or ctx.shape(x) != ctx.out_shape():
        return unknown(ctx)
    return _same_as(ctx, x)


# --------------------------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------------------------


def _linear(ctx: Context, x, w_axes, b_axes):
    """y = x W^T + b on the last axis: W rows are the output channels, W columns read x."""
    xa = ctx.axes(x)
    if xa is None or w_axes is None or len(w_axes) != 2:
        return unknown(ctx)
    ctx.unify(xa[-1], w_axes[1])
    if b_axes is not None:
        ctx.unify(b_axes[0], w_axes[0])
    return xa[:-1] + [w_axes[0]]


def linear(ctx: Context):
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    return _linear(ctx, x, ctx.axes(w), ctx.axes(b))


def _param_axes(ctx: Context, attr: str):
    m = ctx.module()
    t = getattr(m, attr, None)
    if not isinstance(t, torch.Tensor):
        return None
    return ctx.param(f"{ctx.node.target}.{attr}", tuple(t.shape))


def linear_module(ctx: Context):
    return _linear(ctx, ctx.node.args[0], _param_axes(ctx, "weight"), _param_axes(ctx, "bias"))


def _conv(ctx: Context, x, w, b, groups: int, transposed: bool):
    """Conv weight (out, in/g, *k); transposed conv weight (in, out/g, *k).

    groups == 1: the weight's input axis reads the input channels.
    depthwise (one input channel per group): output channel j*m + t comes from input channel j,
      so the output is kron(input layout, m) and input channels may move freely.
    other groups: the same permutation inside every input group (kron(fixed[g], v)) and an
      independent permutation inside each output group (cat of g variables).
    """
    xa, xs = ctx.axes(x), ctx.shape(x)
    if xa is None or w is None:
        return unknown(ctx)
    k = len(w) - 2
    c = len(xs) - k - 1
    out_shape = ctx.out_shape()
    for d in range(2, len(w)):
        ctx.fix(w[d], "convolution kernel axis", structural=True)
    for d in range(c + 1, len(xs)):
        ctx.fix(xa[d], "convolution spatial axis", structural=True)
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    cin = xs[c]
    if groups == 1:
        ctx.unify(xa[c], w_in)
        out_c = w_out
    elif cin == groups:  # depthwise: each group reads one input channel
        m = w_out.size if transposed else w_out.size // groups
        if transposed:
            ctx.unify(xa[c], w_in)
            out_c = kron(xa[c], w_out)
        else:
            ctx.unify(w_out, kron(xa[c], ctx.fresh(m)))
            out_c = w_out
    else:
        if transposed:
            ctx.unify(xa[c], cat([ctx.fresh(cin // groups) for _ in range(groups)]))
            ctx.unify(w_in, xa[c])
            out_c = kron(Fixed(groups, "channels stay inside their conv group"), w_out)
        else:
            ctx.unify(xa[c], kron(Fixed(groups, "channels stay inside their conv group"), w_in))
            ctx.unify(w_out, cat([ctx.fresh(w_out.size // groups) for _ in range(groups)]))
            out_c = w_out
    if b is not None:
        ctx.unify(b[0], out_c)
    return xa[:c] + [out_c] + [_spatial(s) for s in out_shape[c + 1:]]


def conv_module(ctx: Context):
    m = ctx.module()
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return _conv(ctx, ctx.node.args[0], _param_axes(ctx, "weight"), _param_axes(ctx, "bias"),
                 m.groups, transposed)


def conv(ctx: Context):
    name = op_name(ctx.node)
    x, w, b = ctx.arg(0, "input"), ctx.axes(ctx.arg(1, "weight")), ctx.axes(ctx.arg(2, "bias"))
    if name == "convolution":  # aten.convolution(x, w, b, stride, pad, dil, transposed, out_pad, groups)
        return _conv(ctx, x, w, b, ctx.arg(8, "groups", 1), bool(ctx.arg(6, "transposed", False)))
    if name.startswith("conv_transpose"):  # (x, w, b, stride, padding, output_padding, groups, dilation)
        return _conv(ctx, x, w, b, ctx.arg(6, "groups", 1), True)
    return _conv(ctx, x, w, b, ctx.arg(6, "groups", 1), False)  # (x, w, b, stride, pad, dil, groups)


def _channel_vectors(ctx: Context, x, vectors, channel_axis: int):
    """Per-channel parameters/buffers (BN weight, bias, running stats) follow the channel axis."""
    xa = ctx.axes(x)
    for v in vectors:
        va = ctx.axes(v) if not isinstance(v, list) else v
        if va is not None and len(va) == 1 and va[0].size == xa[channel_axis].size:
            ctx.unify(va[0], xa[channel_axis])


def batch_norm(ctx: Context):
    """Per-channel statistics and affine on axis 1: channels may move freely."""
    x = ctx.node.args[0]
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    c = 1 if len(xa) > 1 else 0
    _channel_vectors(ctx, x, [a for a in _tensor_args(ctx.node) if a is not x], c)
    out = list(xa)
    info = ctx.info(ctx.node)
    if isinstance(info, tuple):  # native forms also return (mean, invstd) per channel
        return tuple([out] + [[xa[c]] if isinstance(i, TensorInfo) and i.shape == (xa[c].size,)
                              else _fixed_out(i, "batch-norm side output") for i in info[1:]])
    return out


def batch_norm_module(ctx: Context):
    x = ctx.node.args[0]
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    c = 1 if len(xa) > 1 else 0
    vecs = [p for p in (_param_axes(ctx, a) for a in ("weight", "bias", "running_mean", "running_var"))
            if p is not None]
    _channel_vectors(ctx, x, vecs, c)
    return list(xa)


def _layer_norm(ctx: Context, x, normalized_ndim: int, vectors):
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


def layer_norm(ctx: Context):
    x, shape = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    vecs = [ctx.axes(ctx.arg(2, "weight"))]
    if op_name(ctx.node) != "rms_norm":
        vecs.append(ctx.axes(ctx.arg(3, "bias")))
    out = _layer_norm(ctx, x, k, vecs)
    info = ctx.info(ctx.node)
    if isinstance(info, tuple):  # native_layer_norm: (out, mean, rstd) over leading axes
        xa = ctx.axes(x)
        return tuple([out] + [[xa[d] if d < len(xa) - k else Fixed(1) for d in range(len(i.shape))]
                              for i in info[1:]])
    return out


def layer_norm_module(ctx: Context):
    m = ctx.module()
    k = len(m.normalized_shape) if hasattr(m, "normalized_shape") else 1
    return _layer_norm(ctx, ctx.node.args[0], k, [_param_axes(ctx, "weight"), _param_axes(ctx, "bias")])


def _group_norm(ctx: Context, x, groups: int, vectors):
    """Statistics per block of C/G channels: a permutation must keep channels in their block."""
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    c = xa[1]
    if 1 < groups < c.size:
        ctx.unify(c, cat([ctx.fresh(c.size // groups) for _ in range(groups)]))
    _channel_vectors(ctx, x, [v for v in vectors if v is not None], 1)
    return list(xa)


def group_norm(ctx: Context):
    x = ctx.arg(0, "input")
    if op_name(ctx.node) == "native_group_norm":  # (x, w, b, N, C, HxW, group, eps)
        out = _group_norm(ctx, x, ctx.arg(6, "group"), [ctx.axes(ctx.arg(1, "weight")),
                                                         ctx.axes(ctx.arg(2, "bias"))])
        return tuple([out] + [_fixed_out(i, "group-norm statistics") for i in ctx.info(ctx.node)[1:]])
    return _group_norm(ctx, x, ctx.arg(1, "num_groups"), [ctx.axes(ctx.arg(2, "weight")),
                                                          ctx.axes(ctx.arg(3, "bias"))])


def group_norm_module(ctx: Context):
    m = ctx.module()
    return _group_norm(ctx, ctx.node.args[0], m.num_groups,
                       [_param_axes(ctx, "weight"), _param_axes(ctx, "bias")])


def _embedding(ctx: Context, idx, w):
    """Rows are addressed by token ids (data): the row axis is fixed, the dim axis is free."""
    ia = ctx.axes(idx)
    if ia is None or w is None:
        return unknown(ctx)
    ctx.fix(w[0], "embedding rows are addressed by token ids", record=False)
    return list(ia) + [w[1]]


def embedding(ctx: Context):
    if is_aten(ctx.node):  # aten.embedding(weight, indices, ...)
        return _embedding(ctx, ctx.arg(1, "indices"), ctx.axes(ctx.arg(0, "weight")))
    return _embedding(ctx, ctx.arg(0, "input"), ctx.axes(ctx.arg(1, "weight")))


def embedding_module(ctx: Context):
    return _embedding(ctx, ctx.node.args[0], _param_axes(ctx, "weight"))


def prelu(ctx: Context):
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    xa, wa = ctx.axes(x), ctx.axes(w)
    if xa is None or wa is None:
        return unknown(ctx)
    if wa[0].size > 1:
        ctx.unify(wa[0], xa[1 if len(xa) > 1 else 0])
    return list(xa)


def prelu_module(ctx: Context):
    xa = ctx.axes(ctx.node.args[0])
    wa = _param_axes(ctx, "weight")
    if xa is None:
        return unknown(ctx)
    if wa[0].size > 1:
        ctx.unify(wa[0], xa[1 if len(xa) > 1 else 0])
    return list(xa)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def sdpa(ctx: Context):
    """softmax(q k^T / sqrt(E) + mask) v over (..., L, E), (..., S, E), (..., S, Ev):
    q and k share their feature permutation, batch/head axes are shared by q, k, v, and the
    output's features are v's."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    qa, ka, va = ctx.axes(q), ctx.axes(k), ctx.axes(v)
    if qa is None or ka is None or va is None or len(qa) != len(ka) or len(ka) != len(va):
        return unknown(ctx)
    if ctx.arg(7, "enable_gqa", False):
        return unknown(ctx, f"grouped-query attention at node '{ctx.node.name}' is not supported")
    for d in range(len(qa) - 2):
        ctx.unify(qa[d], ka[d])
        ctx.unify(ka[d], va[d])
    ctx.unify(qa[-1], ka[-1])
    ctx.unify(ka[-2], va[-2])
    mask = ctx.arg(3, "attn_mask")
    ma, ms = ctx.axes(mask), ctx.shape(mask)
    if ma is not None:
        target = qa[:-1] + [ka[-2]]
        tshape = [e.size for e in target]
        for i in range(1, len(ms) + 1):
            if ms[-i] == tshape[-i] and ms[-i] > 1:
                ctx.unify(ma[-i], target[-i])
    return qa[:-1] + [va[-1]]


def multihead_attention_module(ctx: Context):
    """nn.MultiheadAttention with one packed in-projection: the embedding axis of query, key and
    value is read by the in-projection's columns; within each head the q/k dims share one
    permutation (it cancels in q.k) and the v dims another (read back by out_proj's columns); the
    output embedding is out_proj's rows."""
    m: nn.MultiheadAttention = ctx.module()
    n = ctx.node
    q = n.args[0] if n.args else n.kwargs.get("query")
    k = n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
    v = n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
    qa, ka, va = ctx.axes(q), ctx.axes(k), ctx.axes(v)
    if (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or qa is None
            or ka is None or va is None):
        return unknown(ctx, f"nn.MultiheadAttention at node '{n.name}' with separate q/k/v "
                            f"projections, bias_k/bias_v or add_zero_attn is not supported")
    e, h = m.embed_dim, m.num_heads
    d = e // h
    w_in = _param_axes(ctx, "in_proj_weight")
    b_in = _param_axes(ctx, "in_proj_bias")
    w_out = ctx.param(f"{n.target}.out_proj.weight", tuple(m.out_proj.weight.shape))
    b_out = (ctx.param(f"{n.target}.out_proj.bias", tuple(m.out_proj.bias.shape))
             if m.out_proj.bias is not None else None)
    for a in (qa, ka, va):
        ctx.unify(a[-1], w_in[1])
    for a in (ka, va):  # attention mixes positions: key/value positions stay
        for dd in range(len(a) - 1):
            ctx.fix(a[dd], "attention key/value positions", dd, n.name, structural=True)
    qk = [ctx.fresh(d) for _ in range(h)]
    vv = [ctx.fresh(d) for _ in range(h)]
    ctx.unify(w_in[0], cat(qk + qk + vv))
    if b_in is not None:
        ctx.unify(b_in[0], w_in[0])
    ctx.unify(w_out[1], cat(vv))
    if b_out is not None:
        ctx.unify(b_out[0], w_out[0])
    for a in _tensor_args(n):
        if a not in (q, k, v):  # masks
            for dd, ee in enumerate(ctx.axes(a) or []):
                ctx.fix(ee, "attention mask", dd, a.name, structural=True)
    out = qa[:-1] + [w_out[0]]
    info = ctx.info(n)
    weights = info[1] if isinstance(info, tuple) and len(info) > 1 else None
    return (out, _fixed_out(weights, "attention weights"))


# --------------------------------------------------------------------------------------------
# matrix products
# --------------------------------------------------------------------------------------------


def _matmul(ctx: Context, a, b):
    aa, ba = ctx.axes(a), ctx.axes(b)
    out_shape = ctx.out_shape()
    if aa is None or ba is None or out_shape is None:
        return None
    a1, b1 = len(aa) == 1, len(ba) == 1
    ctx.unify(aa[-1], ba[0] if b1 else ba[-2])
    rows = [] if a1 else [aa[-2]]
    cols = [] if b1 else [ba[-1]]
    batch_a, batch_b = aa[:-2], ba[:-2]
    nb = len(out_shape) - len(rows) - len(cols)
    batch = ctx.fresh_axes(out_shape[:nb])
    for src in (batch_a, batch_b):
        for i in range(1, len(src) + 1):
            if src[-i].size == batch[-i].size and src[-i].size > 1:
                ctx.unify(src[-i], batch[-i])
    return batch + rows + cols


def matmul(ctx: Context):
    """a @ b contracts a's last axis with b's second-to-last (batch axes broadcast)."""
    out = _matmul(ctx, ctx.node.args[0], ctx.node.args[1])
    return unknown(ctx) if out is None else out


def addmm(ctx: Context):
    """beta*bias + a @ b (GPT-2's Conv1D stores its weight (in, out) and calls this)."""
    bias, a, b = ctx.node.args[0], ctx.node.args[1], ctx.node.args[2]
    out = _matmul(ctx, a, b)
    if out is None:
        return unknown(ctx)
    ba, bs = ctx.axes(bias), ctx.shape(bias)
    if ba is not None:
        for i in range(1, len(bs) + 1):
            if bs[-i] == out[-i].size and bs[-i] > 1:
                ctx.unify(ba[-i], out[-i])
    return out


# --------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------


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


def reshape(ctx: Context):
    x = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs.get("input")
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    out = reshape_axes(ctx, xa, xs, os_)
    return unknown(ctx) if out is None else out


def permute_op(ctx: Context):
    x = ctx.node.args[0]
    xa = ctx.axes(x)
    dims = ctx.node.args[1:] if len(ctx.node.args) > 2 or isinstance(ctx.node.args[1], int) \
        else ctx.node.args[1]
    if "dims" in ctx.node.kwargs:
        dims = ctx.node.kwargs["dims"]
    if xa is None:
        return unknown(ctx)
    return [xa[_norm_dim(d, len(xa))] for d in dims]


def transpose(ctx: Context):
    xa = ctx.axes(ctx.node.args[0])
    if xa is None:
        return unknown(ctx)
    out = list(xa)
    if op_name(ctx.node) in ("t", "numpy_T") or len(ctx.node.args) < 3:
        if len(out) == 2:
            out = [out[1], out[0]]
        return out
    d0, d1 = (_norm_dim(d, len(xa)) for d in ctx.node.args[1:3])
    out[d0], out[d1] = out[d1], out[d0]
    return out


def movedim(ctx: Context):
    xa = ctx.axes(ctx.node.args[0])
    src, dst = ctx.node.args[1], ctx.node.args[2]
    if xa is None or not isinstance(src, int) or not isinstance(dst, int):
        return unknown(ctx)
    out = list(xa)
    e = out.pop(_norm_dim(src, len(xa)))
    out.insert(_norm_dim(dst, len(xa)), e)
    return out


def expand(ctx: Context):
    """Broadcast size-1 axes: every copy holds the same values, so the new axes are free."""
    xa, xs, os_ = ctx.axes(ctx.node.args[0]), ctx.shape(ctx.node.args[0]), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    out = ctx.fresh_axes(os_)
    for k in range(1, len(xs) + 1):
        if xs[-k] == os_[-k]:
            ctx.unify(xa[-k], out[-k])
    return out


def repeat(ctx: Context):
    """x.repeat(r0, r1, ...): axis k becomes kron(fixed[r_k], axis k) (the same permutation in every copy)."""
    xa, xs, os_ = ctx.axes(ctx.node.args[0]), ctx.shape(ctx.node.args[0]), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    lead = len(os_) - len(xs)
    out = [Fixed(s, "repeat") for s in os_[:lead]]
    for k, e in enumerate(xa):
        r = os_[lead + k] // xs[k]
        out.append(kron(Fixed(r, "repeat copies"), e) if xs[k] > 1 else Fixed(os_[lead + k], "repeat"))
    return out


def squeeze_unsqueeze(ctx: Context):
    xa, os_ = ctx.axes(ctx.node.args[0]), ctx.out_shape()
    if xa is None or os_ is None:
        return unknown(ctx)
    kept = [e for e in xa if e.size != 1]
    out, it = [], iter(kept)
    for s in os_:
        out.append(Fixed(1) if s == 1 else next(it))
    return out


def cat_op(ctx: Context):
    """Concatenation: the joined axis carries each input's layout on its own block."""
    tensors = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs.get("tensors")
    dim = ctx.arg(1, "dim", 0)
    axes = [ctx.axes(t) for t in tensors]
    if any(a is None for a in axes):
        return unknown(ctx)
    axes = [a for a, t in zip(axes, tensors) if ctx.shape(t) != (0,)]
    nd = len(axes[0])
    dim = _norm_dim(dim, nd)
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


def stack(ctx: Context):
    tensors = ctx.node.args[0]
    dim = ctx.arg(1, "dim", 0)
    axes = [ctx.axes(t) for t in tensors]
    if any(a is None for a in axes):
        return unknown(ctx)
    for a in axes[1:]:
        for x, y in zip(axes[0], a):
            ctx.unify(x, y)
    out = list(axes[0])
    out.insert(_norm_dim(dim, len(out) + 1), Fixed(len(axes), "stacked inputs"))
    return out


def split(ctx: Context):
    """split/chunk/split_with_sizes/unbind: the input axis is the concatenation of the pieces."""
    x = ctx.node.args[0]
    xa, info = ctx.axes(x), ctx.info(ctx.node)
    name = op_name(ctx.node)
    if xa is None or not isinstance(info, tuple):
        return unknown(ctx)
    dim = ctx.arg(1 if name == "unbind" else 2, "dim", 0)
    dim = _norm_dim(dim, len(xa))
    if name == "unbind":
        ctx.fix(xa[dim], "unbind splits an axis into separate tensors", dim, x.name)
        return tuple(xa[:dim] + xa[dim + 1:] for _ in info)
    pieces = [ctx.fresh(i.shape[dim]) for i in info]
    ctx.unify(xa[dim], cat(pieces))
    return tuple(xa[:dim] + [p] + xa[dim + 1:] for p in pieces)


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


def slice_op(ctx: Context):
    """aten.slice(x, dim, start, end, step): a full slice keeps the axis, else it is fixed."""
    x = ctx.node.args[0]
    xa, xs, os_ = ctx.axes(x), ctx.shape(x), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    dim = _norm_dim(ctx.arg(1, "dim", 0), len(xa))
    out = list(xa)
    if xs[dim] != os_[dim]:
        ctx.fix(xa[dim], f"sliced at node '{ctx.node.name}'", dim, x.name)
        out[dim] = Fixed(os_[dim], "slice")
    return out


def select(ctx: Context):
    """aten.select(x, dim, index): picks one position of an axis (fixed) and drops it."""
    x = ctx.node.args[0]
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    dim = _norm_dim(ctx.arg(1, "dim", 0), len(xa))
    ctx.fix(xa[dim], f"indexed by position at node '{ctx.node.name}'", dim, x.name)
    return xa[:dim] + xa[dim + 1:]


def reduction(ctx: Context):
    """Sum/mean/max... over some axes: invariant under any permutation of the reduced axes;
    the other axes pass through."""
    x = ctx.node.args[0]
    xa, os_ = ctx.axes(x), ctx.out_shape()
    if xa is None:
        return unknown(ctx)
    dims = ctx.arg(1, "dim", None)
    if isinstance(ctx.info(ctx.node), tuple):  # max/min with dim: (values, indices)
        return unknown(ctx)
    if dims is None or dims == [] or dims == ():
        reduced = set(range(len(xa)))
    else:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        if not all(isinstance(d, int) for d in dims):
            return unknown(ctx)
        reduced = {_norm_dim(d, len(xa)) for d in dims}
    keep = [e for k, e in enumerate(xa) if k not in reduced]
    if len(os_) == len(xa):  # keepdim
        return [Fixed(1) if k in reduced else e for k, e in enumerate(xa)]
    if len(os_) != len(keep):
        return unknown(ctx)
    return keep


def position_dependent(ctx: Context):
    """cumsum/argmax/sort...: the result depends on the order along ``dim``: that axis is fixed."""
    x = ctx.node.args[0]
    xa = ctx.axes(x)
    if xa is None:
        return unknown(ctx)
    dim = ctx.arg(1, "dim", None)
    if not isinstance(dim, int):
        return unknown(ctx)
    dim = _norm_dim(dim, len(xa))
    ctx.fix(xa[dim], f"{op_name(ctx.node)} depends on the order of axis {dim}", dim, x.name)
    os_ = ctx.out_shape()
    if os_ is not None and len(os_) == len(xa):
        return list(xa)
    return unknown(ctx)


def pool(ctx: Context):
    """Pooling/resampling over the trailing spatial axes: the channel axis passes through."""
    x = ctx.node.args[0]
    xa, xs = ctx.axes(x), ctx.shape(x)
    if xa is None:
        return unknown(ctx)
    m = re.search(r"([123])d", op_name(ctx.node))
    k = int(m.group(1)) if m else max(len(xs) - 2, 1)
    c = len(xs) - k - 1
    for d in range(c + 1, len(xs)):
        ctx.fix(xa[d], "pooled spatial axis", structural=True)
    info = ctx.info(ctx.node)
    shapes = [i.shape for i in info] if isinstance(info, tuple) else [info.shape]
    outs = [xa[:c + 1] + [_spatial(s) for s in sh[c + 1:]] for sh in shapes]
    return tuple(outs) if isinstance(info, tuple) else outs[0]


def pool_module(ctx: Context):
    m = ctx.module()
    name = type(m).__name__
    k = int(re.search(r"([123])d", name).group(1)) if re.search(r"([123])d", name) else None
    x = ctx.node.args[0]
    xa, xs = ctx.axes(x), ctx.shape(x)
    if xa is None:
        return unknown(ctx)
    k = k or max(len(xs) - 2, 1)
    c = len(xs) - k - 1
    for d in range(c + 1, len(xs)):
        ctx.fix(xa[d], "pooled spatial axis", structural=True)
    return xa[:c + 1] + [_spatial(s) for s in ctx.out_shape()[c + 1:]]


def flatten_module(ctx: Context):
    return reshape(ctx)


def getattr_rule(ctx: Context):
    """``x.T``/``x.mT`` are transposes; ``x.shape``/``x.dtype`` are not tensors."""
    attr = ctx.node.args[1]
    xa = ctx.axes(ctx.node.args[0])
    if not isinstance(ctx.info(ctx.node), TensorInfo):
        return None
    if xa is not None and attr == "T":
        return list(reversed(xa))
    if xa is not None and attr == "mT":
        return xa[:-2] + [xa[-1], xa[-2]]
    return unknown(ctx)


def tensor_identity_module(ctx: Context):
    xa = ctx.axes(ctx.node.args[0])
    if xa is None or ctx.shape(ctx.node.args[0]) != ctx.out_shape():
        return unknown(ctx)
    return list(xa)


def multi_output_same(ctx: Context):
    """native_dropout -> (out, mask): both have the input's layout."""
    xa = ctx.axes(ctx.node.args[0])
    info = ctx.info(ctx.node)
    if xa is None or not isinstance(info, tuple):
        return unknown(ctx)
    return tuple(list(xa) for _ in info)


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------

_ELEMENTWISE = """
add sub rsub mul div floor_divide remainder fmod pow maximum minimum where masked_fill masked_fill_
lerp addcmul addcdiv eq ne gt ge lt le logical_and logical_or logical_xor logical_not bitwise_not
relu relu_ relu6 gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish
hardswish_ hardsigmoid elu elu_ selu celu leaky_relu leaky_relu_ softplus softsign mish logsigmoid
tanhshrink threshold glu_none neg abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt erf erfc square
sin cos reciprocal sign clamp clamp_ clamp_min clamp_max clip nan_to_num isnan isinf isfinite round
floor ceil trunc dropout dropout_ alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d
softmax log_softmax _softmax _log_softmax _safe_softmax softmin
""".split()  # softmax along any axis is equivariant under a permutation of that axis

_FIRST_ARG = """
to _to_copy type type_as float double half bfloat16 contiguous clone detach detach_ alias
lift_fresh_copy zeros_like ones_like empty_like full_like fill_ zero_ requires_grad_ cpu cuda
_assert_tensor_metadata_passthrough
""".split()

_NO_TENSOR = """
size dim numel sym_size sym_numel sym_stride stride _assert_tensor_metadata _assert_scalar
sym_constrain_range_for_size _assert_async _set_grad_enabled __getattribute__
""".split()

RULES: dict[str, callable] = {
    **{name: elementwise for name in _ELEMENTWISE},
    **{name: first_arg for name in _FIRST_ARG},
    **{name: no_tensor for name in _NO_TENSOR},
    # creation ops: position-dependent values are fixed, uniform ones are free
    **{name: constant for name in "arange tensor scalar_tensor linspace eye tril triu rand randn "
                                  "randint randn_like rand_like _to_dense".split()},
    **{name: uniform_constant for name in "zeros ones full empty new_zeros new_ones new_full "
                                          "new_empty".split()},
    # layers with weights
    "linear": linear,
    "conv1d": conv, "conv2d": conv, "conv3d": conv, "convolution": conv, "_convolution": conv,
    "conv_transpose1d": conv, "conv_transpose2d": conv, "conv_transpose3d": conv,
    "batch_norm": batch_norm, "_native_batch_norm_legit_no_training": batch_norm,
    "_native_batch_norm_legit": batch_norm, "native_batch_norm": batch_norm,
    "instance_norm": batch_norm,
    "layer_norm": layer_norm, "native_layer_norm": layer_norm, "rms_norm": layer_norm,
    "group_norm": group_norm, "native_group_norm": group_norm,
    "embedding": embedding,
    "prelu": prelu, "_prelu_kernel": prelu,
    "scaled_dot_product_attention": sdpa,
    # matrix products
    "matmul": matmul, "mm": matmul, "bmm": matmul,
    "addmm": addmm, "baddbmm": addmm,
    # shape ops
    "view": reshape, "reshape": reshape, "_unsafe_view": reshape, "flatten": reshape,
    "unflatten": reshape, "view_as": reshape, "reshape_as": reshape,
    "squeeze": squeeze_unsqueeze, "unsqueeze": squeeze_unsqueeze, "squeeze_": squeeze_unsqueeze,
    "unsqueeze_": squeeze_unsqueeze,
    "permute": permute_op, "transpose": transpose, "t": transpose, "swapaxes": transpose,
    "swapdims": transpose, "movedim": movedim, "moveaxis": movedim,
    "expand": expand, "expand_as": expand, "broadcast_to": expand, "repeat": repeat,
    "cat": cat_op, "concat": cat_op, "concatenate": cat_op, "stack": stack,
    "split": split, "split_with_sizes": split, "chunk": split, "unbind": split, "tensor_split": split,
    "getitem": getitem, "slice": slice_op, "select": select, "getattr": getattr_rule,
    # reductions
    **{name: reduction for name in "mean sum amax amin std var logsumexp prod nansum nanmean "
                                   "norm linalg_vector_norm var_mean std_mean".split()},
    **{name: position_dependent for name in "cumsum cumprod argmax argmin sort argsort topk "
                                            "cummax cummin flip roll".split()},
    # pooling and resampling keep channels
    **{name: pool for name in """max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d
        adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
        adaptive_max_pool2d adaptive_max_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
        max_pool2d_with_indices max_pool3d_with_indices max_pool1d_with_indices interpolate
        upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d
        upsample_bicubic2d upsample_linear1d upsample_trilinear3d lp_pool2d""".split()},
    "native_dropout": multi_output_same,
}

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Mish,
    nn.LogSigmoid, nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)

MODULE_RULES: list[tuple[tuple[type, ...], callable]] = [
    ((nn.Linear,), linear_module),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
     conv_module),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), batch_norm_module),
    ((nn.LayerNorm, nn.RMSNorm), layer_norm_module),
    ((nn.GroupNorm,), group_norm_module),
    ((nn.Embedding,), embedding_module),
    ((nn.PReLU,), prelu_module),
    ((nn.MultiheadAttention,), multihead_attention_module),
    (_POINTWISE_MODULES, tensor_identity_module),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
      nn.UpsamplingBilinear2d), pool_module),
    ((nn.Flatten, nn.Unflatten), flatten_module),
]


def apply_rule(ctx: Context, node):
    """Dispatch ``node`` to its rule; unknown ops fix what they touch."""
    if node.op == "call_module":
        m = ctx.module()
        if node.target == "_guards_fn" or type(m).__name__ == "_GuardsFn":
            return None  # torch.export's input guards: reads shapes only
        for types, rule in MODULE_RULES:
            if isinstance(m, types):
                return rule(ctx)
        return unknown(ctx)
    rule = RULES.get(op_name(node))
    if rule is None:
        if not _tensor_args(node) and not isinstance(ctx.info(node), (TensorInfo, tuple)):
            return None  # pure Python arithmetic on sizes
        return unknown(ctx)
    return rule(ctx)
