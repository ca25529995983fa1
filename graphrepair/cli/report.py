"""Human and machine views of a PermutationSpec: a rich table, JSON, and a Graphviz graph."""

from __future__ import annotations

import colorsys
from collections import Counter

from rich.console import Console
from rich.table import Table

from graphrepair.discovery import axes as ax
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
    fixed_params = [f for f in spec.fixed if f.kind == "param" and not f.structural]
    return {
        "groups": len(spec.groups),
        "free_channels": spec.num_free,
        "parameters": len(spec.param_axes),
        "fixed_parameter_axes": len(fixed_params),
        "fixed_ops": len([f for f in spec.fixed if f.kind == "node"]),
    }


def print_spec(spec: PermutationSpec, console: Console | None = None, max_layers: int = 4) -> None:
    console = console or Console()
    t = totals(spec)
    console.print(f"[bold]{spec.model_name}[/bold] traced with "
                  f"{'torch.fx.symbolic_trace' if spec.traced.kind == 'fx' else 'torch.export'}"
                  + (f" (symbolic_trace failed: {spec.traced.fx_error})" if spec.traced.fx_error else ""))
    table = Table(title=f"{t['groups']} permutation groups, {t['free_channels']} channels may move")
    table.add_column("group")
    table.add_column("size", justify="right")
    table.add_column("layers")
    table.add_column("joined by")
    for g in spec.groups:
        layers = ", ".join(g.layers[:max_layers]) + (f" (+{len(g.layers) - max_layers})"
                                                     if len(g.layers) > max_layers else "")
        table.add_row(g.name, str(g.size), layers, ", ".join(g.joins) or "-")
    console.print(table)
    reasons = Counter(f.reason for f in spec.fixed if not f.structural)
    if reasons:
        fx = Table(title="axes kept fixed, and why")
        fx.add_column("reason")
        fx.add_column("axes", justify="right")
        fx.add_column("examples")
        for reason, n in reasons.most_common():
            ex = [f"{f.name}[{f.axis}]" for f in spec.fixed if f.reason == reason and not f.structural][:3]
            fx.add_row(reason, str(n), ", ".join(ex))
        console.print(fx)
    structural = sum(1 for f in spec.fixed if f.structural)
    console.print(f"totals: {t['groups']} groups, {t['free_channels']} free channels, "
                  f"{t['parameters']} parameters/buffers, {t['fixed_parameter_axes']} parameter axes "
                  f"fixed by constraints, {t['fixed_ops']} fixed by ops, {structural} structural "
                  f"(kernel/spatial) axes")


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
