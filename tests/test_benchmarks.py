"""The benchmarks run (on tiny inputs) and print the figures the README quotes."""

from __future__ import annotations

import platform
import re

import pytest
import torch

from benchmarks import bench_merge
from fixtures.zoo import mlp


def test_bench_merge_prints_ratio_stages_fixed_costs_and_floor(capsys):
    paired = []
    ratio = bench_merge.bench("tiny MLP", lambda: mlp(depth=3, width=16), (1, 28, 28), 96, 32,
                              torch.device("cpu"), repeats=3, paired=paired)
    out = capsys.readouterr().out
    printed = float(re.search(r"ratio=\s*([\d.]+)", out).group(1))
    assert ratio > 0 and abs(printed - ratio) < 0.01
    # each repeat's own ratio: as many as repeats, their median and range printed
    assert len(paired) == 3 and all(r > 0 for r in paired)
    med, lo, hi = map(float, re.search(r"right after it: median ([\d.]+) \(([\d.]+) - ([\d.]+), 3 repeats\)",
                                       out).groups())
    assert abs(med - sorted(paired)[1]) < 0.01 and abs(lo - min(paired)) < 0.01 and abs(hi - max(paired)) < 0.01
    assert re.search(r"resets 3, folded 3", out)
    for label in ("prepare", "merge_prepared", "fixed costs", "floor"):
        assert re.search(rf"{label}[^=]*=\s*[\d.]+", out), label
    floor = float(re.search(r"floor .*?([\d.]+) x the 3 plain passes", out).group(1))
    assert 0 < floor
    # goal 2 (fixed cost) is judged on the case given it only
    assert "ms beyond them (no goal: goal 2 is the MLP's)" in out and "[goal <= 50 ms" not in out
    bench_merge.bench("tiny MLP", lambda: mlp(depth=3, width=16), (1, 28, 28), 96, 32, torch.device("cpu"),
                      repeats=1, fixed_goal=10.0)
    beyond, judged = re.search(r"([\d.]+) ms beyond them \[goal <= 10000 ms: (met|NOT met)\]",
                               capsys.readouterr().out).groups()
    assert judged == ("met" if float(beyond) <= 10000 else "NOT met")


def test_bench_merge_busy_summary_judges_the_medians_of_paired_repeats():
    quiet = ({"mlp": 3.0, "resnet": 1.2}, {"mlp": [3.2, 3.0, 3.4], "resnet": [1.3, 1.2]})
    busy = ({"mlp": 1.0, "resnet": 1.1}, {"mlp": [5.0, 5.2, 9.0], "resnet": [1.4, 1.6]})
    lines = bench_merge.busy_summary(quiet, busy)
    assert len(lines) == 2
    # the MLP: medians 5.2 / 3.2 = 1.62, over the goal, though the best of each side says 0.33
    assert re.search(r"mlp: medians of the paired repeats 5\.20 / 3\.20 = 1\.62 \[goal <= 1\.5: NOT met\]", lines[0])
    assert re.search(r"best of each side 1\.00 / 3\.00 = 0\.33", lines[0])
    assert re.search(r"resnet: medians of the paired repeats 1\.50 / 1\.25 = 1\.20 \[goal <= 1\.5: met\]", lines[1])
    # a case measured on one side only is left out
    assert len(bench_merge.busy_summary(({"mlp": 3.0}, {"mlp": [3.0]}), busy)) == 1


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


def test_bench_design_times_each_part_of_the_joint_pass(capsys):
    from benchmarks import bench_design

    best = bench_design.run(depth=2, width=8, batch_size=16, batches=2, repeats=1)
    assert set(best) == {"plain A + B", "A and B as one model (vmap)", "A and B as one model (baddbmm)",
                         "paired graph, taps that do nothing", "paired graph, the merge's taps",
                         "the same, no per-batch moments kept"}
    assert all(0 < s < 10 for s in best.values())
    lines = [l for l in capsys.readouterr().out.splitlines() if "ms per batch" in l]
    assert len(lines) == len(best)
    # each printed beside its ratio to the plain passes, the plain passes' own being 1
    assert re.search(r"plain A \+ B\s+[\d.]+ ms per batch =\s+1\.00 x", lines[0])


def test_bench_design_statistics_step_sums_what_the_taps_sum():
    from benchmarks import bench_design

    torch.manual_seed(0)
    a, b = mlp(depth=2, width=8).eval(), mlp(depth=2, width=8).eval()
    x = torch.randn(16, 1, 28, 28)
    out = bench_design.statistics_step(a, b)(x)
    assert len(out) == 2 * (8 + 1)  # per hidden layer: 4 values x (S1, S2), and one cross product
    za = a[1](torch.flatten(x, 1))
    torch.testing.assert_close(out[0], za.sum(0))
    torch.testing.assert_close(out[1], (za * za).sum(0))
    ra, rb = torch.relu(za), torch.relu(b[1](torch.flatten(x, 1)))
    torch.testing.assert_close(out[8], ra.T @ rb)


def test_bench_design_without_a_compiler_times_the_eager_statistics_and_says_why(capsys, monkeypatch):
    from benchmarks import bench_design

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", refuse)
    best = bench_design.run(depth=2, width=8, batch_size=16, batches=2, repeats=1, compile=True)
    assert "statistics, eager ops" in best and "statistics, compiled (torch.compile)" not in best
    out = capsys.readouterr().out
    assert "torch.compile could not compile the statistics here (RuntimeError: no C++ compiler found)" in out
