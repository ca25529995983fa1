"""The library's views of its results: a spec as plain data and as DOT, an export's op summary."""

from __future__ import annotations

import torch
from torch import nn

import graphrepair as gr
from graphrepair.io.export import op_summary


def _spec():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    return gr.discover(model, (torch.randn(2, 4),))


def test_spec_as_dict_counts_groups_channels_and_fixed_axes():
    spec = _spec()
    d = spec.as_dict()
    assert [g["size"] for g in d["groups"]] == [8, 6]
    assert d["totals"]["groups"] == 2 and d["totals"]["free_channels"] == 14
    assert d["totals"]["parameters"] == 6 and d["trace"] == spec.traced.kind
    assert {f["name"] for f in d["fixed"]} == {f.name for f in spec.fixed}


def test_spec_to_dot_colours_the_nodes_of_each_group():
    dot = _spec().to_dot()
    assert dot.startswith("digraph graphrepair {") and dot.endswith("}\n")
    fills = [line.split('fillcolor="')[1][:7] for line in dot.splitlines() if "fillcolor" in line]
    assert "#dddddd" in fills and len(set(fills) - {"#dddddd"}) == 2  # two groups, two colours


def test_op_summary_lists_the_most_used_ops_first():
    assert op_summary({"Relu": 8, "Gemm": 9, "Add": 1}) == "Gemm 9, Relu 8, Add 1"
    assert op_summary({f"Op{i}": i for i in range(1, 11)}) == ", ".join(f"Op{i} {i}" for i in range(10, 2, -1))
