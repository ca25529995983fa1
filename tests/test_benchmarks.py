"""The benchmarks run (on tiny inputs) and print the figures the README quotes."""

from __future__ import annotations

import re

import torch

from benchmarks import bench_merge
from fixtures.zoo import mlp


def test_bench_merge_prints_ratio_stages_fixed_costs_and_floor(capsys):
    ratio = bench_merge.bench("tiny MLP", lambda: mlp(depth=3, width=16), (1, 28, 28), 96, 32,
                              torch.device("cpu"), repeats=1)
    out = capsys.readouterr().out
    printed = float(re.search(r"ratio=\s*([\d.]+)", out).group(1))
    assert ratio > 0 and abs(printed - ratio) < 0.01
    assert re.search(r"resets 3, folded 3", out)
    for label in ("prepare", "merge_prepared", "fixed costs", "floor"):
        assert re.search(rf"{label}[^=]*=\s*[\d.]+", out), label
    floor = float(re.search(r"floor .*?([\d.]+) x the 3 plain passes", out).group(1))
    assert 0 < floor
