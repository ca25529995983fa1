"""Discovery speed: tracing vs rule propagation on a 1000-layer MLP and a ResNet-152-scale graph.

    python -m benchmarks.bench_discover

Prints, per model, the graph size, the time to trace (symbolic_trace + one shape-recording run),
the time of rule propagation and spec building, their sum, and the propagation time per node
(which stays flat as graphs grow when discovery is linear).
"""

from __future__ import annotations

import time

import torch

import graphrepair as gr
from fixtures.zoo import mlp, resnet152_scale


def best_of(fn, repeats=3):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(name, model, x):
    model.eval()
    t_trace, traced = best_of(lambda: gr.trace(model, x))
    t_rules, spec = best_of(lambda: gr.discover(model, x, traced=traced))
    n = len(traced.gm.graph.nodes)
    print(f"{name:28s} nodes={n:5d} groups={len(spec.groups):5d} trace={t_trace:6.3f}s "
          f"rules+spec={t_rules:6.3f}s discover total={t_trace + t_rules:6.3f}s "
          f"rules per node={1e6 * t_rules / n:6.1f}us")
    return n, t_rules


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = [
        measure("MLP, 250 layers", mlp(depth=250, width=64), torch.randn(2, 1, 28, 28)),
        measure("MLP, 1000 layers", mlp(depth=1000, width=64), torch.randn(2, 1, 28, 28)),
        measure("ResNet-152-scale (bottleneck)", resnet152_scale(), torch.randn(2, 3, 32, 32)),
    ]
    (n1, t1), (n2, t2) = rows[0], rows[1]
    print(f"linearity: 4x the MLP nodes took {t2 / t1:.2f}x the rule time (1.0x per node = linear)"
          f" -> per-node ratio {(t2 / n2) / (t1 / n1):.2f}")


if __name__ == "__main__":
    main()
