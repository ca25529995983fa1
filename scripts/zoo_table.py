"""Every zoo model's discovery at a glance: trace kind, groups, freed channels, fixed axes.

    python -m scripts.zoo_table

Prints a Markdown table; the fixed-axis column counts parameter axes kept fixed by a constraint
(not kernel/spatial axes) and lists the reasons with their counts.
"""

from __future__ import annotations

import collections

import torch

import graphrepair as gr
from fixtures.zoo import ZOO


def main() -> None:
    print("| model | trace | groups | freed channels | fixed parameter axes | reasons (all fixed axes) |")
    print("|---|---|---:|---:|---:|---|")
    for name, entry in ZOO.items():
        torch.manual_seed(0)
        model = entry.factory().eval()
        spec = gr.discover(model, entry.example_inputs())
        fixed = [f for f in spec.fixed if not f.structural]
        reasons = collections.Counter(f.reason.split(" at node")[0] for f in fixed)
        listed = "; ".join(f"{r} ({n})" for r, n in reasons.most_common())
        params = sum(1 for f in fixed if f.kind == "param")
        print(f"| {name} | {spec.traced.kind} | {len(spec.groups)} | {spec.num_free} | {params} | {listed} |")


if __name__ == "__main__":
    main()
