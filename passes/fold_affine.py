"""Fold per-channel affine maps (apply-mode resets, ChannelAffine) into the op producing their input.

A node y = s * x + t (s, t of shape (C,), broadcast along the channel axis) whose input x is the
output of a single op P is removed by rewriting P's parameters (computed in float64, stored in
the parameter's dtype):

    Linear       y = x W^T + b, W (out, in):         W' = diag(s) W,  b' = s * b + t
                 addmm(b, x, M), M = W^T (in, out):   M' = M diag(s)   (scale columns)
    ConvNd       W (out, in/groups, k...):            W'[o] = s[o] W[o],  b' = s * b + t
    ConvTranspNd W (in, out/groups, k...), groups g:  output channel o = q * (out/g) + j reads
                 W[q-th block of in/g rows, j], so W viewed (g, in/g, out/g, k...) is scaled
                 by s viewed (g, 1, out/g, 1...);  b' = s * b + t
    BatchNorm    y = gamma * xhat + beta:             gamma' = s * gamma,  beta' = s * beta + t
                 (the conv before it is left alone: architecture and state_dict keys stay)
    Add          y = s * (P1 + P2) + t, each Pi foldable with the add as only user:
                 scale P1 and P2 by s, shift only P1 by t (P2 when only P2 has a bias).

Channel axes: linear outputs have their channels on the last axis; conv, conv-transpose and
batch-norm outputs on axis 1 (axis 0 for an unbatched conv input). The affine's ``dim`` must be
that axis.

Each candidate goes through match (``describe_producer``), check (a reason string or None) and
rewrite. A missing bias is created as a new parameter (reported in ``notes``). Candidates that
fail a check stay in the graph as one ``ChannelAffine`` each and their reason is recorded as
``"<node name>: <reason>"``. ``fold_plan`` tells, changing nothing, what the pass would do with
each affine (fold, fold but create a bias, or stay and why): a caller that wants the model's own
parameters only can decide before the affines have their values.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from passes.base import PassResult, deepcopy_quietly, finish, graph_pass, propagate_shapes, start
from passes.errors import PassError
from passes.modules import (
    MATMUL,
    Arg,
    Producer,
    TensorSource,
    describe_producer,
    get_attr_value,
    get_module,
    node_rank,
    parent_and_attr,
    replace_module,
    trace_tensor_source,
)
from passes.reset import ChannelAffine, Reset

aten = torch.ops.aten

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}


# ---------------------------------------------------------------------------------------------
# Where a producer keeps its tensors


@dataclass(frozen=True)
class _Slot:
    """A parameter a fold rewrites: attribute path, the tensor, the graph nodes reading it."""

    qualname: str
    tensor: torch.Tensor
    nodes: tuple[Node, ...] = ()
    transposed: bool = False


def _resolve(gm: GraphModule, p: Producer) -> tuple[_Slot, _Slot | None] | str:
    """(weight slot, bias slot or None) of producer ``p``, or the reason they cannot be rewritten."""
    if p.is_module:
        m, name = p.module, str(p.node.target)
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            return f"module {name!r} is lazy and not initialised yet"
        if torch.nn.utils.parametrize.is_parametrized(m):
            return f"module {name!r} has parametrized tensors; fold into its original parameters by hand"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name!r} has forward hooks that may change its output"
        if m.weight is None:
            return f"module {name!r} has no affine weight (affine=False)"
        if not isinstance(m.weight, nn.Parameter):
            return f"{name}.weight is not a parameter (weight norm or a derived tensor?)"
        bias = None
        if m.bias is not None:
            if not isinstance(m.bias, nn.Parameter):
                return f"{name}.bias is not a parameter"
            bias = _Slot(f"{name}.bias", m.bias)
        return _Slot(f"{name}.weight", m.weight), bias
    rule = p.rule
    w_arg = p.arg(rule.weight)
    if w_arg is None:
        return f"{p.node.name} has no weight (a batch norm without affine parameters)"
    src = trace_tensor_source(w_arg)
    if isinstance(src, str):
        return src
    weight = _slot_from_source(gm, src)
    if isinstance(weight, str):
        return weight
    bias = None
    b_arg = p.arg(rule.bias)
    if b_arg is not None:
        if not (isinstance(b_arg, Node) and b_arg.op == "get_attr"):
            return f"the bias of {p.node.name} is not read from a parameter ({b_arg})"
        bias = _slot_from_source(gm, TensorSource(str(b_arg.target), (b_arg,), False))
        if isinstance(bias, str):
            return bias
    return weight, bias


def _slot_from_source(gm: GraphModule, src: TensorSource) -> _Slot | str:
    try:
        value = get_attr_value(gm, src.qualname)
    except PassError as exc:
        return str(exc)
    if not isinstance(value, torch.Tensor):
        return f"{src.qualname!r} is a {type(value).__name__}, not a tensor"
    return _Slot(src.qualname, value, src.nodes, src.transposed)


def _storage_key(t: torch.Tensor) -> tuple:
    if t.numel() == 0:
        return ("id", id(t))
    return (t.device, t.untyped_storage().data_ptr())


def storage_names(gm: GraphModule) -> dict[tuple, list[str]]:
    """Storage key -> the names of every parameter and buffer of ``gm`` on that storage."""
    out: dict[tuple, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        out.setdefault(_storage_key(t), []).append(name)
    return out


def _sharing_reason(gm: GraphModule, p: Producer, slots: list[_Slot],
                    storage: dict[tuple, list[str]] | None = None) -> str | None:
    """Why rewriting ``slots`` would also change some other op, or None. ``storage``: the
    ``storage_names(gm)`` of the unchanged module, when the caller checks many producers."""
    if p.is_module:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == p.node.target]
        if len(calls) > 1:
            return f"module {p.node.target!r} is called {len(calls)} times in the graph"
    own = {n for s in slots for n in s.nodes}
    for s in slots:
        for n in s.nodes:
            if len(n.users) != 1:
                return f"{s.qualname!r} is read by {len(n.users)} ops"
    names = {s.qualname for s in slots}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n not in own and str(n.target) in names:
            return f"{n.target!r} is also read by get_attr node {n.name}"
        if n.op == "call_module" and n is not p.node:
            prefix = f"{n.target}."
            if any(q.startswith(prefix) for q in names):
                return f"{sorted(names)[0]!r} belongs to module {n.target!r}, which is called elsewhere"
    if storage is None:
        storage = storage_names(gm)
    for s in slots:
        key = _storage_key(s.tensor)
        for name in storage.get(key, []):
            if name in names:
                continue
            try:  # a map made before earlier folds: the name must still hold that storage
                still = _storage_key(get_attr_value(gm, name)) == key
            except PassError:
                still = False
            if still:
                return f"{s.qualname!r} shares its storage with {name!r} (tied weights)"
    return None


# ---------------------------------------------------------------------------------------------
# Check


def _out_channels(p: Producer, weight: _Slot) -> int:
    w = weight.tensor
    if p.kind == "conv_transpose":
        return w.shape[1] * p.groups
    if p.kind == "batchnorm" or w.ndim < 2:
        return w.shape[0]
    axis = _weight_out_axis(p, weight)
    return w.shape[axis]


def _weight_out_axis(p: Producer, weight: _Slot) -> int:
    if p.is_module or p.kind == "batchnorm":
        return 0
    axis = p.rule.out_axis
    return 1 - axis if weight.transposed else axis


def _channel_reason(p: Producer, weight: _Slot, dim: int, rank: int | None) -> str | None:
    axis = p.channel_axis
    if p.rule is not None and p.node.target in (aten.addmm.default, aten.mm.default):
        rank = 2
    if rank is not None:
        if p.kind in ("conv", "conv_transpose") and rank == weight.tensor.ndim - 1:
            axis = 0  # unbatched conv input (C, spatial...)
        if not -rank <= dim < rank:
            return f"axis {dim} is out of range for the {rank}-D output of {p.node.name}"
        if dim % rank != axis % rank:
            return (
                f"the affine acts on axis {dim} but the channels of the {p.kind} output "
                f"{p.output.name} are on axis {axis % rank}"
            )
        return None
    if dim != axis:
        return (
            f"cannot tell whether axis {dim} is the channel axis of {p.output.name} (its rank is "
            f"unknown); use dim={axis}, or pass example_inputs so shapes can be propagated"
        )
    return None


def check_producer(
    gm: GraphModule, p: Producer, consumer: Node, dim: int, rank: int | None, channels: int,
    storage: dict[tuple, list[str]] | None = None,
) -> tuple[_Slot, _Slot | None] | str:
    """Check that ``p`` can absorb a (channels,) affine on axis ``dim`` read only by ``consumer``.

    Returns (weight slot, bias slot) or the reason it cannot. ``storage``: see ``_sharing_reason``.
    """
    users = list(p.output.users)
    if users != [consumer]:
        names = ", ".join(u.name for u in users)
        return f"the {p.kind} output {p.output.name} has {len(users)} users ({names}); folding would change them all"
    if p.node.target is aten.addmm.default:
        beta, alpha = p.node.kwargs.get("beta", 1), p.node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1:
            return f"{p.node.name} is addmm with beta={beta}, alpha={alpha}"
    resolved = _resolve(gm, p)
    if isinstance(resolved, str):
        return resolved
    weight, bias = resolved
    node_r = node_rank(p.output)
    if node_r is not None and rank is not None and node_r != rank:
        return f"{p.output.name} is {node_r}-D but the affine sees {rank}-D (broadcasting)"
    reason = _channel_reason(p, weight, dim, node_r if node_r is not None else rank)
    if reason is not None:
        return reason
    out = _out_channels(p, weight)
    if out != channels:
        return f"the affine has {channels} channels but {p.node.name} produces {out}"
    reason = _sharing_reason(gm, p, [s for s in (weight, bias) if s is not None], storage)
    if reason is not None:
        return reason
    return weight, bias


# ---------------------------------------------------------------------------------------------
# Rewrite


@torch.no_grad()
def scale_producer(
    gm: GraphModule, p: Producer, weight: _Slot, bias: _Slot | None, s: torch.Tensor, t: torch.Tensor
) -> list[str]:
    """Make ``p`` compute s * P(x) + t (s, t float64 (C,)); returns notes about created biases."""
    _scale(weight.tensor, None if bias is None else bias.tensor, _weight_out_axis(p, weight),
           p.groups if p.kind == "conv_transpose" else None, s, t)
    if bias is not None:
        return []
    t = t.to(device=weight.tensor.device, dtype=torch.float64)
    if not bool((t != 0).any()):
        return []
    return [_create_bias(gm, p, weight, t)]


def _scale(w: torch.Tensor, bias: torch.Tensor | None, out_axis: int, groups: int | None,
           s: torch.Tensor, t: torch.Tensor) -> None:
    """The rewrite itself, in place: ``w`` scaled by s along its output axis ``out_axis`` (a
    transposed conv's ``groups`` blocks, see the module doc), ``bias`` to s * bias + t (float64,
    stored in the tensors' dtypes)."""
    s = s.to(device=w.device, dtype=torch.float64)
    t = t.to(device=w.device, dtype=torch.float64)
    w64 = w.double()
    if groups is not None:
        blocks = w64.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        ones = [1] * (w.ndim - 2)
        w.copy_((blocks * s.reshape(groups, 1, w.shape[1], *ones)).reshape(w.shape))
    else:
        shape = [1] * w.ndim
        shape[out_axis] = -1
        w.copy_(w64 * s.reshape(shape))
    if bias is not None:
        bias.copy_(s * bias.double() + t)


@dataclass(frozen=True)
class FoldStep:
    """One producer a fold rewrote (``fold_affines(steps=...)``): where its weight and bias are
    (attribute paths), its output axis in the weight, a transposed conv's groups (else None), and
    whether it takes the affine's shift (the second input of a folded add takes none)."""

    weight: str
    bias: str | None
    out_axis: int
    groups: int | None
    shifted: bool


@torch.no_grad()
def refold(gm: GraphModule, steps: list[tuple[str, list[FoldStep]]]) -> bool:
    """Play again, on ``gm``'s current parameters, the folds an earlier ``fold_affines(steps=...)``
    made on this graph: per affine (its module's path) the same rewrite of the same producers,
    with the affine's values now, the graph left as it is (its affines in place). The parameters
    get what that fold would give them now, bit for bit; nothing else is checked again, so the
    graph must be the one the steps were made on. False, changing nothing, where an affine now
    has a shift for a producer with no bias (the fold would create one: run ``fold_affines``)."""
    affines = []
    for path, producers in steps:
        s, t = gm.get_submodule(path).as_affine()
        if any(p.shifted and p.bias is None for p in producers) and bool((t != 0).any()):
            return False
        affines.append((s, t, producers))
    for s, t, producers in affines:
        for p in producers:
            _scale(get_attr_value(gm, p.weight), None if p.bias is None else get_attr_value(gm, p.bias),
                   p.out_axis, p.groups, s, t if p.shifted else torch.zeros_like(t))
    return True


def _create_bias(gm: GraphModule, p: Producer, weight: _Slot, t: torch.Tensor) -> str:
    w = weight.tensor
    param = nn.Parameter(t.to(w.dtype), requires_grad=w.requires_grad)
    if p.is_module:
        p.module.bias = param
        return f"created parameter {p.node.target}.bias"
    parent, attr = parent_and_attr(gm, weight.qualname)
    name = attr[: -len("weight")] + "bias" if attr.endswith("weight") else f"{attr}_bias"
    base, i = name, 0
    while hasattr(parent, name) and not (name in parent._parameters and parent._parameters[name] is None):
        name, i = f"{base}_{i}", i + 1
    parent.register_parameter(name, param)
    prefix = weight.qualname[: -len(attr)]
    qualname = prefix + name
    graph = gm.graph
    with graph.inserting_before(p.node):
        node = graph.get_attr(qualname)
    if p.node.target is aten.mm.default:
        x, mat2 = p.node.args[0], p.node.args[1]
        p.node.target = aten.addmm.default
        p.node.args = (node, x, mat2)
    elif p.rule is MATMUL:  # x @ M, M (in, out): linear(x, M^T, bias), M^T read as a transpose of M
        x, mat2 = p.node.args[0], p.node.args[1]
        aten_graph = isinstance(p.node.target, torch._ops.OpOverload)
        if mat2.op == "get_attr":
            with graph.inserting_before(p.node):
                mat2 = (graph.call_function(aten.t.default, (mat2,)) if aten_graph
                        else graph.call_method("t", (mat2,)))
        else:  # x @ W.t() with W (out, in): W itself
            mat2 = mat2.args[0]
        p.node.target = aten.linear.default if aten_graph else F.linear
        p.node.args, p.node.kwargs = (x, mat2, node), {}
    else:
        _set_arg(p.node, p.rule.bias, node)
    return f"created parameter {qualname}"


def _set_arg(node: Node, slot: Arg, value: object) -> None:
    if slot.index < len(node.args):
        args = list(node.args)
        args[slot.index] = value
        node.args = tuple(args)
    elif slot.index == len(node.args) and slot.name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.kwargs = {**node.kwargs, slot.name: value}


# ---------------------------------------------------------------------------------------------
# The pass


def _is_plain_add(node: Node) -> bool:
    if node.op == "call_method" and node.target in ("add", "add_"):
        pass
    elif node.op != "call_function" or node.target not in _ADD_TARGETS:
        return False
    if len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
        return False
    return node.kwargs.get("alpha", 1) == 1 and set(node.kwargs) <= {"alpha"}


def _plan(gm: GraphModule, node: Node, dim: int, rank: int | None, channels: int, s, t, storage=None):
    """[(producer, weight, bias, s, t), ...] to rewrite, or the reason the affine must stay."""
    src = node.args[0] if node.args else None
    if not isinstance(src, Node):
        return "its input is not a graph value"
    p = describe_producer(gm, src)
    if p is not None:
        checked = check_producer(gm, p, node, dim, rank, channels, storage)
        if isinstance(checked, str):
            return checked
        return [(p, *checked, s, t)]
    if _is_plain_add(src):
        a, b = src.args
        if a is b:
            return f"both inputs of {src.name} are {a.name}"
        if list(src.users) != [node]:
            return f"the add {src.name} has {len(src.users)} users"
        plans = []
        for x, shift in ((a, t), (b, torch.zeros_like(t))):
            px = describe_producer(gm, x)
            if px is None:
                return (
                    f"its input is the add {src.name}, and {x.name} is not produced by a linear, "
                    "conv, conv_transpose or batchnorm"
                )
            checked = check_producer(gm, px, src, dim, rank, channels, storage)
            if isinstance(checked, str):
                return f"its input is the add {src.name}, and for {x.name}: {checked}"
            plans.append((px, *checked, s, shift))
        if plans[0][0].node is plans[1][0].node:
            return f"both inputs of {src.name} come from {plans[0][0].node.name}"
        if plans[0][2] is None and plans[1][2] is not None:  # the shift to the input that has a bias
            plans = [(*plans[0][:4], plans[1][4]), (*plans[1][:4], plans[0][4])]
        return plans
    what = src.format_node() if src.op != "placeholder" else f"the graph input {src.name}"
    return f"its input {what} is not produced by a linear, conv, conv_transpose, batchnorm or an add of them"


@graph_pass(in_place=False)
def fold_affines(gm: GraphModule, inplace: bool = False, example_inputs: tuple | None = None,
                 recompile: bool = True, steps: list | None = None) -> PassResult:
    """Fold every apply-mode Reset and every ChannelAffine into its producer where possible.

    ``example_inputs`` (optional) are run through the graph once to learn tensor ranks when the
    graph carries no shape metadata (``symbolic_trace``) and the resets never saw data.
    ``recompile=False``: the edited graph is linted but the module's code is not regenerated, for a
    caller that reads only the folded parameters (a merge returning the user's class); such a
    module runs its old code until ``gm.recompile()``.
    ``steps``: a list given to be filled, when every affine folded into existing parameters, with
    (affine module path, its producers' ``FoldStep``s) per affine in order: what ``refold`` plays
    again on a copy of the graph as it was before this fold (left empty otherwise).
    counts: {"folded": n, "kept": m}; notes: one line per kept node, and per created bias.
    """
    gm = start(gm, inplace, "fold_affines")
    candidates = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(get_module(gm, n), (Reset, ChannelAffine))
    ]
    for node in candidates:
        module = get_module(gm, node)
        if isinstance(module, Reset) and module.mode != "apply":
            raise PassError(
                f"reset {node.name} (after {module.source!r}) is in collect mode; estimate its "
                "statistics and call set_mode(gm, 'apply') before folding"
            )
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    made = [] if steps is not None else None
    folded, kept, replaced, notes, _ = _fold(gm, candidates, write=True, steps=made)
    if made is not None and not kept and not notes:  # (a note: a bias was created)
        steps.extend(made)
    finish(gm, recompile)
    return PassResult(gm, folded + replaced > 0, {"folded": folded, "kept": kept}, notes)


