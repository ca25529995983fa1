"""Discovery: which hidden channels of a traced model may be permuted together.

Walk the graph once in topological order. Each node gets one axis expression per output axis
(``axes.py``); the rule for its op (``rules.py``) states which input, output and parameter axes
must carry the same permutation, and the solver unifies them. Model inputs and outputs are fixed.
An op without a rule fixes every axis it touches and records why. After the walk every variable
that is still free is a permutation group.

A model already discovered in this process is not traced and discovered again: its spec is kept
with a key of everything about the model that decides it (``reuse.py``); a changed model is
discovered afresh.
"""

from __future__ import annotations

import operator
from types import MappingProxyType

import torch
import torch.fx
from torch import nn

from graphrepair.discovery import axes as ax, parametrized
from graphrepair.discovery import reuse
from graphrepair.discovery.axes import Expr, Fixed
from graphrepair.discovery.context import STRUCTURAL, Context, tensor_args
from graphrepair.discovery.spec import FixedAxis, Group, Member, PermutationSpec
from graphrepair.discovery.rules import apply_rule
from graphrepair.discovery.trace import TensorInfo, Traced, trace
from graphrepair.models import PLAIN_CONTAINER, tied_names, unheld_name, unheld_tensors, user_models

@user_models("model")
def discover(model: nn.Module, example_inputs, *, traced: Traced | None = None,
             reuse_spec: bool = True) -> PermutationSpec:
    """Discover the permutation groups of ``model`` (see module docstring). The spec discovered
    before for this model, while nothing that decides it has changed (``reuse.signature``), is
    returned as it is, unless ``traced`` is given or ``reuse_spec`` is False."""
    if traced is not None or not reuse_spec:
        return _discover(model, example_inputs, traced)
    key = reuse.signature(model, example_inputs)
    spec = reuse.lookup(model, key)
    if spec is None:
        spec = _discover(model, example_inputs, None)
        reuse.keep(model, key, spec)
    return spec


def _discover(model: nn.Module, example_inputs, traced: Traced | None) -> PermutationSpec:
    traced = traced or trace(model, example_inputs)
    ctx = Context(traced, tied_names(model), parametrized.table(model),
                  {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()})
    ctx.model = model  # (what a tensor outside the state dict is called there: ``_unheld_name``)
    # what a permutation or a merge can carry: the state dict (canonical keys of tied tensors)
    persistent = {ctx.aliases.get(k, k) for k in model.state_dict(keep_vars=True)}
    gm = traced.gm
    for node in gm.graph.nodes:
        ctx.node = node
        info = traced.info.get(node.name)
        if node.op == "placeholder":
            if isinstance(info, TensorInfo):
                ctx.values[node.name] = [Fixed(s, f"model input '{node.name}'") for s in info.shape]
            continue
        if node.op == "get_attr":
            if isinstance(info, TensorInfo):
                ctx.values[node.name] = _get_attr_axes(ctx, node, info, persistent)
            continue
        if node.op == "output":
            for a in tensor_args(node):
                for exprs in _tensors_of(ctx.values.get(a.name)):  # (a node of tuples too: chunk, an LSTM)
                    for d, e in enumerate(exprs):
                        ctx.fix(e, "model output", d, a.name, record=False)
            continue
        out = apply_rule(ctx, node)
        ctx.values[node.name] = out
    _confine_per_block(ctx)
    return _build_spec(model, ctx)


