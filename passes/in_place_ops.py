"""Whether a graph may write into an existing tensor (in-place ops), conservatively.

Used where two computations share inputs (``passes.pair`` runs two copies of a graph on the same
inputs and clones them for copy B when copy A might write into them).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from passes.modules import get_module

_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def writes_in_place(gm: GraphModule) -> bool:
    """Conservatively, whether any op of ``gm`` may write into an existing tensor (a module or
    function with ``inplace`` set, a trailing-underscore method or function, augmented assignment,
    item assignment, an ``out=`` argument; an aten op whose schema writes into an argument)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if getattr(get_module(gm, node), "inplace", False) is not False:
                return True
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if isinstance(target, torch._ops.OpOverload):  # an aten op (torch.export): its schema says
                if target._schema.is_mutable:  # (``add_.Tensor``, ``copy_.default``, ``add.out``)
                    return True
                continue
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if target in _IN_PLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__")):
                return True
            if "out" in node.kwargs or node.kwargs.get("inplace", False) is not False:
                return True
            if node.op == "call_function" and any(a is True for a in node.args[1:]):
                return True  # e.g. F.relu(x, True); conservative
    return False
