"""Merge quality on the shipped checkpoint pairs: naive, aligned, reset and REPAIR at alpha = 0.5.

    python -m scripts.quality [--pairs mlp10,mlp20,resnet20] [--device auto|cpu|cuda] [--retrain]
                              [--num-examples 5000] [--alphas 11] [--threads N] [--json FILE]
                              [--checkpoints DIR]

For each pair of ``fixtures.pairs`` (two models of one architecture trained from different seeds):

* test accuracy and loss of A and B;
* at alpha = 0.5, with theta = 0.5 theta_A + 0.5 theta_B(') :
  naive (B as it is), aligned (B' = B aligned to A by activation matching), aligned + reset
  (BatchNorm running statistics re-estimated), aligned + REPAIR approx (closed form from the
  A-B statistics), aligned + REPAIR exact (statistics of the merged net, one pass);
* the barriers over ``--alphas`` evenly spaced alphas (REPAIR Eq. 1) of the aligned path and of the
  aligned + REPAIR exact path, for the accuracy (height of the error bump) and the loss, and the
  share of the aligned barrier that REPAIR removes:  cut = (B_aligned - B_repair) / B_aligned.

Fitting data (alignment and REPAIR statistics): the first ``--num-examples`` training examples.
Evaluation: the whole test split. The alignment is computed once per pair (``prepare`` with
statistics and cross-covariances) and reused for every mode and alpha. The endpoints of both
paths are models A and B (B' computes what B computes), so they are evaluated once.

Prints Markdown tables ready for the README, then the wall time. The numbers can move by about a
point with the CPU thread count (``--threads``) in mlp20's aligned and approx modes: rounding in the
correlations changes the matching of a few dozen of its 2,560 units (near ties, half of them dead
ReLUs, which correlate with nothing), and 20 unrepaired layers amplify it. ``--retrain`` first retrains the
pairs (``scripts.train_fixtures``, overwriting fixtures/checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import TensorDataset

from fixtures.pairs import PAIRS, load_pair
from scripts.train_fixtures import resolve_device
from graphrepair.merging.merge import merge_prepared, prepare
from graphrepair.study.metrics import Curve, alpha_grid, barrier_of, evaluate

MODES = ("naive", "aligned", "reset", "approx", "exact")
MODE_TITLES = {"naive": "naive", "aligned": "aligned", "reset": "aligned + reset",
               "approx": "aligned + REPAIR approx", "exact": "aligned + REPAIR exact"}
_REPAIR = {"aligned": None, "reset": "reset", "approx": "approx", "exact": "exact"}


@dataclass
class PairQuality:
    pair: str
    device: str
    fit_examples: int
    eval_examples: int
    endpoints: dict[str, tuple[float, float]]  # "A"/"B" -> (accuracy, loss)
    midpoint: dict[str, tuple[float, float]]  # mode -> (accuracy, loss) at alpha 0.5
    curves: dict[str, dict] = field(default_factory=dict)  # "aligned"/"exact" -> Curve.as_dict()
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def barrier_at_half(self, mode: str, which: str = "accuracy") -> float:
        """Eq. (1) at alpha = 0.5 alone: the drop below (or rise above) the endpoints' mean."""
        k = 0 if which == "accuracy" else 1
        line = (self.endpoints["A"][k] + self.endpoints["B"][k]) / 2
        value = self.midpoint[mode][k]
        return line - value if which == "accuracy" else value - line

    def barrier(self, mode: str, which: str = "accuracy") -> float:
        """Eq. (1) over the alpha grid (the curve of ``mode``); at alpha 0.5 alone without curves."""
        if mode not in self.curves:
            return max(0.0, self.barrier_at_half(mode, which))
        c = self.curves[mode]
        return barrier_of(c["alphas"], c[which], higher_is_better=which == "accuracy")

    def cut(self, which: str = "accuracy", at_half: bool = False) -> float:
        """Share of the aligned barrier that REPAIR exact removes (1 = all of it)."""
        if at_half:
            before, after = self.barrier_at_half("aligned", which), self.barrier_at_half("exact", which)
        else:
            before, after = self.barrier("aligned", which), self.barrier("exact", which)
        return (before - after) / before if before > 0 else float("nan")




