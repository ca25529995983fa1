"""What every pass returns, and the two steps every pass shares.

A pass is a function ``f(gm, ..., inplace=False) -> PassResult``. By default it works on a deep
copy of its input (like ``torch.fx.experimental.optimization.fuse``); ``inplace=True`` edits the
given GraphModule. After editing, the graph is linted and the module recompiled.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from passes.errors import PassError


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
    with warnings.catch_warnings():
        # GraphModules from torch.export carry pytree specs whose copy warns about a deprecation
        # inside torch itself; nothing the caller can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def finish(gm: fx.GraphModule) -> None:
    """Validate the edited graph and regenerate the module's code."""
    gm.graph.lint()
    gm.recompile()
