"""The table of issue 22 over the Hugging Face and diffusers families built offline
(``fixtures/hf_natural.py``: tiny configs, random weights, default configs, natural dict inputs).

For each family: discover (groups, free channels) / spec.check in float32 / merge of two random
inits with natural dict batches (``gr.merge``, ``repair`` as given) / the merged model's class /
save_pretrained -> from_pretrained round trip of the merge (max abs diff) / verified ONNX export of
the merge (of the original when the merge failed) / spec.check in bfloat16 and float16 / free
channels. A cell holds "ok", a number, or the error's class and first words.

    PYTHONPATH=. python scripts/hf_families.py [--families llama,bert] [--repair exact|none] [--no-onnx]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphrepair as gr  # noqa: E402
from fixtures.hf_natural import FAMILIES, build  # noqa: E402

COLUMNS = ["family", "discover", "free", "check fp32", "merge (dict batches)", "merged class", "save_pretrained",
           "ONNX", "check bf16", "check fp16"]


def short(e: BaseException, n: int = 70) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:n]}"


def row(name: str, repair: str | None, onnx: bool) -> dict:
    out = {c: "" for c in COLUMNS}
    out["family"] = name
    fam = build(name, batch=2, seed=0)
    try:
        spec = gr.discover(fam.model, fam.inputs)
        out["discover"] = f"{len(spec.groups)} groups" + (" (use_cache off)" if spec.notes else "")
        out["free"] = str(spec.num_free)
    except Exception as e:  # noqa: BLE001 - a table of outcomes
        out["discover"] = short(e)
        return out
    try:
        out["check fp32"] = f"ok ({spec.check(fam.model, fam.inputs):.1e})"
    except Exception as e:  # noqa: BLE001
        out["check fp32"] = short(e)
    for dtype, col in ((torch.bfloat16, "check bf16"), (torch.float16, "check fp16")):
        try:
            spec.check(copy.deepcopy(fam.model).to(dtype), fam.inputs)
            out[col] = "ok"
        except Exception as e:  # noqa: BLE001
            out[col] = short(e)
    merged = None
    try:
        b = build(name, batch=2, seed=1).model
        batches = [build(name, batch=8, seed=10 + k).inputs for k in range(4)]
        merged = gr.merge(fam.model, b, batches, spec=spec, repair=repair)
        out["merge (dict batches)"] = "ok"
        out["merged class"] = type(merged).__name__
    except Exception as e:  # noqa: BLE001
        out["merge (dict batches)"] = short(e)
    if merged is not None and hasattr(merged, "save_pretrained"):
        from graphrepair.io.zoo_refs import save_pretrained_verified

        with tempfile.TemporaryDirectory() as d:
            try:
                diff = save_pretrained_verified(merged, os.path.join(d, "m"), fam.inputs)
                out["save_pretrained"] = f"ok ({diff:.1e})"
            except Exception as e:  # noqa: BLE001
                out["save_pretrained"] = short(e)
    elif merged is not None:
        out["save_pretrained"] = "n/a (GraphModule)"
    if onnx:
        with tempfile.TemporaryDirectory() as d:
            what = merged if merged is not None else fam.model
            try:
                gr.export_onnx(what, fam.inputs, os.path.join(d, "m.onnx"))
                out["ONNX"] = "ok" + ("" if merged is not None else " (unmerged)")
            except Exception as e:  # noqa: BLE001
                out["ONNX"] = short(e, 120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--repair", default="exact", choices=["exact", "approx", "reset", "none"])
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    repair = None if args.repair == "none" else args.repair
    warnings.simplefilter("ignore")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for name in args.families.split(","):
        r = row(name, repair, not args.no_onnx)
        print("| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
