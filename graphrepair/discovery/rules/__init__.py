"""Discovery's op rules, one family per module, registered in one table (``registry``).

``apply_rule`` dispatches a node to its rule. An op without a rule, and an op whose rule cannot
handle the node (a failure inside the rule, e.g. axes whose sizes disagree), fixes every axis the
node touches and records why: discovery never crashes on a model and never guesses.
"""

from __future__ import annotations

from torch.nn.modules import module as _module

from graphrepair.discovery.context import Context, op_name, tensor_args
from graphrepair.discovery.parametrized import reads_hook
from graphrepair.discovery.rules import attention, elementwise, layers, norms, parametrized, reductions, shape  # noqa: F401  (they register their rules)
from graphrepair.discovery.rules.registry import MODULE_RULES, RULES, describe, reject
from graphrepair.discovery.trace import TensorInfo

__all__ = ["MODULE_RULES", "RULES", "apply_rule"]


def _find(ctx: Context, node):
    if node.op == "call_module":
        m = ctx.module()
        if node.target == "_guards_fn" or type(m).__name__ == "_GuardsFn":
            return None, True  # torch.export's input guards: reads shapes only
        return next((rule for types, rule in MODULE_RULES if isinstance(m, types) and _computes_as(m, types)),
                    None), False
    rule = RULES.get(op_name(node))
    if rule is None and not tensor_args(node) and not isinstance(ctx.info(node), (TensorInfo, tuple)):
        return None, True  # pure Python arithmetic on sizes
    return rule, False


def _computes_as(m, types: tuple) -> bool:
    """Whether module ``m`` computes what the ``types`` its rule was written for compute: torch.nn's
    own subclasses do (``SyncBatchNorm`` is a batch norm); a subclass from elsewhere that the tracer
    keeps whole (``torch.ao.nn.qat``'s ``Linear`` fake-quantizes its weight per channel) only
    where it inherits their ``forward``."""
    if type(m).__module__.startswith("torch.nn."):
        return True
    return any(isinstance(m, t) and type(m).forward is t.forward for t in types)


def _own_forward(ctx: Context, node) -> str | None:
    """The reason for a module call no rule takes though its class subclasses one a rule is for
    (``_computes_as``), or None (the default reason: no rule)."""
    if node.op != "call_module":
        return None
    m = ctx.module()
    base = next((t for types, _ in MODULE_RULES for t in types if isinstance(m, t)), None)
    if base is None:
        return None
    return (f"module '{node.target}' is a {type(m).__module__}.{type(m).__name__}, a {base.__name__} with a "
            f"forward of its own (e.g. fake quantization), which discovery does not read")


def _hooked(ctx: Context, node) -> str | None:
    """Why a module call is not understood whatever its rule: forward hooks that may change its
    input or output (a traced graph calls the module, hooks and all), or None."""
    if node.op != "call_module":
        return None
    m = ctx.module()
    hooks = [h for h in m._forward_pre_hooks.values() if not reads_hook(h)] + list(m._forward_hooks.values())
    if hooks:
        return (f"module '{node.target}' has forward hooks ({_names(hooks)}) that may change its input or "
                f"output; remove them (handle.remove()) before merging if they only observe")
    hooks = global_hooks()
    if hooks:
        return (f"forward hooks registered for every module ({_names(hooks)}, "
                f"torch.nn.modules.module.register_module_forward_hook or _pre_hook) may change the input "
                f"or output of module '{node.target}'; remove them (handle.remove()) before merging if "
                f"they only observe")
    return None


def global_hooks() -> list:
    """The forward hooks and pre-hooks registered for every module (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``): a traced graph's module calls run them."""
    return list(_module._global_forward_pre_hooks.values()) + list(_module._global_forward_hooks.values())


def _names(hooks: list) -> str:
    return ", ".join(sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks}))


def apply_rule(ctx: Context, node):
    """The axes of ``node``'s output, from its rule; unknown ops and failing rules fix what they touch."""
    ctx.begin(node)
    rule, nothing = _find(ctx, node)
    if nothing:
        return None
    if rule is None:
        return reject(ctx, _own_forward(ctx, node))
    hooked = _hooked(ctx, node)
    if hooked is not None:
        return reject(ctx, hooked)
    try:
        return rule(ctx)
    except Exception as e:  # the rule does not understand this form of the op: be conservative
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return reject(ctx, f"the rule for {describe(ctx)} cannot handle node '{node.name}' ({first})")
