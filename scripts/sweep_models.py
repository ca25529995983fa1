"""Sweep public architectures: discovery, the check, and (``--merge``) a merge and ONNX export.

    python -m scripts.sweep_models                     # every torchvision classification model
    python -m scripts.sweep_models --set public --merge  # the representative set, timm, HF, diffusers
    python -m scripts.sweep_models --only resnet18 swin_t --merge --json out.json

Each model runs in its own process (a crash or a hang costs one row, bounded by ``--timeout``),
with random weights from ``fixtures.public``. Columns: discovery seconds, groups, free channels,
the check (largest output change under random permutations of every group, on a perturbed copy),
merge seconds (two random initialisations, 16 examples, exact REPAIR), the merge's peak memory
(resident set growth from before the two models were built) over the weights of A, B and the
merged model, and whether the merged ONNX verified with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
import warnings


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(name: str, merge: bool, out) -> None:
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
    import graphrepair as gr
    from fixtures.public import PUBLIC, perturb, torchvision_entry

    entry = PUBLIC.get(name) or torchvision_entry(name)
    row = {"model": name, "package": entry.package}
    try:
        model = perturb(entry.model(0))
        x = entry.example(2)
        args = x if isinstance(x, tuple) else (x,)
        t = time.perf_counter()
        spec = gr.discover(model, args)
        row.update(discover_s=round(time.perf_counter() - t, 2), groups=len(spec.groups),
                   free_channels=spec.num_free)
        try:
            row["check"] = f"ok ({spec.check(model, args):.1e})"
        except gr.GraphRepairError as e:
            row["check"] = "FAIL: " + str(e).splitlines()[0][:200]
        del model
        if merge:
            base = _rss()
            a, b = entry.model(0), entry.model(1)
            weights = sum(t.numel() * t.element_size() for t in a.state_dict().values())
            t = time.perf_counter()
            merged = gr.merge(a, b, entry.data(16), num_examples=16, batch_size=8, repair="exact")
            row["merge_s"] = round(time.perf_counter() - t, 2)
            row["peak_over_weights"] = round((_peak() - base) / (3 * weights), 2)
            with tempfile.TemporaryDirectory() as d:
                one = tuple(t[:1] for t in args)
                try:
                    report = gr.export_onnx(merged, one, os.path.join(d, "m.onnx"))
                    row["onnx"] = f"verified ({report.max_abs_diff:.1e})"
                except gr.GraphRepairError as e:
                    row["onnx"] = "no: " + str(e).splitlines()[0][:160]
                    try:  # whether the exporter can export the original model at all
                        gr.export_onnx(a, one, os.path.join(d, "a.onnx"))
                    except gr.GraphRepairError:
                        row["onnx"] = "n/a: the original model does not export either (" + row["onnx"][4:] + ")"
    except Exception as e:  # noqa: BLE001 - a sweep records every failure as a row
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    out.put(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=["torchvision", "public"], default="torchvision")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fixtures.public import PUBLIC, torchvision_models

    names = args.only or (torchvision_models() if args.set == "torchvision" else list(PUBLIC))
    ctx = mp.get_context("spawn")
    rows = []
    cols = ["model", "discover_s", "groups", "free_channels", "check", "merge_s", "peak_over_weights", "onnx"]
    print(" | ".join(cols))
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=run_one, args=(name, args.merge, q))
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            row = {"model": name, "error": f"timeout after {args.timeout:.0f} s"}
        else:
            row = q.get() if not q.empty() else {"model": name, "error": f"exit {p.exitcode}"}
        rows.append(row)
        print(" | ".join(str(row.get(c, "")) for c in cols) + (f" | {row['error']}" if "error" in row else ""),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
