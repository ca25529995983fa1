"""Fold eval-mode BatchNorm into the conv / linear producing its input.

An eval-mode batch norm is the per-channel affine (channel axis 1)

    BN(z) = gamma * (z - running_mean) / sqrt(running_var + eps) + beta = s * z + t,
    s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

so it folds like any affine (see ``fold_affine``): W' = diag(s) W, b' = s * b + t
(for a conv: scale output channels, axis 0 of the weight; for a transposed conv the out axis of
each group, axis 1). For call_module Conv/Linear -> BatchNorm pairs this uses torch's own
``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` (as
``torch.fx.experimental.optimization.fuse`` does). torch's version fails on a grouped
ConvTranspose (it broadcasts the (out,) scale against the out/groups weight axis), so grouped
transposed convs, and call_function graphs (torch.export), go through
``fold_affine.scale_producer`` instead.

Unlike ``fold_affines`` this removes the BatchNorm: its state_dict keys disappear. A BatchNorm in
training mode (batch statistics) is never folded.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from passes.base import PassResult, finish, graph_pass, propagate_shapes, start
from passes.fold_affine import check_producer, scale_producer
from passes.modules import (
    Arg,
    Producer,
    call_arg,
    describe_producer,
    get_attr_value,
    node_rank,
    parent_and_attr,
    replace_module,
)

aten = torch.ops.aten
F = torch.nn.functional

# (running_mean, running_var, training, eps) argument slots per batch-norm call_function.
_BN_SLOTS = {
    F.batch_norm: (Arg(1, "running_mean"), Arg(2, "running_var"), Arg(5, "training"), Arg(7, "eps")),
    aten.batch_norm.default: (Arg(3, "running_mean"), Arg(4, "running_var"), Arg(5, "training"), Arg(7, "eps")),
    aten._native_batch_norm_legit.default: (Arg(3, "running_mean"), Arg(4, "running_var"), Arg(5, "training"), Arg(7, "eps")),
    aten.native_batch_norm.default: (Arg(3, "running_mean"), Arg(4, "running_var"), Arg(5, "training"), Arg(7, "eps")),
    aten._native_batch_norm_legit_no_training.default: (Arg(3, "running_mean"), Arg(4, "running_var"), None, Arg(6, "eps")),
}


def _tensor_arg(gm: GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = get_attr_value(gm, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _bn_affine(gm: GraphModule, bn: Producer) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(s, t) in float64 of an eval-mode batch norm, or why it is not one."""
    if bn.is_module:
        m = bn.module
        if m.training:
            return f"BatchNorm {bn.node.target!r} is in training mode (uses batch statistics); call .eval()"
        if m.running_mean is None or m.running_var is None:
            return f"BatchNorm {bn.node.target!r} has no running statistics (track_running_stats=False)"
        mean, var, eps, gamma, beta = m.running_mean, m.running_var, m.eps, m.weight, m.bias
    else:
        rm_slot, rv_slot, training_slot, eps_slot = _BN_SLOTS[bn.node.target]
        if training_slot is not None and call_arg(bn.node, training_slot, False):
            return f"{bn.node.name} runs in training mode (batch statistics)"
        mean = _tensor_arg(gm, call_arg(bn.node, rm_slot))
        var = _tensor_arg(gm, call_arg(bn.node, rv_slot))
        if mean is None or var is None:
            return f"{bn.node.name} has no running statistics read from buffers"
        eps = float(call_arg(bn.node, eps_slot, 1e-5))
        gamma = _tensor_arg(gm, bn.arg(bn.rule.weight))
        beta = _tensor_arg(gm, bn.arg(bn.rule.bias))
    s = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        s = s * gamma.double()
    t = -mean.double() * s
    if beta is not None:
        t = t + beta.double()
    return s, t


