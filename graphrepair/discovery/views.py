"""A PermutationSpec as plain data (``inspect --json``) and as a Graphviz graph coloured by group
(``inspect --dot``); ``PermutationSpec.as_dict`` and ``to_dot`` read these."""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

from graphrepair.discovery import axes as ax

if TYPE_CHECKING:
    from graphrepair.discovery.spec import PermutationSpec


def spec_to_dict(spec: PermutationSpec) -> dict:
    """Plain data for ``inspect --json``."""
    return {
        "model": spec.model_name,
        "trace": spec.traced.kind,
        "groups": [
            {"name": g.name, "size": g.size, "layers": list(g.layers), "joins": list(g.joins),
             "params": [{"name": m.name, "axis": m.axis, "layout": m.layout} for m in g.params],
             "nodes": [{"name": m.name, "axis": m.axis, "layout": m.layout} for m in g.nodes]}
            for g in spec.groups
        ],
        "fixed": [{"name": f.name, "axis": f.axis, "size": f.size, "reason": f.reason,
                   "kind": f.kind, "structural": f.structural} for f in spec.fixed],
        "totals": totals(spec),
    }


def totals(spec: PermutationSpec) -> dict:
    """Groups, free channels, parameters, and the axes kept fixed by constraints and by ops."""
    fixed_params = [f for f in spec.fixed if f.kind == "param" and not f.structural]
    return {
        "groups": len(spec.groups),
        "free_channels": spec.num_free,
        "parameters": len(spec.param_axes),
        "fixed_parameter_axes": len(fixed_params),
        "fixed_ops": len([f for f in spec.fixed if f.kind == "node"]),
    }


def _colour(i: int, n: int) -> str:
    r, g, b = colorsys.hsv_to_rgb((i / max(n, 1)) % 1.0, 0.45, 0.95)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def spec_to_dot(spec: PermutationSpec) -> str:
    """The traced graph as Graphviz DOT; each node is filled with the colour of the group that
    its channel axis (last axis carrying a group) belongs to, grey when nothing there can move."""
    vid_to_group = {vid: name for name, vid in spec.var_of_group.items()}
    colours = {g.name: _colour(i, len(spec.groups)) for i, g in enumerate(spec.groups)}
    lines = ["digraph graphrepair {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
             'fontname="Helvetica", fontsize=10];']
    for node in spec.traced.gm.graph.nodes:
        exprs = spec.node_axes.get(node.name)
        group = None
        for e in exprs or ():
            for v in ax.variables(e):
                group = vid_to_group.get(v.id, group)
        fill = colours.get(group, "#dddddd")
        label = f"{node.name}\\n{_target(node)}" + (f"\\n[{group}]" if group else "")
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{fill}"];')
    for node in spec.traced.gm.graph.nodes:
        for user in node.users:
            lines.append(f'  "{node.name}" -> "{user.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _target(node) -> str:
    t = node.target
    text = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return str(text).replace('"', "'")
