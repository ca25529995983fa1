"""The assignment phase at ViT-B/16's widths: one after another against side by side.

    python -m benchmarks.bench_assign [--threads 2] [--blocks 12]

ViT-B/16 (12 blocks, width 768, MLP 3072) gives activation matching one linear assignment per
group: 12 MLP hidden groups of 3072 units, the residual stream (768) and the attention groups
(per block 12 head dims of 64 for q/k and for v, 24 x 64). The matrices here are correlation-like
(each A unit's match in a random B unit with correlation 0.2-0.9, noise of std 0.1, 3% dead
units in each model, rounded to the tie grid as ``activation_match.tie_safe`` does), so that the
solver meets what it meets in a merge. Printed, in one run: the phase solved one after another
(``lap`` per group, as before) and on ``--threads`` threads (``assign.lap_each``), whether both
give the same permutations, and the goal of issue 20 (goal 4): <= 3 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from graphrepair.merging.activation_match import tie_safe
from graphrepair.merging.assign import lap, lap_each


def problems(blocks: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    sizes = [3072] * blocks + [768] + [64] * (24 * blocks)
    out = []
    for n in sizes:
        s = rng.normal(0.0, 0.1, (n, n))
        s[np.arange(n), rng.permutation(n)] += rng.uniform(0.2, 0.9, n)
        s[rng.random(n) < 0.03] = 0.0
        s[:, rng.random(n) < 0.03] = 0.0
        out.append(tie_safe(torch.as_tensor(s)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=12)
    args = p.parse_args()
    mats = problems(args.blocks)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{len(mats)} assignments ({sum(m.shape[0] == 3072 for m in mats)} of 3072 x 3072), "
          f"{len(os.sched_getaffinity(0))} cores, load average {load}")
    t = time.perf_counter()
    one = [lap(m) for m in mats]
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    side = [perm for _, perm in lap_each(mats, args.threads)]
    t_side = time.perf_counter() - t
    same = all(torch.equal(a, b) for a, b in zip(one, side))
    print(f"one after another {t_one:6.2f}s | on {args.threads} threads {t_side:6.2f}s "
          f"({t_one / t_side:.2f}x) | same permutations: {same} | goal: <= 3 s on 2 cores")
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[:3]}")


if __name__ == "__main__":
    main()
