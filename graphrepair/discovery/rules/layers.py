"""Layers with weights and matrix products: linear, bilinear, convolution, embedding (and
embedding bag), PReLU, matmul.

Axis conventions: Linear weight (out, in) acting on the last axis; ConvNd weight
(out, in/groups, *kernel) with channels on axis 1 (or 0 for unbatched input); ConvTransposeNd
weight (in, out/groups, *kernel); Embedding weight (num, dim). The module forms hand the module's
parameters to the same rule as the functional and ATen forms.
"""

from __future__ import annotations

import operator

from graphrepair.discovery.axes import Fixed, cat, kron, per_block, wreath
from graphrepair.discovery.context import STRUCTURAL, Context, is_aten, op_name
from graphrepair.discovery.rules.registry import module, nn, op, param_axes, spatial, unknown


def _linear(ctx: Context, x, w_axes, b_axes):
    """y = x W^T + b on the last axis: W rows are the output channels, W columns read x."""
    xa = ctx.axes(x)
    if xa is None or w_axes is None or len(w_axes) != 2:
        return unknown(ctx)
    ctx.unify(xa[-1], w_axes[1])
    if b_axes is not None:
        ctx.unify(b_axes[0], w_axes[0])
    return xa[:-1] + [w_axes[0]]


@op("linear")
def linear(ctx: Context):
    return _linear(ctx, ctx.input(), ctx.axes(ctx.arg("weight")), ctx.axes(ctx.arg("bias")))


@module(nn.Linear)
def linear_module(ctx: Context):
    return _linear(ctx, ctx.input(), param_axes(ctx, "weight"), param_axes(ctx, "bias"))


