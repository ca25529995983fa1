"""Kernel launches of the joint pass's statistics, per observed node and per batch.

    python -m benchmarks.bench_moments [--batches 4]

The joint pass of a merge (``graphrepair.merging.stats``) calls one tap per observed node with
the node's value in A and in B (``passes.pair_tap.PairTap``); the tap adds per-channel sums of
each and the A-B cross products (``passes.moments``), and at REPAIR's reset points each batch's
moments. Every aten op it runs is a kernel launch (on the GPU) or a dispatch (on the CPU), whose
fixed cost is what a small layer pays for. Counted here with ``torch.profiler`` on the CPU: the
aten ops the taps call (top level: not those an aten op runs inside itself; all of them in
brackets), divided by the number of tap calls, for the paper's MLP (an (N, C) matrix per node) and a BN ResNet20 (conv
maps), with the real tap plan of an activation-matching merge with exact REPAIR. Goal (issue
20, goal 6): a constant number of launches per node per batch, whatever the layout.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import graphrepair as gr
from graphrepair.merging.points import observation_points, reset_points
from graphrepair.merging.stats import pair_roots, plan_taps
from passes import pair_tap
from passes.pair import pair_graph
from fixtures.zoo import mlp, resnet20

_TAP = "graphrepair.tap"


def launches(factory, shape, batch_size: int, batches: int) -> tuple[float, float, dict]:
    """(top-level aten ops per node per batch, all aten ops per node per batch, the top-level ones by name)."""
    torch.manual_seed(0)
    a, b = factory().eval(), factory().eval()
    x = torch.randn(batch_size * (batches + 2), *shape)
    spec = gr.discover(a, (x[:2],))
    plan = plan_taps(spec, observation_points(spec), reset_points(spec, "all"),
                     cross_at_resets=False, device=torch.device("cpu"))
    root_a, root_b = pair_roots(spec, a, b, torch.device("cpu"))
    pair = pair_graph(spec.traced.gm, root_a, root_b, plan.taps, outputs=False).graph_module
    real = pair_tap.PairTap.forward

    def traced_forward(self, xa, xb):
        with record_function(_TAP):
            return real(self, xa, xb)

    pair_tap.PairTap.forward = traced_forward
    try:
        with torch.no_grad():
            for i in range(2):  # the first batches allocate the waiting buffers
                pair(x[i * batch_size:(i + 1) * batch_size])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(2, batches + 2):
                    pair(x[i * batch_size:(i + 1) * batch_size])
    finally:
        pair_tap.PairTap.forward = real
    events = prof.events()
    calls = sum(1 for e in events if e.name == _TAP)

    def parents(e):
        p = e.cpu_parent
        while p is not None:
            yield p
            p = p.cpu_parent

    ops, top = [], []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        chain = [p.name for p in parents(e)]
        if _TAP in chain:
            ops.append(e)
            if not any(n.startswith("aten::") for n in chain[:chain.index(_TAP)]):
                top.append(e)  # called by the tap itself, not inside another aten op
    names = collections.Counter(e.name for e in top)
    return len(top) / calls, len(ops) / calls, {k: v / calls for k, v in names.most_common()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--detail", action="store_true", help="the kernels by name")
    args = p.parse_args()
    with open("/proc/loadavg") as f:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {f.read().split()[:3]}")
    for name, factory, shape, bs in (("paper MLP 20 x 128", lambda: mlp(depth=20, width=128), (1, 28, 28), 500),
                                     ("BN ResNet20 width 2", lambda: resnet20("bn", width=2), (3, 32, 32), 100)):
        k, ops, names = launches(factory, shape, bs, args.batches)
        print(f"{name:22s} launches (aten ops) per observed node per batch: {k:5.1f} (with nested ones {ops:5.1f}); "
              f"goal: a constant number whatever the layout")
        if args.detail:
            print("    " + ", ".join(f"{n.removeprefix('aten::')} {c:.2f}" for n, c in names.items()))


if __name__ == "__main__":
    main()
