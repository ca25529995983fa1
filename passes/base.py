"""What every pass returns, how a pass says whether it edits its input, and the steps passes share.

A pass is a function ``f(gm, ...) -> PassResult`` declared with ``@graph_pass(in_place=...)``:

- ``in_place=False``: the GraphModule given is left as it was; the result carries a new one. Passes
  that rewrite a graph (insert, fold) work on a deep copy of their input by default (like
  ``torch.fx.experimental.optimization.fuse``) and edit the given module only with ``inplace=True``.
- ``in_place=True``: the pass edits the module it is given and returns it (``set_mode``).

Every declared pass is listed in ``PASSES`` (a test checks each against its declaration). What a
pass inserts is recorded on the inserted node, under one key: ``node.meta[META_KEY]`` (a dict,
e.g. ``{"inserted_by": "insert_resets", "after": "conv1"}``), never in a side table keyed by node
name. After editing, the graph is linted and the module recompiled (``finish``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from passes.errors import CopyError, CopyWarning, PassError

# The one key of ``node.meta`` under which passes annotate nodes (STYLE.md: one key per project).
META_KEY = "graphrepair"

PASSES: list[Callable[..., "PassResult"]] = []


def graph_pass(*, in_place: bool) -> Callable[[Callable], Callable]:
    """Declare ``fn`` a graph pass: ``fn.in_place`` says whether it edits the module it is given
    (see the module doc), and ``fn`` joins ``PASSES``."""

    def declare(fn: Callable) -> Callable:
        fn.in_place = in_place
        PASSES.append(fn)
        return fn

    return declare


def annotate(node: fx.Node, **facts: Any) -> None:
    """Record ``facts`` about ``node`` under ``node.meta[META_KEY]`` (other facts are kept)."""
    node.meta[META_KEY] = {**node.meta.get(META_KEY, {}), **facts}


def annotation(node: fx.Node) -> dict:
    """What passes recorded about ``node`` (empty when nothing)."""
    return node.meta.get(META_KEY, {})


@dataclass(frozen=True)
class PassResult:
    """The result of a pass: the (possibly new) module, whether it changed, what was done.

    ``counts`` maps an action to how often it happened (``{"folded": 19, "kept": 2}``);
    ``notes`` are readable lines, e.g. ``"_gr_reset_3: input has 2 users"``.
    """

    graph_module: fx.GraphModule
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def start(gm: fx.GraphModule, inplace: bool, pass_name: str) -> fx.GraphModule:
    """Check ``gm`` and return the module the pass will edit (a deep copy unless ``inplace``)."""
    if not isinstance(gm, fx.GraphModule):
        raise PassError(
            f"{pass_name} needs a torch.fx.GraphModule, got {type(gm).__name__}; trace the model "
            "first (torch.fx.symbolic_trace(model) or torch.export.export(model, args).module())"
        )
    if inplace:
        return gm
    return deepcopy_quietly(gm)


def deepcopy_quietly(obj, memo: dict | None = None):
    """``copy.deepcopy(obj, memo)`` without the FutureWarning torch raises while copying a
    torch.export graph (its pytree specs' copy reads a deprecated ``LeafSpec`` inside torch
    itself): nothing the caller can act on, and it would reach every user who merges such a
    model. Every copy of a graph, or of a model that may hold one, goes through here.

    What ``obj`` holds that deepcopy refuses does not stop the copy: an object that cannot be
    copied (a ``threading.Lock``, an open file: "cannot pickle") is shared by the copy, and a
    tensor computed with autograd (an activation a forward kept on the model, legacy
    ``weight_norm``'s weight after a training step: "Only Tensors created explicitly by the user")
    is copied without its graph; each is named in a ``CopyWarning``. The copy starts again from
    ``memo`` as given with these stand-ins in it. ``CopyError`` where ``obj`` itself is what
    cannot be copied."""
    memo = {} if memo is None else memo
    given = dict(memo)
    stand_ins: dict[int, tuple[Any, Any]] = {}  # id -> (the object, what the copy holds instead)
    try:
        for _ in range(_COPY_TRIES):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                    return copy.deepcopy(obj, memo)
            except (MemoryError, RecursionError):
                raise
            except Exception as e:
                bad = _refused(e)
                if bad is None or id(bad) in stand_ins:
                    raise
                if bad is obj or isinstance(bad, torch.nn.Module):  # (a module is never shared: its weights are replaced)
                    where = "" if bad is obj else f" ({_where(obj, bad)})"
                    raise CopyError(f"{type(bad).__name__}{where} cannot be copied ({type(e).__name__}: {e}); "
                                    "give it a __deepcopy__ or a model that copy.deepcopy copies") from e
                stand_ins[id(bad)] = (bad, _stand_in(bad))
                memo.clear()
                memo.update(given)
                memo.update({k: new for k, (_, new) in stand_ins.items()})
        raise CopyError(f"{type(obj).__name__} holds more than {_COPY_TRIES} objects that cannot be "
                        "copied; give their classes a __deepcopy__")
    finally:
        for old, _ in stand_ins.values():  # (outside the filters above; from one place: said once)
            warnings.warn(_copy_note(obj, old), CopyWarning, stacklevel=1)


# ``deepcopy_quietly`` starts a copy again at most this many times (once per object it cannot copy)
_COPY_TRIES = 64


def _refused(error: BaseException):
    """The object whose copy raised ``error``: ``x`` of the innermost ``copy.deepcopy`` call in
    its traceback (None where there is none)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is copy.deepcopy.__code__:
            found = tb.tb_frame.f_locals.get("x", found)
        tb = tb.tb_next
    return found


def _stand_in(x):
    """What a copy holds in place of ``x``, which deepcopy refused: a tensor's values, detached
    (as a new leaf, requiring grad where ``x`` did); any other object, itself."""
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_() if x.requires_grad and y.is_floating_point() else y
    return x


def _copy_note(root, x) -> str:
    where = _where(root, x)
    if isinstance(x, torch.Tensor):
        what = "a tensor computed with autograd (it has a grad_fn)" if x.grad_fn is not None else \
            f"a {type(x).__name__}"
        return f"{where} is {what}, which deepcopy refuses: the copy holds its values, detached from the graph"
    return (f"{where} (a {type(x).__module__}.{type(x).__qualname__}) cannot be copied: the copy shares "
            "this object with the original")


def _where(root, x) -> str:
    """Where ``root`` (a module) holds ``x``: attributes of its modules, or items of them."""
    found = []
    if isinstance(root, torch.nn.Module):
        for name, m in root.named_modules():
            if m is x:
                return f"module {name!r}"
            owner = f"module {name!r}" if name else f"the {type(root).__name__}"
            for k, v in vars(m).items():
                if k == "_modules":
                    continue
                items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple, set, frozenset)) else ()
                if v is x:
                    found.append(f"attribute {k!r} of {owner}")
                elif any(i is x for i in items):
                    if k in ("_parameters", "_buffers"):
                        found.append(f"{k[1:-1]} {next(n for n, i in v.items() if i is x)!r} of {owner}")
                    else:
                        found.append(f"an item of attribute {k!r} of {owner}")
    if not found:
        return f"an object the {type(root).__name__} holds"
    more = f" and {len(found) - 3} more places" if len(found) > 3 else ""
    return " and ".join(found[:3]) + more


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Every node's shape on ``example_inputs`` (``ShapeProp``, into ``node.meta``), without
    autograd: only the shapes are read, and inputs made under ``torch.inference_mode`` could not
    be recorded."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def finish(gm: fx.GraphModule, recompile: bool = True) -> None:
    """Validate the edited graph and regenerate the module's code (not with ``recompile=False``:
    the caller's choice, for a module that is only read, never run, before it recompiles it)."""
    gm.graph.lint()
    if recompile:
        gm.recompile()
