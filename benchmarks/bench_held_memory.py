"""Whether trimming inside a call costs page faults: merges of the BN ResNet20 of width 2
alternated in one process, with glibc's trim threshold as ``runtime.held_memory`` sets it (1 GiB: a
batch that frees more than that at the top of the heap gives it back to the system, when no small
block lies above it) and lifted inside the call (nothing goes back before the call ends).

Each line: one merge, its minor page faults, the three plain passes (A, B and A again) right after
it, and the merge / plain passes ratio. Alternating the two settings in one process, after a
full-size merge that is not counted, compares them on the same heap and the same machine state.

    python -m benchmarks.bench_held_memory [--examples 5000] [--pairs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

import graphrepair as gr
from benchmarks.bench_merge import load, plain_pass
from fixtures.zoo import resnet20
from graphrepair import runtime

SETTINGS = ("1 GiB (held_memory)", "none inside a call")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(factory, shape, examples: int, batch_size: int, pairs: int) -> dict[str, list[float]]:
    """{setting: [merge / plain passes ratio of each merge]}; prints a line per merge."""
    libc = runtime._glibc()
    if libc is None:
        raise SystemExit("held_memory does not act in this process (not glibc, or the user tuned malloc)")
    held = runtime.held_memory

    @contextlib.contextmanager
    def untrimmed():  # the alternative: no trimming inside the call (glibc reads -1 as the largest size)
        with held():
            libc.mallopt(runtime._M_TRIM_THRESHOLD, -1)
            try:
                yield
            finally:
                libc.mallopt(runtime._M_TRIM_THRESHOLD, runtime._HELD)

    torch.manual_seed(0)
    a, b = factory().eval(), factory().eval()
    x = torch.randn(examples, *shape)
    gr.merge_models([a, b], x, num_examples=examples, batch_size=batch_size)  # warm-up, full size (not counted)
    out: dict[str, list[float]] = {s: [] for s in SETTINGS}
    cpu = torch.device("cpu")
    try:
        for _ in range(pairs):
            for setting in SETTINGS:
                runtime.held_memory = held if setting == SETTINGS[0] else untrimmed
                f, t = faults(), time.perf_counter()
                gr.merge_models([a, b], x, num_examples=examples, batch_size=batch_size)
                merge, merge_faults = time.perf_counter() - t, faults() - f
                f, t = faults(), time.perf_counter()
                for m in (a, b, a):
                    plain_pass(m, x, batch_size, cpu)
                plain, plain_faults = time.perf_counter() - t, faults() - f
                out[setting].append(merge / plain)
                print(f"trim threshold {setting:20s} merge {merge:7.2f}s ({merge_faults / 1e6:.2f} M faults) | "
                      f"3 plain passes {plain:7.2f}s ({plain_faults / 1e6:.2f} M) | ratio {merge / plain:.2f} "
                      f"({load()})", flush=True)
    finally:
        runtime.held_memory = held
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--pairs", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    out = run(lambda: resnet20("bn", width=2), (3, 32, 32), args.examples, args.batch_size, args.pairs)
    for setting, ratios in out.items():
        print(f"BN ResNet20 width 2, trim threshold {setting}: merge / 3 plain passes "
              f"{min(ratios):.2f} - {max(ratios):.2f} over {len(ratios)} merges")


if __name__ == "__main__":
    main()