def _remove_bn(gm: GraphModule, bn: Producer, replacement: Node) -> None:
    bn.output.replace_all_uses_with(replacement)
    graph = gm.graph
    inputs = [a for a in (*bn.node.args, *bn.node.kwargs.values()) if isinstance(a, Node)]
    graph.erase_node(bn.output)
    if bn.node is not bn.output:
        for user in list(bn.node.users):
            if not user.users:
                graph.erase_node(user)
        graph.erase_node(bn.node)
    prefixes = set()
    for a in inputs:
        if a.op == "get_attr" and not a.users:
            graph.erase_node(a)
            _drop_attr_if_unread(gm, str(a.target))
            prefixes.add(str(a.target).rpartition(".")[0])
    # torch.export keeps an unread get_attr of BatchNorm's num_batches_tracked: drop it too
    for prefix in prefixes:
        qualname = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
        readers = [n for n in graph.nodes if n.op == "get_attr" and n.target == qualname]
        if all(not n.users for n in readers):
            for n in readers:
                graph.erase_node(n)
            _drop_attr_if_unread(gm, qualname)
    if bn.is_module:
        gm.delete_submodule(str(bn.node.target))


def _drop_attr_if_unread(gm: GraphModule, qualname: str) -> None:
    """Delete the batch norm's tensor attribute once no get_attr node reads it (so its
    state_dict key goes away as it does when the BatchNorm module is deleted)."""
    if any(n.op == "get_attr" and n.target == qualname for n in gm.graph.nodes):
        return
    parent, attr = parent_and_attr(gm, qualname)
    if any(n.op == "call_module" and qualname.startswith(f"{n.target}.") for n in gm.graph.nodes):
        return
    if hasattr(parent, attr):
        delattr(parent, attr)


def _fold_one(gm: GraphModule, bn: Producer) -> str | list[str]:
    """Fold ``bn`` into its producer; returns notes, or the reason it stays."""
    if bn.is_module:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == bn.node.target]
        if len(calls) > 1:
            return f"BatchNorm {bn.node.target!r} is called {len(calls)} times"
    elif bn.node is not bn.output:
        others = [u for u in bn.node.users if u is not bn.output and u.users]
        if others:
            return f"{bn.node.name}'s saved statistics are used by {others[0].name}"
    affine = _bn_affine(gm, bn)
    if isinstance(affine, str):
        return affine
    s, t = affine
    src = bn.node.args[0] if bn.node.args else None
    p = describe_producer(gm, src) if isinstance(src, Node) else None
    if p is None or p.kind == "batchnorm":
        what = src.name if isinstance(src, Node) else repr(src)
        return f"its input {what} is not produced by a linear, conv or conv_transpose"
    rank = node_rank(bn.output)
    checked = check_producer(gm, p, bn.node, 1, rank, int(s.shape[0]))
    if isinstance(checked, str):
        return checked
    notes: list[str] = []
    use_torch = bn.is_module and p.is_module and not (p.kind == "conv_transpose" and p.groups > 1)
    if use_torch:
        module, was_training = p.module, p.module.training
        module.train(False)
        if p.kind == "linear":
            fused = fuse_linear_bn_eval(module, bn.module)
        else:
            fused = fuse_conv_bn_eval(module, bn.module, transpose=p.kind == "conv_transpose")
        module.train(was_training)
        fused.train(was_training)
        replace_module(gm, str(p.node.target), fused)
    else:
        weight, bias = checked
        notes = scale_producer(gm, p, weight, bias, s, t)
    _remove_bn(gm, bn, p.output)
    return notes


@graph_pass(in_place=False)
def fold_batchnorms(gm: GraphModule, inplace: bool = False, example_inputs: tuple | None = None) -> PassResult:
    """Fold every eval-mode batch norm whose input is a conv / linear output into that op.

    ``example_inputs`` (optional) are run once to learn tensor ranks in graphs without shape
    metadata (needed to fold Linear -> BatchNorm1d, whose channel axes agree only on 2-D data).
    counts: {"folded": n, "kept": m}; notes: ``"<bn node>: <reason>"`` per kept batch norm.
    """
    gm = start(gm, inplace, "fold_batchnorms")
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    candidates = []
    for node in gm.graph.nodes:
        p = describe_producer(gm, node)
        if p is not None and p.kind == "batchnorm":
            candidates.append(node)
    folded, kept, notes = 0, 0, []
    for node in candidates:
        bn = describe_producer(gm, node)
        name = node.name if bn.node is bn.output else bn.node.name
        result = _fold_one(gm, bn)
        if isinstance(result, str):
            kept += 1
            notes.append(f"{name}: {result}")
        else:
            folded += 1
            notes.extend(f"{name}: {line}" for line in result)
    finish(gm)
    return PassResult(gm, folded > 0, {"folded": folded, "kept": kept}, notes)