NEEDS_BIAS = "needs a bias"  # fold_plan: it folds, but its shift needs a parameter its producer lacks


def fold_plan(gm: GraphModule, example_inputs: tuple | None = None) -> dict[str, str | None]:
    """What ``fold_affines`` would do with every Reset and ChannelAffine of ``gm``, in any mode,
    changing nothing (not the parameters, not the graph): {affine node name: None (it folds into
    existing parameters) | NEEDS_BIAS (it folds, but its non-zero shift would create a bias: a
    producer has none) | the reason it stays}. The folds are played in graph order on a copy of the
    graph, as ``fold_affines`` plays them (an earlier fold can make a later one possible).
    ``example_inputs``: run once to learn ranks (a Reset in collect mode would count them: give
    none then; each Reset's last input tells its rank)."""
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    copy = GraphModule(gm, deepcopy_quietly(gm.graph))  # the same modules and parameters, another graph
    candidates = [n for n in copy.graph.nodes
                  if n.op == "call_module" and isinstance(get_module(copy, n), (Reset, ChannelAffine))]
    return _fold(copy, candidates, write=False)[4]


def _fold(gm: GraphModule, candidates: list[Node], write: bool, steps: list | None = None):
    """Fold ``candidates`` in order: (folded, kept, replaced, notes, plan as ``fold_plan``).
    ``write=False``: the graph is edited as the folds would edit it, the parameters are not.
    ``steps``: receives each folded affine's ``FoldStep``s (``fold_affines``)."""
    folded, kept, replaced, notes, kinds = 0, 0, 0, [], {}
    storage = storage_names(gm)  # folding rewrites values in place and adds unshared biases only
    for node in candidates:
        module = get_module(gm, node)
        if write:
            s, t = module.as_affine()
        else:  # the values do not matter to the checks; a shift that a reset could have: non-zero
            s = t = torch.ones(_channels(module), dtype=torch.float64)
        rank = node_rank(node)
        if rank is None:
            rank = getattr(module, "last_ndim", None)
        plan = _plan(gm, node, module.dim, rank, int(s.shape[0]), s, t, storage)
        if isinstance(plan, str):
            kept += 1
            kinds[node.name] = plan
            notes.append(f"{node.name}: {plan}")
            if write and isinstance(module, Reset):
                like = module.goal_mean
                affine = ChannelAffine(s.to(like), t.to(like), dim=module.dim, source=module.source)
                replace_module(gm, str(node.target), affine)
                replaced += 1
            continue
        kinds[node.name] = None
        if steps is not None:
            steps.append((str(node.target), [
                FoldStep(weight.qualname, None if bias is None else bias.qualname, _weight_out_axis(p, weight),
                         p.groups if p.kind == "conv_transpose" else None, pt is t)
                for p, weight, bias, _, pt in plan]))
        for p, weight, bias, ps, pt in plan:
            if not write:
                if bias is None and bool((pt != 0).any()):
                    kinds[node.name] = NEEDS_BIAS
                continue
            for line in scale_producer(gm, p, weight, bias, ps, pt):
                notes.append(f"{node.name}: {line}")
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        if write:
            gm.delete_submodule(str(node.target))
        folded += 1
    return folded, kept, replaced, notes, kinds


def _channels(module: nn.Module) -> int:
    return int((module.goal_mean if isinstance(module, Reset) else module.scale).shape[0])
