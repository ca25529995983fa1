"""The benchmarks run (on tiny inputs) and print the figures the README quotes."""

from __future__ import annotations

import platform
import re

import pytest
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


def test_bench_held_memory_alternates_both_trim_settings(capsys):
    from benchmarks import bench_held_memory
    from graphrepair import runtime

    if not runtime.holds_memory():
        pytest.skip("held_memory acts on glibc only" if platform.libc_ver()[0] != "glibc" else "malloc tuned")
    held = runtime.held_memory
    out = bench_held_memory.run(lambda: mlp(depth=2, width=8), (1, 28, 28), 64, 32, pairs=1)
    assert runtime.held_memory is held  # put back
    assert set(out) == set(bench_held_memory.SETTINGS) and all(len(v) == 1 and v[0] > 0 for v in out.values())
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("trim threshold")]
    assert len(lines) == 2 and all(re.search(r"ratio [\d.]+", l) for l in lines)
