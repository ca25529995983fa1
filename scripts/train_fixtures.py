"""Train the checkpoint pairs of ``fixtures.pairs`` and write them to ``fixtures/checkpoints/``.

    python -m scripts.train_fixtures [--pairs mlp10,mlp20,resnet20] [--device cpu|cuda|auto]
                                     [--out DIR] [--threads 1]

Each pair is two models from one factory, trained by ``fixtures.train.train_pair`` with the pair's
recipe (``PAIRS[name].recipe``): seeds 0 and 1 give different initialisations and data orders.
On CPU with the same torch build and thread count the weights are bit-for-bit reproducible.
Floating-point tensors are stored as float16 (half the size; the accuracies of the stored weights
are printed next to the float32 ones), with the recipe in the safetensors metadata (one JSON string under
``fixture``, so a retrain on the same torch build and thread count gives the same bytes). Files are
written atomically (``graphrepair.io.fileio.save_safetensors``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fixtures.pairs import PAIRS, Pair, load_pair
from fixtures.train import evaluate, train_pair
from graphrepair.errors import GraphRepairError
from graphrepair.io.fileio import save_safetensors
from graphrepair.runtime import pick_device

STORED_DTYPE = torch.float16


def stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(STORED_DTYPE) if v.is_floating_point() else v for k, v in state.items()}


def resolve_device(name: str) -> torch.device:
    """``runtime.pick_device``, its error as the script's one line."""
    try:
        return pick_device(name)
    except GraphRepairError as e:
        raise SystemExit(f"error: {e}") from None


def train_one(pair: Pair, out: Path | None, device: torch.device, threads: int | None,
              progress: bool = True, log=print) -> dict:
    """Train ``pair``, write its two checkpoints, and return a summary (accuracies, seconds, bytes)."""
    recipe = dict(pair.recipe)
    examples, seeds = recipe.pop("examples"), tuple(recipe.pop("seeds"))
    x, y = pair.train_data()
    x_test, y_test = pair.data("test")
    log(f"{pair.name}: {pair.factory_ref} on {examples} {pair.dataset_label} examples, seeds {seeds}, "
        f"{json.dumps(recipe)}, {device}")
    start = time.perf_counter()
    models = train_pair(pair.factory, (x, y), seeds=seeds, device=device, threads=threads,
                        progress=progress, **recipe)
    seconds = time.perf_counter() - start
    about = {"pair": pair.name, "factory": pair.factory_ref, "dataset": pair.dataset_label,
             "recipe": pair.recipe, "stored_dtype": str(STORED_DTYPE), "torch": torch.__version__,
             "device": str(device)}
    summary = {"pair": pair.name, "train_seconds": seconds, "float32": [], "bytes": 0}
    for model, path, seed in zip(models, pair.paths(out), seeds):
        summary["float32"].append(evaluate(model, x_test.to(device), y_test.to(device)))
        # One metadata key: safetensors writes several in random order, one keeps the bytes reproducible.
        save_safetensors(stored(model.state_dict()), path,
                         metadata={"fixture": json.dumps({**about, "seed": seed}, sort_keys=True)})
        summary["bytes"] += path.stat().st_size
    summary["stored"] = [evaluate(m, x_test, y_test) for m in load_pair(pair.name, out)]
    for tag, (acc32, loss32), (acc, loss), path in zip("AB", summary["float32"], summary["stored"],
                                                       pair.paths(out)):
        log(f"  {tag}: test accuracy {acc32:.4f} (stored float16: {acc:.4f}), loss {loss32:.4f} "
            f"({loss:.4f}) -> {path} ({path.stat().st_size / 1e6:.2f} MB)")
    log(f"  trained in {seconds:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.train_fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated names (default: all)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="directory (default fixtures/checkpoints)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads while training (default 1: fastest on a shared 2-core machine, "
                             "and part of what makes the weights reproducible)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; expected some of {', '.join(PAIRS)}")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    out = args.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    else:
        PAIRS[names[0]].paths()[0].parent.mkdir(parents=True, exist_ok=True)
    total, size = time.perf_counter(), 0
    for name in names:
        size += train_one(PAIRS[name], out, device, args.threads, progress=not args.quiet)["bytes"]
    print(f"done in {time.perf_counter() - total:.0f} s; {size / 1e6:.2f} MB written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