def measure_pair(name: str, device: torch.device | str = "cpu", num_examples: int = 5000,
                 alphas: int | None = 11, modes=MODES, checkpoints=None, log=None) -> PairQuality:
    """Everything in the module docstring for pair ``name``. ``alphas=None`` skips the curves
    (only alpha 0.5); ``modes`` may leave out some of MODES."""
    device = torch.device(device)
    say = log or (lambda *_: None)
    pair = PAIRS[name]
    start = time.perf_counter()
    model_a, model_b = (m.to(device) for m in load_pair(name, checkpoints))
    x, y = pair.data("train")
    fit = TensorDataset(x[:num_examples].to(device), y[:num_examples].to(device))
    x_test, y_test = pair.data("test")
    test = TensorDataset(x_test.to(device), y_test.to(device))
    seconds = {}

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
        return out

    endpoints = {"A": timed("evaluate", lambda: evaluate(model_a, test)),
                 "B": timed("evaluate", lambda: evaluate(model_b, test))}
    say(f"{name}: A {endpoints['A'][0]:.4f}, B {endpoints['B'][0]:.4f}")
    prep = timed("prepare", lambda: prepare([model_a, model_b], fit, method="activation", statistics=True,
                                             cross=True, num_examples=num_examples))
    notes: dict[str, set[str]] = {}  # note -> the modes that gave it
    fit_count = prep.stats[0].examples if prep.stats[0] is not None else num_examples

    naive = []  # the unaligned Prepared, made when first needed

    def merged(mode: str, a: float):
        if mode == "naive":
            if not naive:
                naive.append(timed("prepare", lambda: prepare([model_a, model_b], fit, statistics=False,
                                                               align=False, num_examples=num_examples)))
            res = timed("merge", lambda: merge_prepared(naive[0], [1 - a, a], None))
        else:
            res = timed("merge", lambda: merge_prepared(prep, [1 - a, a], _REPAIR[mode]))
        for n in res.notes:
            notes.setdefault(n, set()).add(mode)
        return res.model

    midpoint = {}
    for mode in modes:
        model = merged(mode, 0.5)
        midpoint[mode] = timed("evaluate", lambda: evaluate(model, test))
        say(f"  alpha 0.5 {MODE_TITLES[mode]}: accuracy {midpoint[mode][0]:.4f}, loss {midpoint[mode][1]:.4f}")
    result = PairQuality(name, str(device), fit_count, len(y_test), endpoints, midpoint, notes=[])
    if alphas is not None:
        grid = alpha_grid(alphas)
        for mode in ("aligned", "exact"):
            acc, loss = [], []
            for a in grid:
                if a == 0.0:
                    value = endpoints["A"]
                elif a == 1.0:
                    value = endpoints["B"]
                elif abs(a - 0.5) < 1e-12 and mode in midpoint:
                    value = midpoint[mode]
                else:
                    model = merged(mode, a)
                    value = timed("evaluate", lambda: evaluate(model, test))
                acc.append(value[0])
                loss.append(value[1])
            result.curves[mode] = Curve(MODE_TITLES[mode], grid, acc, loss).as_dict()
            say(f"  {MODE_TITLES[mode]}: accuracy barrier {result.barrier(mode):.4f}, "
                f"loss barrier {result.barrier(mode, 'loss'):.4f}")
    result.notes = sorted(n if len(m) > 1 else f"{MODE_TITLES[m.pop()]}: {n}" for n, m in notes.items())
    seconds["total"] = time.perf_counter() - start
    result.seconds = seconds
    return result


def _cell(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.1f}% ({value[1]:.3f})"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def markdown(results: list[PairQuality], alphas: int | None) -> str:
    head = ["pair", "model A", "model B"] + [MODE_TITLES[m] for m in MODES]
    lines = ["Test accuracy (and loss) at alpha = 0.5:", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results:
        cells = [r.pair, _cell(r.endpoints["A"]), _cell(r.endpoints["B"])]
        cells += [_cell(r.midpoint[m]) if m in r.midpoint else "" for m in MODES]
        lines.append("| " + " | ".join(cells) + " |")
    span = f"over {alphas} alphas" if alphas else "at alpha 0.5"
    lines += ["", f"Barriers {span} (accuracy: percentage points of error; loss: nats), and the share "
                  "of the aligned barrier that REPAIR exact removes:", "",
              "| pair | accuracy barrier, aligned | with REPAIR exact | cut | loss barrier, aligned "
              "| with REPAIR exact | cut |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r.pair} | {100 * r.barrier('aligned'):.1f} | {100 * r.barrier('exact'):.1f} | "
            f"{_pct(r.cut('accuracy'))} | {r.barrier('aligned', 'loss'):.3f} | "
            f"{r.barrier('exact', 'loss'):.3f} | {_pct(r.cut('loss'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated names (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--retrain", action="store_true", help="retrain the pairs first (overwrites checkpoints)")
    parser.add_argument("--num-examples", type=int, default=5000, help="fitting examples (default 5000)")
    parser.add_argument("--alphas", type=int, default=11, help="points on each barrier curve (default 11)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--checkpoints", default=None, help="directory of the checkpoints (default fixtures/checkpoints)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; expected some of {', '.join(PAIRS)}")
    if args.num_examples < 1 or args.alphas < 3:
        parser.error("--num-examples must be positive and --alphas at least 3 (0, 0.5 and 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    def log(msg):
        print(msg, file=sys.stderr)

    start = time.perf_counter()
    if args.retrain:
        from scripts.train_fixtures import train_one
        for name in names:
            train_one(PAIRS[name], args.checkpoints, device, threads=args.threads or 1, log=log)
    results = [measure_pair(n, device, args.num_examples, args.alphas, checkpoints=args.checkpoints,
                            log=log) for n in names]
    wall = time.perf_counter() - start
    print(markdown(results, args.alphas))
    print()
    datasets = sorted({PAIRS[r.pair].dataset_label for r in results})
    print(f"Fit: the first {args.num_examples} training examples of {', '.join(datasets)}; evaluation: "
          f"the test split ({', '.join(f'{r.eval_examples}' for r in results)} examples); device {device}, "
          f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.")
    for r in results:
        for note in r.notes:
            print(f"Note ({r.pair}): {note}")
    per_pair = ", ".join(f"{r.pair} {r.seconds['total']:.0f} s" for r in results)
    print(f"Wall time: {wall:.0f} s ({per_pair}).")
    if args.json:
        from graphrepair.io.fileio import atomic_write
        payload = {"command": " ".join(["python -m scripts.quality"] + (argv if argv is not None else sys.argv[1:])),
                   "wall_seconds": wall, "pairs": [asdict(r) | {"cut": {"accuracy": r.cut("accuracy"),
                                                                         "loss": r.cut("loss")}}
                                                   for r in results]}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
