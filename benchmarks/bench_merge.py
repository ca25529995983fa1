"""Merge cost against the least work a merge can do.

    python -m benchmarks.bench_merge [--device auto|cpu|cuda] [--examples 5000]

A merge with activation matching and exact REPAIR must run A and B over the fitting data (one
joint pass gives every statistic) and the merged model once (REPAIR's reset statistics). The
floor is therefore three plain eval passes over the same examples. Printed, measured in one run:

    ratio = time(graphrepair.merge_models(..., method="activation", repair="exact"))
            / time(plain passes of A, B and the merged model)

Everything a merge does is in the numerator: tracing and discovery, the joint statistics pass,
linear assignment, permutation, interpolation, the REPAIR pass, folding.

After the ratio a line gives the stages (discovery, ``prepare``, ``merge_prepared``) and the
fixed costs: a whole merge of 8 examples, which is tracing, graph building, assignment and
folding with next to no data, against the same plain passes. A last line gives the floor of this
design: the compute no activation-matching merge can skip, timed alone in the same run:

    floor = discovery + one pass of A and B side by side whose taps only multiply X_A^T X_B at
            the observation points + the linear assignments + a plain pass of the merged model

against the same plain passes; the per-channel sums, REPAIR's normalisation, graph building and
folding come on top of it (best of ``--repeats``, like the ratio).

Both sides are timed in the same process, alternately, best of ``--repeats``; the minor page
faults of each are printed too. On CPU with glibc's default malloc every activation above the
mmap threshold (32 MB at most) is a fresh mapping whose pages fault on first touch; how many do
depends on the heap's history, so it can favour either side. Run once as is and once with

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295

(memory is reused, no page churn: what jemalloc or tcmalloc give) to see both regimes.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import graphrepair as gr
from graphrepair.merging.assign import lap
from graphrepair.merging.merge import merge_prepared
from graphrepair.merging.points import observation_points
from passes.pair import pair_graph
from passes.moments import _layout, cross_product
from fixtures.zoo import mlp, resnet20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_pass(model, x, batch_size, device):
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    sync(device)


class CrossOnly(torch.nn.Module):
    """A tap that only multiplies A's and B's channel matrices, as the joint pass must."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, a, b):
        cross_product(_layout(a, self.axis, None, None), _layout(b, self.axis, None, None))


@torch.no_grad()
def floor(a, b, merged, x, batch_size, device, corr) -> float:
    """Seconds of the compute an activation-matching merge with exact REPAIR cannot skip (see the
    module doc)."""
    sync(device)
    t = time.perf_counter()
    spec = gr.discover(a, (x[:2],))
    axes = {p.node: p.axis for pts in observation_points(spec).values() for p in pts}
    t_discover = time.perf_counter() - t
    pair = pair_graph(spec.traced.gm, a, b, {n: CrossOnly(ax) for n, ax in axes.items()},
                      outputs=False).graph_module
    sync(device)
    t = time.perf_counter()
    plain_pass(pair, x, batch_size, device)
    t_pair = time.perf_counter() - t
    t = time.perf_counter()
    for c in corr:
        lap(c)
    t_lap = time.perf_counter() - t
    t = time.perf_counter()
    plain_pass(merged, x, batch_size, device)
    return t_discover + t_pair + t_lap + (time.perf_counter() - t)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(name, factory, shape, n, batch_size, device, repeats=2):
    torch.manual_seed(0)
    a, b = factory().to(device).eval(), factory().to(device).eval()
    x = torch.randn(n, *shape, device=device)
    # warm-up (allocator, kernels, first trace)
    warm = min(512, n)
    gr.merge_models([a, b], x[:warm], num_examples=warm, batch_size=batch_size)
    best_merge, best_plain, result = float("inf"), float("inf"), None
    faults_merge = faults_plain = 0
    for _ in range(repeats):
        sync(device)
        f, t = faults(), time.perf_counter()
        result = gr.merge_models([a, b], x, num_examples=n, batch_size=batch_size,
                                 method="activation", repair="exact")
        sync(device)
        if time.perf_counter() - t < best_merge:
            best_merge, faults_merge = time.perf_counter() - t, faults() - f
        f, t = faults(), time.perf_counter()
        for m in (a, b, result.model):
            plain_pass(m, x, batch_size, device)
        if time.perf_counter() - t < best_plain:
            best_plain, faults_plain = time.perf_counter() - t, faults() - f
    print(f"{name:30s} device={device.type:4s} examples={n} merge={best_merge:7.3f}s "
          f"3 plain passes={best_plain:7.3f}s ratio={best_merge / best_plain:5.2f} "
          f"(page faults {faults_merge} vs {faults_plain}; resets {result.resets}, folded {result.folded})")
    # where the time goes (one more merge, in its stages): discovery alone, then the whole prepare
    # (trace, discover, joint pass, linear assignment) and merge_prepared (interpolation, REPAIR
    # pass, folding); each against the plain passes it contains
    sync(device)
    t = time.perf_counter()
    gr.discover(a, (x[:2],))
    t_discover = time.perf_counter() - t
    t = time.perf_counter()
    prep = gr.prepare([a, b], x, num_examples=n, batch_size=batch_size, statistics=True)
    sync(device)
    t_prepare = time.perf_counter() - t
    t = time.perf_counter()
    merge_prepared(prep, [0.5, 0.5], "exact")
    sync(device)
    t_repair = time.perf_counter() - t
    plain = best_plain / 3
    # the fixed costs: a whole merge of one small batch (tracing, graphs, assignments, folding)
    small = x[:min(8, n)]
    sync(device)
    t = time.perf_counter()
    gr.merge_models([a, b], small, num_examples=len(small), batch_size=batch_size,
                    method="activation", repair="exact")
    sync(device)
    t_fixed = time.perf_counter() - t
    print(f"{'':30s} stages: discover {t_discover:.3f}s | prepare {t_prepare:.3f}s = "
          f"{t_prepare / (2 * plain):.2f} x the plain passes of A and B | merge_prepared {t_repair:.3f}s = "
          f"{t_repair / plain:.2f} x a plain pass | fixed costs (a merge of {len(small)} examples) "
          f"{t_fixed:.3f}s = {t_fixed / best_plain:.2f} x the 3 plain passes")
    t_floor = min(floor(a, b, result.model, x, batch_size, device, list(prep.stats[0].corr.values()))
                  for _ in range(repeats))
    print(f"{'':30s} floor (discovery, A and B side by side with only the X_A^T X_B products, "
          f"assignments, merged pass) {t_floor:.3f}s = {t_floor / best_plain:.2f} x the 3 plain passes")
    return best_merge / best_plain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["mlp", "resnet"], default=None)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    if args.only in (None, "mlp"):
        bench("paper MLP, 20 layers x 128", lambda: mlp(depth=20, width=128), (1, 28, 28),
              args.examples, args.batch_size, device, args.repeats)
    if args.only in (None, "resnet"):
        bench("ResNet20 (BN) width 2, 32x32", lambda: resnet20("bn", width=2), (3, 32, 32),
              args.examples, args.batch_size, device, args.repeats)


if __name__ == "__main__":
    main()