def _conv(ctx: Context, x, w, b, groups: int, transposed: bool):
    """Conv weight (out, in/g, *k); transposed conv weight (in, out/g, *k).

    groups == 1: the weight's input axis reads the input channels.
    depthwise (one input channel per group): output channel j*m + t comes from input channel j,
      so the output is kron(input layout, m) and input channels may move freely.
    other groups: output group j (channels j*m .. j*m+m-1, m = out/g) reads only input group j
      (channels j*n .. j*n+n-1, n = in/g), through weight rows j*m .. j*m+m-1. Whole groups may
      move, input group and output group together (one permutation G of the g groups), and each
      input group may take its own permutation p_j and each output group its own q_j: the input
      is wreath(G: p_1..p_g), the output wreath(G: q_1..q_g), and the weight's per-group axis
      (in/g for a conv, out/g for a transposed conv) is per_block(0, p's or q's): rows of new
      group j read it through p_j (or q_j). See ``axes.py``.
    """
    xa, xs = ctx.axes(x), ctx.shape(x)
    if xa is None or w is None or not isinstance(groups, int):
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
        order = ctx.fresh(groups)  # whole groups, input and output together
        ins = [ctx.fresh(cin // groups) for _ in range(groups)]
        ctx.unify(xa[c], wreath(order, ins))
        if transposed:  # rows are input channels; each row block permutes its output group
            outs = [ctx.fresh(w_out.size) for _ in range(groups)]
            ctx.unify(w_in, xa[c])
            ctx.unify(w_out, per_block(0, outs))
            out_c = wreath(order, outs)
        else:  # rows are output channels; each row block permutes the input group it reads
            ctx.unify(w_out, wreath(order, [ctx.fresh(w_out.size // groups) for _ in range(groups)]))
            ctx.unify(w_in, per_block(0, ins))
            out_c = w_out
    if b is not None:
        ctx.unify(b[0], out_c)
    return xa[:c] + [out_c] + [spatial(s) for s in out_shape[c + 1:]]


@module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_module(ctx: Context):
    m = ctx.module()
    return _conv(ctx, ctx.input(), param_axes(ctx, "weight"), param_axes(ctx, "bias"), m.groups,
                 isinstance(m, nn.modules.conv._ConvTransposeNd))


@op("conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d")
def conv(ctx: Context):
    transposed = op_name(ctx.node).startswith("conv_transpose") or bool(ctx.arg("transposed", False))
    return _conv(ctx, ctx.input(), ctx.axes(ctx.arg("weight")), ctx.axes(ctx.arg("bias")),
                 ctx.arg("groups", 1), transposed)


def _embedding(ctx: Context, idx, w):
    """Rows are addressed by token ids (data): the row axis is fixed, the dim axis is free."""
    ia = ctx.axes(idx)
    if ia is None or w is None:
        return unknown(ctx)
    ctx.fix(w[0], "embedding rows are addressed by token ids", record=False)
    return list(ia) + [w[1]]


@op("embedding")
def embedding(ctx: Context):
    if is_aten(ctx.node):  # aten.embedding(weight, indices, ...)
        return _embedding(ctx, ctx.arg("indices"), ctx.axes(ctx.arg("weight")))
    return _embedding(ctx, ctx.input(), ctx.axes(ctx.arg("weight")))


@module(nn.Embedding)
def embedding_module(ctx: Context):
    return _embedding(ctx, ctx.input(), param_axes(ctx, "weight"))


def _embedding_bag(ctx: Context, idx, w):
    """An embedding bag sums, averages or takes the maximum of its bag's rows channel by channel
    (``per_sample_weights`` scale whole rows): the dim axis is free, as an embedding's, and the
    output's bag axis is data."""
    if ctx.axes(idx) is None or w is None or len(w) != 2:
        return unknown(ctx)
    ctx.fix(w[0], "embedding rows are addressed by token ids", record=False)
    out = ctx.out_shape()
    return [spatial(out[0], "bags of an embedding bag"), w[1]]


@op("embedding_bag")
def embedding_bag(ctx: Context):
    if is_aten(ctx.node):  # aten's form returns the bags' offsets beside the output: not read here
        return unknown(ctx)
    return _embedding_bag(ctx, ctx.input(), ctx.axes(ctx.arg("weight")))


@module(nn.EmbeddingBag)
def embedding_bag_module(ctx: Context):
    return _embedding_bag(ctx, ctx.input(), param_axes(ctx, "weight"))


def _bilinear(ctx: Context, x1, x2, w, b):
    """y_k = x1^T W_k x2 + b_k on the last axes: W (out, in1, in2) reads x1's channels on its second
    axis and x2's on its third; its rows are the output channels. The leading axes are shared by
    both inputs and the output."""
    a1, a2 = ctx.axes(x1), ctx.axes(x2)
    if a1 is None or a2 is None or w is None or len(w) != 3 or len(a1) != len(a2):
        return unknown(ctx)
    ctx.unify(a1[-1], w[1])
    ctx.unify(a2[-1], w[2])
    for d in range(len(a1) - 1):
        ctx.unify(a1[d], a2[d])
    if b is not None:
        ctx.unify(b[0], w[0])
    return a1[:-1] + [w[0]]


@op("bilinear")
def bilinear(ctx: Context):
    return _bilinear(ctx, ctx.arg("input1"), ctx.arg("input2"), ctx.axes(ctx.arg("weight")), ctx.axes(ctx.arg("bias")))


@module(nn.Bilinear)
def bilinear_module(ctx: Context):
    return _bilinear(ctx, ctx.arg("input1"), ctx.arg("input2"), param_axes(ctx, "weight"), param_axes(ctx, "bias"))


_GATES = ((nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1))  # stacked gate blocks in each weight's rows


def _read(node) -> bool:
    """Whether anything reads ``node``'s value: taking a tuple's element (``h, (h_n, c_n) = ...``
    makes every element's node) reads nothing until something reads that element."""
    if node.op == "call_function" and node.target is operator.getitem:
        return any(_read(u) for u in node.users)
    return True


@module(nn.LSTM, nn.GRU, nn.RNN)
def recurrent_module(ctx: Context):
    """nn.LSTM, nn.GRU and nn.RNN: each layer and direction's hidden units may move, one
    permutation P for all of that cell's tensors. ``weight_ih`` and ``weight_hh`` stack the
    gates' rows gate by gate (G blocks of H rows: kron(gates, P)), ``weight_hh``'s columns read
    the cell's own state (P), biases follow the rows; ``weight_ih``'s columns read the layer's
    input: the model's features in the first layer, the previous layer's outputs (the forward
    then the backward direction's units) above it. The output carries the last layer's. The time
    axis is fixed (the steps are a recurrence). The final state (h_n, c_n: every layer and
    direction along one axis) carries P only with one layer and one direction; otherwise it is
    fixed where nothing reads it, and the whole layer is fixed where something does. Not handled
    (fixed): projections (``proj_size``), an initial state passed in, packed sequences."""
    m = ctx.module()
    x = ctx.input()
    xa, xs = ctx.axes(x), ctx.shape(x)
    if xa is None or xs is None or len(xs) not in (2, 3) or getattr(m, "proj_size", 0) or len(ctx.node.args) > 1 \
            or ctx.node.kwargs:
        return unknown(ctx)
    gates = next(g for t, g in _GATES if isinstance(m, t))
    directions, layers, h = 2 if m.bidirectional else 1, m.num_layers, m.hidden_size
    state_read = any(_read(u) for u in ctx.node.users
                     if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0))
    if state_read and layers * directions > 1:
        return unknown(ctx, f"the final state of {type(m).__name__} at node '{ctx.node.name}' (every layer and "
                            f"direction along one axis) is read")
    batched = len(xs) == 3
    time = (1 if m.batch_first else 0) if batched else 0
    ctx.fix(xa[time], "time steps of a recurrent layer", structural=True)
    inp, cells = xa[-1], []
    for k in range(layers):
        outs = []
        for d in range(directions):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = param_axes(ctx, "weight_ih" + suffix), param_axes(ctx, "weight_hh" + suffix)
            if w_ih is None or w_hh is None:
                return unknown(ctx)
            p = ctx.fresh(h)
            rows = kron(Fixed(gates, STRUCTURAL + "gates of a recurrent layer"), p)
            ctx.unify(w_ih[0], rows)
            ctx.unify(w_ih[1], inp)
            ctx.unify(w_hh[0], rows)
            ctx.unify(w_hh[1], p)
            for name in ("bias_ih", "bias_hh"):
                b = param_axes(ctx, name + suffix)
                if b is not None:
                    ctx.unify(b[0], rows)
            outs.append(p)
            cells.append(p)
        inp = cat(outs)
    out = list(xa[:-1]) + [inp]
    unit = cells[0] if layers * directions == 1 else Fixed(h, "final states of several layers or directions")
    state = [Fixed(layers * directions, STRUCTURAL + "layers and directions")] + (
        [xa[0 if m.batch_first else 1]] if batched else []) + [unit]
    if isinstance(m, nn.LSTM):
        return out, (state, list(state))
    return out, state


def _prelu(ctx: Context, x, wa):
    """One slope per channel (axis 1, or 0 unbatched) follows the channel; a shared slope is free."""
    xa = ctx.axes(x)
    if xa is None or wa is None:
        return unknown(ctx)
    if wa[0].size > 1:
        ctx.unify(wa[0], xa[1 if len(xa) > 1 else 0])
    return list(xa)


@op("prelu _prelu_kernel")
def prelu(ctx: Context):
    return _prelu(ctx, ctx.input(), ctx.axes(ctx.arg("weight")))


@module(nn.PReLU)
def prelu_module(ctx: Context):
    return _prelu(ctx, ctx.input(), param_axes(ctx, "weight"))


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


@op("matmul mm bmm")
def matmul(ctx: Context):
    """a @ b contracts a's last axis with b's second-to-last (batch axes broadcast)."""
    a, b = ctx.node.args[:2] if len(ctx.node.args) >= 2 else (ctx.input(), ctx.arg("other"))
    out = _matmul(ctx, a, b)
    return unknown(ctx) if out is None else out


@op("addmm baddbmm")
def addmm(ctx: Context):
    """beta*bias + a @ b (GPT-2's Conv1D stores its weight (in, out) and calls this)."""
    bias = ctx.input()
    a, b = (ctx.arg("mat1"), ctx.arg("mat2")) if op_name(ctx.node) == "addmm" else \
        (ctx.arg("batch1"), ctx.arg("batch2"))
    out = _matmul(ctx, a, b)
    if out is None:
        return unknown(ctx)
    ba, bs = ctx.axes(bias), ctx.shape(bias)
    if ba is not None:
        for i in range(1, len(bs) + 1):
            if bs[-i] == out[-i].size and bs[-i] > 1:
                ctx.unify(ba[-i], out[-i])
    return out


@op("grouped_mm_fallback _grouped_mm")
def grouped_mm(ctx: Context):
    """Mixture-of-experts grouped product (transformers' ``grouped_mm_fallback``, ATen's
    ``_grouped_mm``): ``out[s] = x[s] @ w[e(s)]`` with x (S, K) sorted by expert, w (E, K, N) and
    the expert of each row known only from the run-time offsets. Permuting K in x and in every
    expert's w alike, or N in every expert's w alike, keeps every row's product: the contracted
    axes unify, the output's columns are w's. The experts themselves are addressed by the offsets
    (positions), so their axis is fixed; one permutation is shared by all experts (a row's expert
    is known only at run time, so a per-expert layout of the output has no static form). Other
    forms (3-d inputs, a bias, a scale) are not read."""
    name = op_name(ctx.node)
    x, w = (ctx.arg("input"), ctx.arg("weight")) if name == "grouped_mm_fallback" else \
        (ctx.input(), ctx.arg("mat2"))
    xa, wa, os_ = ctx.axes(x), ctx.axes(w), ctx.out_shape()
    extra = name == "_grouped_mm" and any(ctx.arg(k) is not None for k in ("bias", "scale_a", "scale_b"))
    if xa is None or wa is None or len(xa) != 2 or len(wa) != 3 or extra or os_ is None or len(os_) != 2:
        return unknown(ctx, f"{name} at node '{ctx.node.name}' in a form other than (S, K) x (E, K, N)")
    ctx.fix(wa[0], f"experts are addressed by the run-time offsets at node '{ctx.node.name}'", 0, w.name)
    offs = ctx.axes(ctx.arg("offs"))
    if offs is not None and len(offs) == 1 and offs[0].size == wa[0].size:
        ctx.unify(offs[0], wa[0])
    ctx.unify(xa[-1], wa[1])
    return [xa[0], wa[2]]
