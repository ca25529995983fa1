"""Where to measure: observation points for alignment and reset points for REPAIR.

Both are chosen from the discovered spec and the traced graph, with no per-architecture code.

Observation points of a group (activation matching): the member nodes that feed an op mixing
channels (conv, linear, matmul, attention): the features the next layer reads, computed from the
model's inputs (not a weight transposed or parametrised in the forward). Every such point of
a group contributes (residual streams have many). A group with no such node (e.g. the per-head
dims inside a fused nn.MultiheadAttention) is aligned by weight matching instead.

Reset points (REPAIR): the output of every conv/linear whose channels were merged (after its
BatchNorm when it feeds exactly one), and, for the paper's full REPAIR, every residual-stream
output (an add joining two activations). The channel axis is the one carrying a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from passes.modules import producer_kind

from graphrepair.discovery import axes as ax
from graphrepair.discovery.context import op_name
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import GraphRepairError

MIXING_OPS = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "matmul", "mm", "bmm", "addmm", "baddbmm",
              "scaled_dot_product_attention", "einsum", "bilinear"}
MIXING_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention, torch.nn.Bilinear,
                  torch.nn.RNNBase)  # (a recurrent layer's input weights read its input's units)


@dataclass(frozen=True)
class ObservePoint:
    node: str
    axis: int
    positions: torch.Tensor  # (group size, R) positions along ``axis``


@dataclass(frozen=True)
class ResetPoint:
    node: str
    axis: int  # channel axis of the node's output
    channels: int
    kind: str  # "conv/linear" or "residual"
    producer: str  # the node whose output is reset (the conv/linear, or the add)


def _follows_the_batch(expr) -> bool:
    """An axis whose outer factor is the batch (fixed by a model input), merged with a free factor
    by a view, such as DeBERTa's (batch x heads, q, k) scores: its length follows the batch size,
    so per-channel statistics over it have no fixed length. Such an axis is neither observed nor
    reset (its group is aligned by its other points, or by weight matching)."""
    return isinstance(expr, ax.Kron) and isinstance(expr.outer, ax.Fixed) and "model input" in expr.outer.reason


def _mixes(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), MIXING_MODULES)
    if node.op in ("call_function", "call_method"):
        return op_name(node) in MIXING_OPS
    return False


def _activations(gm: torch.fx.GraphModule) -> set[str]:
    """The nodes whose values depend on a model input (a placeholder). A node computed from stored
    tensors alone (a weight transposed, scaled or parametrised in the forward) is no activation:
    its "samples" would be a weight's rows, the same in every batch."""
    live: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
            live.add(n.name)
    return live


def observation_points(spec: PermutationSpec) -> dict[str, list[ObservePoint]]:
    gm = spec.traced.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    live = _activations(gm)
    out: dict[str, list[ObservePoint]] = {}
    for g in spec.groups:
        vid = spec.var_of_group[g.name]
        seen = set()
        pts = []
        for m in g.nodes:
            n = nodes.get(m.name)
            if n is None or n.op in ("get_attr", "placeholder") or m.name in seen or m.name not in live:
                continue
            if not any(_mixes(gm, u) for u in n.users) or _follows_the_batch(spec.node_axes[m.name][m.axis]):
                continue
            pos = ax.positions(spec.node_axes[m.name][m.axis], vid)
            if pos is None:
                continue
            seen.add(m.name)
            pts.append(ObservePoint(m.name, m.axis, pos))
        out[g.name] = pts
    return out


def _channel_axis(spec: PermutationSpec, name: str, preferred: int | None) -> int | None:
    exprs = spec.node_axes.get(name)
    if not exprs:
        return None
    free = [d for d, e in enumerate(exprs) if not ax.is_fixed(e)]
    free = [d for d in free if not _follows_the_batch(exprs[d])]
    if preferred is not None:
        preferred = preferred % len(exprs)
        return preferred if preferred in free else None
    return free[-1] if free else None


def reset_points(spec: PermutationSpec, which: str = "all") -> list[ResetPoint]:
    """``which``: "all" (conv/linear outputs and residual outputs, the paper's full REPAIR) or
    "conv" (conv/linear outputs only)."""
    if which not in ("all", "conv"):
        raise GraphRepairError(f"points must be 'all' or 'conv', got {which!r}")
    gm = spec.traced.gm
    info = spec.traced.info
    out: list[ResetPoint] = []
    taken: set[str] = set()
    for n in gm.graph.nodes:
        kind = producer_kind(gm, n)
        if kind in ("linear", "conv", "conv_transpose"):
            target = n
            users = list(n.users)
            if len(users) == 1 and producer_kind(gm, users[0]) == "batchnorm":
                target = users[0]
                if isinstance(info.get(target.name), tuple):  # ATen BN returns (out, mean, invstd)
                    getters = [u for u in target.users if u.target.__name__ == "getitem" and u.args[1] == 0] \
                        if all(u.op == "call_function" for u in target.users) else []
                    if len(getters) != 1:
                        continue
                    target = getters[0]
            shape = info.get(target.name)
            if not hasattr(shape, "shape"):
                continue
            preferred = -1 if kind == "linear" else (1 if len(shape.shape) > 2 else 0)
            axis = _channel_axis(spec, target.name, preferred)
            if axis is None or target.name in taken:
                continue
            taken.add(target.name)
            out.append(ResetPoint(target.name, axis, shape.shape[axis], "conv/linear", n.name))
        elif which == "all" and spec.node_joins.get(n.name) == "residual":
            shape = info.get(n.name)
            axis = _channel_axis(spec, n.name, None)
            if axis is None or not hasattr(shape, "shape") or n.name in taken:
                continue
            taken.add(n.name)
            out.append(ResetPoint(n.name, axis, shape.shape[axis], "residual", n.name))
    return out
