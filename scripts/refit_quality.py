"""Exact REPAIR against REPAIR + the layerwise least-squares refit, over several fitting subsets.

    python -m scripts.refit_quality [--pairs mlp20n,mlp10n,mlp10,mlp20,resnet20] [--subsets 5]
                                    [--examples 2000] [--refit-examples 512] [--alphas 11]
                                    [--threads N] [--json FILE]

For each shipped pair (``fixtures.pairs``) and each of ``--subsets`` fitting subsets (``--examples``
training examples drawn at random, seeds 0, 1, ...): one alignment (``prepare``), then at every
alpha of the grid the merge with exact REPAIR and the same merge followed by one refit sweep
(``refit=1`` on the subset's first ``--refit-examples`` examples). Printed per pair, as mean and
standard deviation over the subsets:

    midpoint %       test accuracy at alpha 0.5 (the whole test split)
    barrier          the accuracy barrier over the alphas (REPAIR Eq. 1; the ends are A and B)
    time             alignment + merge at alpha 0.5, over the plain passes of A, B and the merged
                     model over the fitting subset (measured in the same run), and the refit's
                     total over exact REPAIR's total

Endpoint accuracies are printed once per pair. Wall time at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from benchmarks.bench_merge import plain_pass
from fixtures.pairs import PAIRS, load_pair
from graphrepair.merging.merge import merge_prepared, prepare
from graphrepair.study.metrics import alpha_grid, barrier_of, evaluate


def accuracy(model, test) -> float:
    return evaluate(model, test)[0]


def plain_passes(models, x, batch=256) -> float:
    t = time.perf_counter()
    for m in models:
        plain_pass(m, x, batch, x.device)
    return time.perf_counter() - t


def run_pair(name: str, args) -> dict:
    a, b = load_pair(name)
    pair = PAIRS[name]
    x_train, _ = pair.data("train")
    test = TensorDataset(*pair.data("test"))
    acc_a, acc_b = accuracy(a, test), accuracy(b, test)
    alphas = alpha_grid(args.alphas)
    rows = []
    for subset in range(args.subsets):
        g = torch.Generator().manual_seed(subset)
        fit = x_train[torch.randperm(len(x_train), generator=g)[:args.examples]]
        t = time.perf_counter()
        prep = prepare([a, b], fit, num_examples=args.examples)
        t_prep = time.perf_counter() - t
        row = {"subset": subset}
        for method, refit in (("exact", 0), ("refit", 1)):
            accs, t_mid = [], None
            for alpha in alphas[1:-1]:
                t = time.perf_counter()
                res = merge_prepared(prep, [1 - alpha, alpha], "exact", refit=refit,
                                     refit_examples=args.refit_examples)
                dt = time.perf_counter() - t
                accs.append(accuracy(res.model, test))
                if abs(alpha - 0.5) < 1e-9:
                    t_mid, mid, merged = dt, accs[-1], res.model
            row[method] = {"midpoint": mid, "barrier": barrier_of(alphas, [acc_a, *accs, acc_b], True),
                           "seconds": t_prep + t_mid}
        row["plain"] = plain_passes([a, b, merged], fit)
        rows.append(row)
        print(f"  {name} subset {subset}: exact {row['exact']['midpoint'] * 100:.2f}% "
              f"refit {row['refit']['midpoint'] * 100:.2f}% ({row['exact']['seconds']:.2f} s, "
              f"{row['refit']['seconds']:.2f} s)", flush=True)
    return {"pair": name, "A": acc_a, "B": acc_b, "rows": rows}


def mean_sd(values, scale=1.0, digits=2) -> str:
    """"mean ± standard deviation" of ``values`` times ``scale``."""
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"



def pair_parser(doc: str, pairs: str, subsets: int) -> argparse.ArgumentParser:
    """The options every pair measurement takes: --pairs, --subsets, --examples, --threads, --json."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--pairs", default=pairs)
    p.add_argument("--subsets", type=int, default=subsets)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p


def run_pairs(args, run_pair) -> list[dict]:
    """``run_pair(name, args)`` for every pair of ``args.pairs``, with ``args.threads`` set."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return [run_pair(name, args) for name in args.pairs.split(",")]


def finish(args, results: list[dict], start: float) -> None:
    """Print the wall time since ``start``; write ``results`` to ``--json`` if given."""
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def main() -> None:
    p = pair_parser(__doc__, "mlp20n,mlp10n,mlp10,mlp20,resnet20", 5)
    p.add_argument("--refit-examples", type=int, default=512)
    p.add_argument("--alphas", type=int, default=11)
    args = p.parse_args()
    start = time.perf_counter()
    results = run_pairs(args, run_pair)
    print(f"\n{args.subsets} fitting subsets of {args.examples} training examples; refit: 1 sweep on "
          f"{args.refit_examples} of them; {args.alphas} alphas; torch threads {torch.get_num_threads()}\n")
    print("| pair | A % | B % | midpoint % exact | midpoint % refit | gain | barrier exact | barrier refit "
          "| exact s / plain | refit s / plain | refit s / exact s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rows = r["rows"]
        ex = [x["exact"]["midpoint"] for x in rows]
        rf = [x["refit"]["midpoint"] for x in rows]
        print(f"| {r['pair']} | {r['A'] * 100:.2f} | {r['B'] * 100:.2f} | {mean_sd(ex, 100)} | {mean_sd(rf, 100)} "
              f"| {mean_sd([b - a for a, b in zip(ex, rf)], 100)} "
              f"| {mean_sd([x['exact']['barrier'] for x in rows], 100)} | {mean_sd([x['refit']['barrier'] for x in rows], 100)} "
              f"| {mean_sd([x['exact']['seconds'] / x['plain'] for x in rows])} "
              f"| {mean_sd([x['refit']['seconds'] / x['plain'] for x in rows])} "
              f"| {mean_sd([x['refit']['seconds'] / x['exact']['seconds'] for x in rows])} |")
    finish(args, results, start)


if __name__ == "__main__":
    main()
