"""Merge cost against the least work a merge can do.

    python -m benchmarks.bench_merge [--device auto|cpu|cuda] [--examples 5000]

A merge with activation matching and exact REPAIR must run A and B over the fitting data (one
joint pass gives every statistic) and the merged model once (REPAIR's reset statistics). The
floor is therefore three plain eval passes over the same examples. Printed, measured in one run:

    ratio = time(graphrepair.merge_models(..., method="activation", repair="exact"))
            / time(plain passes of A, B and the merged model)

Everything a merge does is in the numerator: tracing and discovery, the joint statistics pass,
linear assignment, permutation, interpolation, the REPAIR pass, folding.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphrepair as gr
from fixtures.zoo import mlp, resnet20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_pass(model, x, batch_size, device):
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    sync(device)


def bench(name, factory, shape, n, batch_size, device, repeats=2):
    torch.manual_seed(0)
    a, b = factory().to(device).eval(), factory().to(device).eval()
    x = torch.randn(n, *shape, device=device)
    # warm-up (allocator, kernels, first trace)
    gr.merge_models([a, b], x[:512], num_examples=512, batch_size=batch_size)
    best_merge, best_plain, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        result = gr.merge_models([a, b], x, num_examples=n, batch_size=batch_size,
                                 method="activation", repair="exact")
        sync(device)
        best_merge = min(best_merge, time.perf_counter() - t)
        t = time.perf_counter()
        for m in (a, b, result.model):
            plain_pass(m, x, batch_size, device)
        best_plain = min(best_plain, time.perf_counter() - t)
    print(f"{name:34s} device={device.type:4s} examples={n} merge={best_merge:7.3f}s "
          f"3 plain passes={best_plain:7.3f}s ratio={best_merge / best_plain:5.2f} "
          f"(resets {result.resets}, folded {result.folded})")
    return best_merge / best_plain


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bench("paper MLP, 20 layers x 128", lambda: mlp(depth=20, width=128), (1, 28, 28),
          args.examples, args.batch_size, device)
    bench("ResNet20 (BN) width 2, 32x32", lambda: resnet20("bn", width=2), (3, 32, 32),
          args.examples, args.batch_size, device)


if __name__ == "__main__":
    main()
