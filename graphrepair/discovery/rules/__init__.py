"""Discovery's op rules, one family per module, registered in one table (``registry``).

``apply_rule`` dispatches a node to its rule. An op without a rule, and an op whose rule cannot
handle the node (a failure inside the rule, e.g. axes whose sizes disagree), fixes every axis the
node touches and records why: discovery never crashes on a model and never guesses.
"""

from __future__ import annotations

from graphrepair.discovery.context import Context, op_name, tensor_args
from graphrepair.discovery.rules import attention, elementwise, layers, norms, parametrized, reductions, shape  # noqa: F401  (they register their rules)
from graphrepair.discovery.rules.registry import MODULE_RULES, RULES, describe, reject
from graphrepair.discovery.trace import TensorInfo

__all__ = ["MODULE_RULES", "RULES", "apply_rule"]


def _find(ctx: Context, node):
    if node.op == "call_module":
        m = ctx.module()
        if node.target == "_guards_fn" or type(m).__name__ == "_GuardsFn":
            return None, True  # torch.export's input guards: reads shapes only
        return next((rule for types, rule in MODULE_RULES if isinstance(m, types)), None), False
    rule = RULES.get(op_name(node))
    if rule is None and not tensor_args(node) and not isinstance(ctx.info(node), (TensorInfo, tuple)):
        return None, True  # pure Python arithmetic on sizes
    return rule, False


def apply_rule(ctx: Context, node):
    """The axes of ``node``'s output, from its rule; unknown ops and failing rules fix what they touch."""
    ctx.begin(node)
    rule, nothing = _find(ctx, node)
    if nothing:
        return None
    if rule is None:
        return reject(ctx)
    try:
        return rule(ctx)
    except Exception as e:  # the rule does not understand this form of the op: be conservative
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return reject(ctx, f"the rule for {describe(ctx)} cannot handle node '{node.name}' ({first})")
