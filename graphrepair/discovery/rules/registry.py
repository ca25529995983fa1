"""The registry of discovery rules and the helpers every rule family shares.

A rule receives the discovery ``Context`` (``ctx.node`` is the node) and returns the axis
expressions of the node's output: a list (one expression per axis) for a tensor, a tuple of such
lists for a tuple of tensors, None for a non-tensor. Rules are keyed by a canonical op name shared
by the module call (``nn.Linear``), the functional form (``F.linear``) and the ATen op
(``aten.linear``), see ``context.op_name``; module forms adapt the module's attributes to the
functional rule's arguments. A rule registers itself with ``@op("name", ...)`` or
``@module(nn.Type, ...)``; adding an op is adding a name to a decorator or a rule to a family
module (``elementwise``, ``layers``, ``norms``, ``attention``, ``shape``, ``reductions``).

A rule that cannot handle a node returns ``reject(ctx, reason)``: every axis the node touches is
fixed with that reason. Anything not in the tables is rejected the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphrepair.discovery.axes import Fixed
from graphrepair.discovery.context import STRUCTURAL, Context, op_name
from graphrepair.discovery.trace import TensorInfo

Rule = Callable[[Context], Any]

RULES: dict[str, Rule] = {}
MODULE_RULES: list[tuple[tuple[type, ...], Rule]] = []


def op(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for the op names given (each may hold several names separated by spaces)."""
    def register(rule: Rule) -> Rule:
        for group in names:
            for name in group.split():
                RULES[name] = rule
        return rule
    return register


def module(*types: type) -> Callable[[Rule], Rule]:
    """Register a rule for calls of modules of the given types (first match wins)."""
    def register(rule: Rule) -> Rule:
        MODULE_RULES.append((types, rule))
        return rule
    return register


# -- helpers ---------------------------------------------------------------------------------------


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def same_as(ctx: Context, x) -> list:
    return list(ctx.axes(x))


def spatial(size: int, what: str = "spatial axis") -> Fixed:
    return Fixed(size, STRUCTURAL + what)


def param_axes(ctx: Context, attr: str):
    """Axes of the called module's parameter or buffer ``attr`` (None when it has none)."""
    t = getattr(ctx.module(), attr, None)
    if not isinstance(t, torch.Tensor):
        return None
    return ctx.param(f"{ctx.node.target}.{attr}", tuple(t.shape))


def broadcast_into(ctx: Context, axes: list, shape, out: list) -> bool:
    """NumPy broadcasting of a tensor of ``shape`` (``axes``) into ``out``: aligned axes of the same
    size (more than 1) carry one permutation. False, unifying nothing, where it has more axes."""
    if len(shape) > len(out):
        return False
    for k in range(1, len(shape) + 1):
        if shape[-k] == out[-k].size and shape[-k] > 1:
            ctx.unify(axes[-k], out[-k])
    return True


def describe(ctx: Context) -> str:
    n = ctx.node
    if n.op == "call_module":
        return f"module {type(ctx.module()).__name__}"
    return op_name(n)


def reject(ctx: Context, why: str | None = None):
    """The node is not understood: fix every axis it touches, with the reason."""
    reason = why or f"no rule for {describe(ctx)} at node '{ctx.node.name}'"
    ctx.fix_all(reason)
    return fixed_out(ctx.info(ctx.node), reason)


unknown = reject  # the name the rules use for "no rule for this form of the op"


def fixed_out(info, reason):
    if isinstance(info, TensorInfo):
        return [Fixed(s, reason) for s in info.shape]
    if isinstance(info, tuple):
        return tuple(fixed_out(i, reason) for i in info)
    return None


def is_module(ctx: Context, *types: type) -> bool:
    return ctx.node.op == "call_module" and isinstance(ctx.module(), types)


__all__ = ["MODULE_RULES", "RULES", "Rule", "broadcast_into", "describe", "fixed_out", "is_module", "module", "norm_dim",
           "op", "param_axes", "reject", "same_as", "spatial", "unknown", "nn"]