def _confine_per_block(ctx: Context) -> None:
    """A PerBlock (a grouped conv weight's per-group axis, ``axes.py``) stands only at the top of
    a parameter axis whose row axis moves its rows in whole blocks. Anywhere else (an
    activation: the weight computed by ops, reshaped, read by another op; nested in a layout; a
    row axis that may carry rows into another block piecemeal) its blocks are made equal: one permutation shared by
    every group, which is what every other rule assumes of an axis."""
    solver = ctx.solver
    params = {id(v) for v in ctx.params.values()}  # a get_attr node's axes are its parameter's

    def nested(e: Expr):
        if isinstance(e, ax.PerBlock):
            yield e
        for p in ax.children(e):
            yield from nested(p)

    def share(e: Expr) -> bool:
        found = list(nested(e))
        for pb in found:
            solver.shared(pb, "a grouped conv's weight is not read by that conv alone")
        return bool(found)

    changed = True
    while changed:
        changed = False
        for exprs in ctx.params.values():
            resolved = [solver.resolve(e) for e in exprs]
            for d, e in enumerate(resolved):
                if isinstance(e, ax.PerBlock):
                    rows = resolved[e.axis] if 0 <= e.axis < len(resolved) and e.axis != d else None
                    ok = (rows is not None and rows.size % len(e.parts) == 0 and not any(nested(rows))
                          and ax.moves_whole_blocks(rows, rows.size // len(e.parts)))
                    if ok:
                        changed |= any([share(p) for p in e.parts])
                        continue
                changed |= share(e)
        for v in ctx.values.values():
            for exprs in (v if isinstance(v, tuple) else (v,)):
                if isinstance(exprs, list) and id(exprs) not in params:
                    changed |= any([share(solver.resolve(e)) for e in exprs])


def _tensors_of(value) -> list[list]:
    """The axes of every tensor in a node's value: a list of expressions, or tuples of such values
    (a node returning a tuple, returned as it is by the model)."""
    if isinstance(value, list):
        return [value]
    if isinstance(value, tuple):
        return [exprs for v in value for exprs in _tensors_of(v)]
    return []


def _get_attr_axes(ctx: Context, node: torch.fx.Node, info: TensorInfo, persistent: set[str]) -> list:
    """Axes of a tensor the graph reads from the model. A parameter or persistent buffer gets its
    variables (shared by every read). A tensor that is not in the state dict (a buffer registered
    with ``persistent=False``, a plain tensor attribute, a constant the tracer lifted) cannot carry
    a permutation: permutations and merges are applied to state dicts, and the merged model keeps
    model A's copy of such a tensor. Its axes are fixed, like a model input's.

    A read that nothing uses (torch.export lifts every parameter, read or not) adds no variables:
    a parameter the traced forward never reads, such as a mask embedding used only in training
    (Wav2Vec2's ``masked_spec_embed``, DINOv2's ``mask_token``), stays fixed ("not used by the
    traced graph") instead of taking a permutation of its own that the stream it joins in the
    other mode would not share."""
    key = ctx.aliases.get(node.target, node.target)
    if not node.users:
        return [Fixed(s, "not used by the traced graph") for s in info.shape]
    if key in persistent:
        return ctx.param(node.target, info.shape)
    known = _unheld_name(ctx, node)
    if known is not None:  # by the name the user knows it by, not the tracer's (``lifted_tensor_0``)
        name, kind = known
        return ctx.unheld(node.name, info.shape, (
            f"'{name}' is in a plain list or dict (no state dict holds it): register it with "
            f"nn.ModuleList, nn.ModuleDict or nn.ParameterList to merge it"
            if kind == PLAIN_CONTAINER else
            f"'{name}' is not in the state dict ({kind}): permutations and merges cannot carry it"))
    return ctx.unheld(node.name, info.shape, f"'{node.target}' is not in the state dict (a tensor the forward "
                      f"makes, or reads from outside the model): permutations and merges cannot carry it")


def _unheld_name(ctx: Context, node: torch.fx.Node) -> tuple[str, str] | None:
    """(name, kind) in the model of the tensor a ``get_attr`` node outside the state dict reads
    (``models.unheld_tensors``, made once per discovery), or None."""
    if ctx.model is None:
        return None
    try:
        t = operator.attrgetter(node.target)(ctx.gm)
    except AttributeError:
        return None
    if ctx.unheld_table is None:
        ctx.unheld_table = unheld_tensors(ctx.model)
    return unheld_name(ctx.unheld_table, t)


# -- turning the solved variables into a frozen spec ---------------------------------------------

def _build_spec(model: nn.Module, ctx: Context) -> PermutationSpec:
    solver = ctx.solver
    state = model.state_dict(keep_vars=True)
    param_axes: dict[str, tuple] = {}
    fixed: list[FixedAxis] = []
    for key, t in state.items():
        canon = ctx.aliases.get(key, key)
        exprs = ctx.params.get(canon)
        if exprs is None or len(exprs) != t.ndim:
            exprs = [Fixed(s, "not used by the traced graph") for s in t.shape]
        param_axes[key] = tuple(solver.resolve(e) for e in exprs)
    node_axes = {name: tuple(solver.resolve(e) for e in v)
                 for name, v in ctx.values.items() if isinstance(v, list)}

    # variables still free, in graph order of first appearance (params first: stable names)
    order: dict[int, None] = {}
    for exprs in list(param_axes.values()) + list(node_axes.values()):
        for e in exprs:
            for v in ax.variables(e):
                order.setdefault(v.id, None)
    names = _group_names(param_axes, node_axes, list(order))

    # one sweep over all axes builds every group's member list (linear in the graph size)
    members: dict[int, tuple[list, list]] = {vid: ([], []) for vid in order}
    for slot, table in ((0, param_axes), (1, node_axes)):
        for k, es in table.items():
            for d, e in enumerate(es):
                desc = None  # one description per axis, shared by the groups in it
                for vid in dict.fromkeys(v.id for v in ax.variables(e)):
                    if isinstance(e, ax.Var):
                        layout = "full"
                    else:
                        desc = desc or ax.describe(e)
                        layout = desc
                    members[vid][slot].append(Member(k, d, layout))
    groups = []
    var_of_group = {}
    for vid in list(order):
        pm, nm = members[vid]
        if not pm:  # moves no parameter (e.g. a constant built in the graph): not a group
            del order[vid]
            continue
        joins = tuple(sorted({ctx.joins[m.name] for m in nm if m.name in ctx.joins}))
        groups.append(Group(names[vid], solver.sizes[vid], tuple(pm), tuple(nm), joins))
        var_of_group[names[vid]] = vid

    for key, es in param_axes.items():
        for d, e in enumerate(es):
            pinned = _fixed_parts(e)
            if not pinned:
                continue
            count = sum(f.size for f in pinned)
            if count <= 1:
                continue
            reason = next((f.reason for f in pinned if f.reason), "fixed")
            structural = reason.startswith(STRUCTURAL)
            fixed.append(FixedAxis(key, d, count, reason.removeprefix(STRUCTURAL), "param", structural))
    fixed.extend(ctx.origins)
    # frozen data: read-only tables (a spec may be shared, see ``reuse.py``)
    return PermutationSpec(tuple(groups), tuple(fixed), MappingProxyType(param_axes), MappingProxyType(node_axes),
                           MappingProxyType(var_of_group), ctx.traced, ctx.traced.model_name,
                           MappingProxyType(dict(ctx.joins)))


def _fixed_parts(e: Expr) -> list[Fixed]:
    if isinstance(e, Fixed):
        return [e] if e.size > 0 else []
    if isinstance(e, ax.Cat):
        return [f for p in e.parts for f in _fixed_parts(p)]
    if isinstance(e, ax.Kron):
        # a fixed factor pins positions only if the whole product is fixed
        return [Fixed(e.size, _fixed_parts(e.outer)[0].reason)] if ax.is_fixed(e) else []
    return []  # a PerBlock or a Wreath with some blocks fixed still moves in the others


def _group_names(param_axes, node_axes, var_ids) -> dict[int, str]:
    """Readable stable names: the module whose output axis *is* the group, else a path into the
    first layout that contains it (".3" = 4th block of a concatenation or 4th slot of a Wreath,
    ".o"/".i" = outer/inner factor of a Kronecker layout, ".o" the order of a Wreath's slots)."""
    names: dict[int, str] = {}
    for key, es in param_axes.items():
        key = parametrized.weight_name(key)  # a parametrised weight's original: the weight's name
        if es and isinstance(es[0], ax.Var) and es[0].id not in names and key.endswith("weight"):
            names[es[0].id] = key[: -len(".weight")] if key.endswith(".weight") else key
    wanted = set(var_ids) - set(names)
    for key, es in list(param_axes.items()) + list(node_axes.items()):  # one walk names them all
        if not wanted:
            break
        for d, e in enumerate(es):
            for vid, path in _paths(e):
                if vid in wanted:
                    wanted.discard(vid)
                    base = key[: -len(".weight")] if key.endswith(".weight") else key
                    names[vid] = f"{base}[{d}]{path}"
    used: dict[str, int] = {}
    for vid in var_ids:
        n = names.get(vid, f"group{vid}")
        if n in used:
            used[n] += 1
            n = f"{n}#{used[n]}"
        else:
            used[n] = 1
        names[vid] = n
    return names


def _paths(e: Expr, prefix: str = ""):
    """(variable id, path) of every variable in ``e``, in order (a variable may recur)."""
    if isinstance(e, ax.Var):
        yield e.id, prefix
    elif isinstance(e, (ax.Cat, ax.PerBlock)):
        for i, p in enumerate(e.parts):
            yield from _paths(p, f"{prefix}.{i}")
    elif isinstance(e, ax.Kron):
        yield from _paths(e.outer, prefix + ".o")
        yield from _paths(e.inner, prefix + ".i")
    elif isinstance(e, ax.Wreath):
        yield from _paths(e.outer, prefix + ".o")
        for i, p in enumerate(e.parts):
            yield from _paths(p, f"{prefix}.{i}")


