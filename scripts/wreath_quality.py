"""What moving whole groups of channels is worth: alignment with a grouped conv's groups and a
GroupNorm's groups moving as wholes (``axes.Wreath``) against the same alignment with every group
kept in its place (what graphrepair did before: each group permuted inside only).

    python -m scripts.wreath_quality [--pairs gncnn,resnext23,resnext] [--subsets 3] [--examples 2000]
                                     [--threads N] [--json FILE]

For each shipped pair (``fixtures.pairs``) and each of ``--subsets`` fitting subsets (``--examples``
training examples drawn at random, seeds 0, 1, ...), activation matching twice on the same
statistics pass settings: "moved" (the discovered spec) and "kept" (the same spec with every order
group held at the identity, ``kept_in_place``). Printed per pair, as mean and standard deviation
over the subsets:

    corr            the mean A-B correlation of the paired channels at the grouped layers (every
                    joint point whose layout is a Wreath: a grouped conv's input and output, a
                    GroupNorm's stream), under the permutations found
    midpoint %      test accuracy at alpha 0.5, plain interpolation and exact REPAIR
    prepare s       the alignment (statistics pass + assignments), moved and kept

Endpoint accuracies are printed once per pair. Wall time at the end.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.utils.data import TensorDataset

from fixtures.pairs import PAIRS, load_pair
from graphrepair.discovery import axes as ax
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.merging.merge import merge_prepared, prepare
from graphrepair.study.metrics import evaluate
from scripts.refit_quality import finish, mean_sd, pair_parser, run_pairs
import graphrepair as gr


def kept_in_place(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` with every Wreath family's order held at the identity in alignment (its parts then
    aligned as ordinary groups): the alignment graphrepair made before whole groups could move."""
    families, held = spec.wreaths
    kept = dataclasses.replace(spec)
    kept.__dict__["wreaths"] = ({}, frozenset(held) | frozenset(families))  # the cached property's slot
    return kept


def grouped_corr(prep) -> float:
    """Mean correlation of the paired positions over the joint points laid out as a Wreath."""
    stats, spec = prep.stats[0], prep.spec
    vp = spec.checked(prep.perms[0]).var_perms
    values = [jp.corr[torch.arange(jp.corr.shape[0]), ax.index(jp.expr, vp).to(jp.corr.device)].mean()
              for jp in stats.joint.values() if isinstance(jp.expr, ax.Wreath)]
    return float(torch.stack(values).mean())


def run_pair(name: str, args) -> dict:
    a, b = load_pair(name)
    pair = PAIRS[name]
    x_train, _ = pair.data("train")
    test = TensorDataset(*pair.data("test"))
    acc_a, acc_b = evaluate(a, test)[0], evaluate(b, test)[0]
    spec = gr.discover(a, (x_train[:2],))
    families, held = spec.wreaths
    print(f"{name}: {len(spec.groups)} groups, {spec.num_free} free channels, {len(families)} families of "
          f"whole groups ({sum(spec.group(o).size for o in families)} slots), {len(held)} kept in place",
          flush=True)
    rows = []
    for subset in range(args.subsets):
        g = torch.Generator().manual_seed(subset)
        fit = x_train[torch.randperm(len(x_train), generator=g)[:args.examples]]
        row = {"subset": subset}
        for how, s in (("moved", spec), ("kept", kept_in_place(spec))):
            t = time.perf_counter()
            prep = prepare([a, b], fit, num_examples=args.examples, spec=s)
            seconds = time.perf_counter() - t
            row[how] = {"corr": grouped_corr(prep), "seconds": seconds,
                        "plain": evaluate(merge_prepared(prep, [0.5, 0.5], None).model, test)[0],
                        "exact": evaluate(merge_prepared(prep, [0.5, 0.5], "exact").model, test)[0]}
        rows.append(row)
        print(f"  {name} subset {subset}: " + "; ".join(
            f"{how} corr {row[how]['corr']:.4f} plain {row[how]['plain'] * 100:.2f}% "
            f"exact {row[how]['exact'] * 100:.2f}% ({row[how]['seconds']:.2f} s)" for how in ("moved", "kept")),
            flush=True)
    return {"pair": name, "A": acc_a, "B": acc_b, "rows": rows}


def main() -> None:
    args = pair_parser(__doc__, "gncnn,resnext23,resnext", 3).parse_args()
    start = time.perf_counter()
    results = run_pairs(args, run_pair)
    print(f"\n{args.subsets} fitting subsets of {args.examples} training examples; torch threads "
          f"{torch.get_num_threads()}\n")
    print("| pair | A % | B % | groups | corr moved | corr kept | plain % moved | plain % kept "
          "| exact % moved | exact % kept | prepare s moved | prepare s kept |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rows = r["rows"]
        col = lambda how, key, scale=1.0, digits=2: mean_sd([x[how][key] for x in rows], scale, digits)  # noqa: E731
        print(f"| {r['pair']} | {r['A'] * 100:.2f} | {r['B'] * 100:.2f} | moved / kept "
              f"| {col('moved', 'corr', digits=4)} | {col('kept', 'corr', digits=4)} "
              f"| {col('moved', 'plain', 100)} | {col('kept', 'plain', 100)} "
              f"| {col('moved', 'exact', 100)} | {col('kept', 'exact', 100)} "
              f"| {col('moved', 'seconds')} | {col('kept', 'seconds')} |")
    finish(args, results, start)


if __name__ == "__main__":
    main()
