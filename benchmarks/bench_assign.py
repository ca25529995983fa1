"""The assignment phase at ViT-B/16's widths: scipy one after another, scipy side by side, and
the path ``assign.lap_each`` takes (the certified path where it proves the optimum unique).

    python -m benchmarks.bench_assign [--threads 2] [--blocks 12] [--dead 0.03]

ViT-B/16 (12 blocks, width 768, MLP 3072) gives activation matching one linear assignment per
group: 12 MLP hidden groups of 3072 units, the residual stream (768) and the attention groups
(per block 12 head dims of 64 for q/k and for v, 24 x 64). The matrices here are correlation-like
(each A unit's match in a random B unit with correlation 0.2-0.9, noise of std 0.1, ``--dead``
dead units in each model, rounded to the tie grid as ``activation_match.tie_safe`` does), so that
the solver meets what it meets in a merge. Printed, in one run, for the matrices with dead units
and for the same without: the phase with scipy one after another (the reference), with scipy on
``--threads`` threads, and as ``lap_each`` solves it (how many matrices the certified path
proved), whether each gives scipy's permutations, and the goal of issue 20 (goal 4): <= 3 s on
2 cores. Dead units tie (two all-zero rows can be exchanged): ``lap_each`` is called as
activation matching calls it (``dead_any_order``), which proves how the live units pair and
leaves the dead units' order to the weights, so it is compared with scipy's on the live units
(``live_pairing``); without dead units the permutations are scipy's own.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

import numpy as np
import torch

from graphrepair.merging import assign
from graphrepair.merging.activation_match import tie_safe


def problems(blocks: int, seed: int = 0, dead: float = 0.03) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    sizes = [3072] * blocks + [768] + [64] * (24 * blocks)
    out = []
    for n in sizes:
        s = rng.normal(0.0, 0.1, (n, n))
        s[np.arange(n), rng.permutation(n)] += rng.uniform(0.2, 0.9, n)
        s[rng.random(n) < dead] = 0.0
        s[:, rng.random(n) < dead] = 0.0
        out.append(tie_safe(torch.as_tensor(s)))
    return out


def live_pairing(s, p) -> tuple:
    """How permutation ``p`` pairs the live units of ``s`` (what activation matching keeps of an
    assignment; the dead units' order the weights decide): (live row -> live column pairs, live
    rows on dead columns, live columns on dead rows)."""
    dead_rows, dead_cols = ~s.any(1), ~s.any(0)
    live = ~dead_rows & ~dead_cols[p]
    return (frozenset(zip(np.flatnonzero(live).tolist(), p[live].tolist())),
            frozenset(np.flatnonzero(~dead_rows & dead_cols[p]).tolist()),
            frozenset(p[dead_rows & ~dead_cols[p]].tolist()))


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _timed(mats: list[torch.Tensor], threads: int, dead_any_order: bool = False
           ) -> tuple[list[torch.Tensor], float]:
    t = time.perf_counter()
    perms = [p for _, p in assign.lap_each(mats, threads, dead_any_order=dead_any_order)]
    return perms, time.perf_counter() - t


def phase(mats: list[torch.Tensor], threads: int) -> None:
    t = time.perf_counter()
    ref = [assign._solve(assign._as_cost(m)) for m in mats]
    t_one = time.perf_counter() - t
    # scipy alone, on threads (the path before the certified one)
    with mock.patch.object(assign, "CERTIFIED_ROWS", 1 << 62):
        side, t_side = _timed(mats, threads)
    proved = []
    certified = assign._certified

    def count(s, dead=False):
        p = certified(s, dead)
        proved.append(p is not None)
        return p

    with mock.patch.object(assign, "_certified", count):  # as activation matching calls it
        fast, t_fast = _timed(mats, threads, dead_any_order=True)
    same = lambda got: all(torch.equal(a, b) for a, b in zip(ref, got))
    costs = [assign._as_cost(m) for m in mats]
    alike = all(live_pairing(c, a.numpy()) == live_pairing(c, b.numpy()) for c, a, b in zip(costs, ref, fast))
    wide = sum(m.shape[0] >= assign.CERTIFIED_ROWS for m in mats)
    print(f"  scipy one after another {t_one:6.2f}s | scipy on {threads} threads {t_side:6.2f}s "
          f"(same: {same(side)})")
    print(f"  lap_each {t_fast:6.2f}s ({t_one / t_fast:.2f}x), certified {sum(proved)} of {wide} wide "
          f"matrices | same permutations as scipy: {same(fast)}, the live units paired as scipy: {alike} "
          f"| goal: <= 3 s on 2 cores | load average {_load()}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--dead", type=float, default=0.03)
    args = p.parse_args()
    print(f"{24 * args.blocks + args.blocks + 1} assignments ({args.blocks} of 3072 x 3072), "
          f"{len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}, "
          f"load average {_load()}")
    for dead in (args.dead, 0.0):
        print(f"dead units {dead:.0%}:")
        phase(problems(args.blocks, dead=dead), args.threads)


if __name__ == "__main__":
    main()
