"""Attention: ``scaled_dot_product_attention`` (grouped-query too) and ``nn.MultiheadAttention``.

softmax(q k^T / sqrt(E) + mask) v is unchanged when q and k permute their features alike (the
permutation cancels in q.k) and when v's features permute (the output's features follow). Heads
are batch-like axes shared by q, k and v; with grouped-query attention the g query heads that read
one key/value head move together with it.
"""

from __future__ import annotations

from graphrepair.discovery.axes import cat, kron
from graphrepair.discovery.context import Context, tensor_args
from graphrepair.discovery.rules.registry import fixed_out, module, nn, op, param_axes, unknown


@op("scaled_dot_product_attention")
def sdpa(ctx: Context):
    """softmax(q k^T / sqrt(E) + mask) v over (..., L, E), (..., S, E), (..., S, Ev):
    q and k share their feature permutation, batch/head axes are shared by q, k, v, and the
    output's features are v's."""
    q, k, v = ctx.arg("query"), ctx.arg("key"), ctx.arg("value")
    qa, ka, va = ctx.axes(q), ctx.axes(k), ctx.axes(v)
    if qa is None or ka is None or va is None or len(qa) != len(ka) or len(ka) != len(va):
        return unknown(ctx)
    gqa = bool(ctx.arg("enable_gqa", False)) and len(qa) >= 3 and qa[-3].size != ka[-3].size
    for d in range(len(qa) - 2):
        if gqa and d == len(qa) - 3:
            # grouped-query attention: query head h reads key/value head h // g, so the query
            # heads are kron(key/value heads, g): whole groups move with their key/value head
            g = qa[d].size // ka[d].size
            if ka[d].size * g != qa[d].size:
                return unknown(ctx, f"grouped-query attention at node '{ctx.node.name}': "
                                    f"{qa[d].size} query heads for {ka[d].size} key/value heads")
            ctx.unify(qa[d], kron(ka[d], ctx.fresh(g)))
            ctx.unify(ka[d], va[d])
            continue
        ctx.unify(qa[d], ka[d])
        ctx.unify(ka[d], va[d])
    ctx.unify(qa[-1], ka[-1])
    ctx.unify(ka[-2], va[-2])
    mask = ctx.arg("attn_mask")
    ma, ms = ctx.axes(mask), ctx.shape(mask)
    if ma is not None:
        target = qa[:-1] + [ka[-2]]
        tshape = [e.size for e in target]
        for i in range(1, len(ms) + 1):
            if ms[-i] == tshape[-i] and ms[-i] > 1:
                ctx.unify(ma[-i], target[-i])
    return qa[:-1] + [va[-1]]


@module(nn.MultiheadAttention)
def multihead_attention_module(ctx: Context):
    """nn.MultiheadAttention with one packed in-projection: the embedding axis of query, key and
    value is read by the in-projection's columns; within each head the q/k dims share one
    permutation (it cancels in q.k) and the v dims another (read back by out_proj's columns); the
    output embedding is out_proj's rows."""
    m: nn.MultiheadAttention = ctx.module()
    n = ctx.node
    q, k, v = ctx.arg("query", index=0), ctx.arg("key", index=1), ctx.arg("value", index=2)
    qa, ka, va = ctx.axes(q), ctx.axes(k), ctx.axes(v)
    if (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or qa is None
            or ka is None or va is None):
        return unknown(ctx, f"nn.MultiheadAttention at node '{n.name}' with separate q/k/v "
                            f"projections, bias_k/bias_v or add_zero_attn is not supported")
    e, h = m.embed_dim, m.num_heads
    d = e // h
    w_in = param_axes(ctx, "in_proj_weight")
    b_in = param_axes(ctx, "in_proj_bias")
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
    for a in tensor_args(n):
        if a not in (q, k, v):  # masks
            for dd, ee in enumerate(ctx.axes(a) or []):
                ctx.fix(ee, "attention mask", dd, a.name, structural=True)
    out = qa[:-1] + [w_out[0]]
    info = ctx.info(n)
    weights = info[1] if isinstance(info, tuple) and len(info) > 1 else None
    return (out, fixed_out(weights, "attention weights"))


@op("torchvision.models.swin_transformer.shifted_window_attention")
def shifted_window_attention(ctx: Context):
    """torchvision's fx-wrapped Swin attention (v1 and v2), read from its definition:
    ``input`` (B, H, W, C) -> pad, cyclic shift and window partition of H and W -> ``F.linear``
    with ``qkv_weight`` (3C, C) laid out as [q | k | v] x heads x head dims -> per head
    softmax(q.k + bias) v (v2: cosine attention, q and k normalised over the head dims, a per-head
    ``logit_scale``; the k part of ``qkv_bias`` is zeroed as a whole) -> ``F.linear`` with
    ``proj_weight`` (C, C) -> windows and shift undone. As for ``nn.MultiheadAttention``: the
    embedding axis of ``input`` is the columns of ``qkv_weight``; within each head the q/k dims
    share one permutation and the v dims another, read back by ``proj_weight``'s columns; the
    output embedding is ``proj_weight``'s rows. Heads keep their order (the per-head bias and
    logit scale are fixed), and H and W, which the windows mix, are fixed."""
    n = ctx.node
    x = ctx.arg("input", index=0)
    w_qkv, w_proj = ctx.arg("qkv_weight", index=1), ctx.arg("proj_weight", index=2)
    heads = ctx.arg("num_heads", index=5)
    xa, wa, pa = ctx.axes(x), ctx.axes(w_qkv), ctx.axes(w_proj)
    if (xa is None or wa is None or pa is None or len(xa) != 4 or len(wa) != 2 or len(pa) != 2
            or not isinstance(heads, int) or heads <= 0 or xa[-1].size % heads
            or wa[0].size != 3 * xa[-1].size or pa[1].size != xa[-1].size):
        return unknown(ctx, f"shifted_window_attention at node '{n.name}' with an input, weights or "
                            f"num_heads not laid out as torchvision's Swin")
    d = xa[-1].size // heads
    ctx.unify(xa[-1], wa[1])
    for dd in (1, 2):  # windows, shifts and padding mix the spatial positions
        ctx.fix(xa[dd], "shifted-window attention positions", dd, n.name, structural=True)
    qk = [ctx.fresh(d) for _ in range(heads)]
    vv = [ctx.fresh(d) for _ in range(heads)]
    ctx.unify(wa[0], cat(qk + qk + vv))
    ctx.unify(pa[1], cat(vv))
    for name, index, target in (("qkv_bias", 9, wa[0]), ("proj_bias", 10, pa[0])):
        ba = ctx.axes(ctx.arg(name, index=index))
        if ba is not None:
            ctx.unify(ba[0], target)
    for name, index in (("relative_position_bias", 3), ("logit_scale", 11)):
        a = ctx.arg(name, index=index)
        for dd, e in enumerate(ctx.axes(a) or []):
            ctx.fix(e, "per-head term of shifted-window attention: heads keep their order", dd,
                    getattr(a, "name", n.name), structural=True)
    return xa[:-1] + [pa[0]]
