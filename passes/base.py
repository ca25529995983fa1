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

from passes.errors import PassError

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
    model. Every copy of a graph, or of a model that may hold one, goes through here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj, memo)


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
