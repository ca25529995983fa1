"""A PermutationSpec as rich tables on the terminal (``inspect``); its plain-data and Graphviz views
are the library's (``graphrepair.discovery.views``)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from graphrepair.discovery.spec import PermutationSpec
from graphrepair.discovery.views import totals


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
