"""Two models of one graph, run side by side in one GraphModule, with taps that see both.

``pair_graph(gm, root_a, root_b, taps).graph_module`` is a new GraphModule whose forward feeds
the same inputs to two copies of ``gm``'s graph: copy A reads its modules and attributes from
``root_a``, copy B from ``root_b`` (the modules are shared, not copied: no weights are
duplicated). The copies are
interleaved node by node (A's node n, then B's node n), and after the pair of nodes named in
``taps`` the tap module is called as ``tap(value_a, value_b)`` for its side effects (its result is
ignored). The forward returns ``(output_a, output_b)``. Every node of the pair records what it is
under ``node.meta["graphrepair"]``: ``{"side": "a" | "b", "of": <node of gm>}`` for the copies,
``{"inserted_by": "pair_graph", "after": <node of gm>}`` for the taps. ``gm`` is left as it was.

Interleaving is what makes joint statistics cheap: the two values a tap compares exist together
only while the tap runs, and each is freed at its last use as in a plain forward, so the pass
needs about twice the activation memory of one model's forward instead of holding every tapped
activation of A until B has run.

When the graph may write in place (``passes.in_place_ops.writes_in_place``), copy B reads clones
of the inputs, so that an in-place op of copy A on an input cannot change what copy B sees.

A graph whose placeholders take a pytree (``torch.export`` modules) is paired in its flat form:
the paired module takes the flat inputs (one tensor for a one-tensor model) and returns the two
flat output lists.

A paired module reads its roots and taps by attribute when it runs (``self.a...``,
``self._gr_tap_0``), so one made for a graph can be pointed at other roots and taps of the same
graph (``bind_pair``) and emptied after a pass (``unbind_pair``: it then holds no model, tap or
tensor), instead of being built again for the next pair of models.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from passes.base import PassResult, annotate, annotation, graph_pass
from passes.errors import PassError
from passes.modules import get_attr_value, named_nodes
from passes.in_place_ops import writes_in_place

TAP_PREFIX = "_gr_tap"


def _resolves(root: nn.Module, target: str) -> bool:
    try:
        get_attr_value(root, target)
    except PassError:
        return False
    return True


_MISSING = object()


def _check_roots(gm: fx.GraphModule, root_a: nn.Module, root_b: nn.Module) -> None:
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            for side, root in (("A", root_a), ("B", root_b)):
                if not _resolves(root, n.target):
                    raise PassError(f"pair_graph: node {n.name!r} reads {n.target!r}, which model {side} "
                                    f"does not have")


def _tap_targets(paired: fx.GraphModule) -> dict[str, str]:
    """{node of the original graph: the attribute its tap is called under} of a paired module."""
    return {annotation(n)["after"]: str(n.target) for n in paired.graph.nodes
            if n.op == "call_module" and annotation(n).get("inserted_by") == "pair_graph"}


def bind_pair(paired: fx.GraphModule, gm: fx.GraphModule, root_a: nn.Module, root_b: nn.Module,
              taps: dict[str, nn.Module]) -> None:
    """Point ``paired`` (``pair_graph(gm, ...).graph_module``) at ``root_a``, ``root_b`` and
    ``taps``, in place: the same nodes tapped (PassError otherwise), the roots checked as
    ``pair_graph`` checks them."""
    targets = _tap_targets(paired)
    if set(targets) != set(taps):
        raise PassError(f"bind_pair: the paired module taps {sorted(targets)}, not {sorted(taps)}")
    _check_roots(gm, root_a, root_b)
    paired._modules["a"], paired._modules["b"] = root_a, root_b
    for node, target in targets.items():
        paired._modules[target] = taps[node]


def unbind_pair(paired: fx.GraphModule) -> None:
    """Let ``paired`` go of its roots and taps (empty modules in their place), in place: it holds
    no model, tap or tensor until ``bind_pair`` binds it again."""
    empty = nn.Module()  # one for all: it holds nothing
    for target in ["a", "b", *_tap_targets(paired).values()]:
        paired._modules[target] = empty
    paired._parameters.clear()
    paired._buffers.clear()


def _clone(x):
    return x.clone() if hasattr(x, "clone") else x


@graph_pass(in_place=False)
def pair_graph(gm: fx.GraphModule, root_a: nn.Module, root_b: nn.Module,
               taps: dict[str, nn.Module], outputs: bool = True) -> PassResult:
    """The paired GraphModule of ``gm``'s graph (see the module doc), as the result's
    ``graph_module``. ``taps``: node name -> module called as ``module(value_a, value_b)`` right
    after both copies of that node have run. ``outputs=False``: only the taps matter; the pair stops
    after the last tap and returns None (nothing after it can change what a tap sees).
    counts: {"taps": taps inserted, "nodes": nodes of ``gm`` run in each copy}."""
    graph = gm.graph
    clone_inputs = writes_in_place(gm)
    named_nodes(gm, taps, "pair_graph")
    _check_roots(gm, root_a, root_b)
    root = nn.Module()
    root.a, root.b = root_a, root_b

    out = fx.Graph()
    env_a: dict[fx.Node, fx.Node] = {}
    env_b: dict[fx.Node, fx.Node] = {}
    result = _MISSING
    left = len(taps)
    copied = 0
    for n in graph.nodes:
        if n.op == "placeholder":
            p = out.node_copy(n)
            env_a[n] = env_b[n] = p
            if clone_inputs:
                env_b[n] = out.call_function(_clone, (p,))
            continue
        if n.op == "output":
            result = (fx.map_arg(n.args[0], env_a.__getitem__), fx.map_arg(n.args[0], env_b.__getitem__))
            if not outputs:
                result = None
            continue
        for side, env in (("a", env_a), ("b", env_b)):
            target = f"{side}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = out.create_node(n.op, target, fx.map_arg(n.args, env.__getitem__),
                                  fx.map_arg(n.kwargs, env.__getitem__), name=f"{side}_{n.name}",
                                  type_expr=n.type)
            new.meta = dict(n.meta)
            annotate(new, side=side, of=n.name)
            env[n] = new
        copied += 1
        if n.name in taps:
            target = f"{TAP_PREFIX}_{len(taps) - left}"
            setattr(root, target, taps[n.name])
            tap = out.call_module(target, (env_a[n], env_b[n]))
            annotate(tap, inserted_by="pair_graph", after=n.name)
            left -= 1
            if not outputs and left == 0:
                result = None
                break
    if result is _MISSING:
        raise PassError("pair_graph: the graph has no output node")
    out.output(result)
    paired = fx.GraphModule(root, out)
    paired.graph.lint()
    return PassResult(paired, True, {"taps": len(taps), "nodes": copied}, [])
