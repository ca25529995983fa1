"""The table of issue 22 over the Hugging Face and diffusers families built offline
(``fixtures/hf_natural.py``: tiny configs, random weights, default configs, natural dict inputs).

For each family: discover (groups, free channels) / spec.check in float32 / merge of two random
inits with natural dict batches (``gr.merge``, ``repair`` as given) / the merged model's class /
save_pretrained -> from_pretrained round trip of the merge (max abs diff) / verified ONNX export of
the merge (of the original when the merge failed) / spec.check in bfloat16 and float16, and the
merge of the pair cast to that dtype (the class and dtype it comes back in) / free
channels against the hand count of ``fixtures.hf_natural.HAND`` (what it counts is written there),
and why they differ where they do (``WHY``). A cell holds "ok", a number, or the error's class and
first words.

    PYTHONPATH=. python scripts/hf_families.py [--families llama,bert] [--repair exact|none] [--no-onnx]
    PYTHONPATH=. python scripts/hf_families.py --discover-only   # the channel columns only
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
from fixtures.hf_natural import FAMILIES, TABLE, build  # noqa: E402

COLUMNS = ["family", "discover", "free", "hand count", "check fp32", "merge (dict batches)", "merged class",
           "save_pretrained", "ONNX", "bf16: check / merge", "fp16: check / merge", "free vs hand: why"]

# Where discovery and the hand count differ, and why (see the rules and the spec's fixed reasons).
WHY = {
    "bloom": "-16: q, k and v share one head-dim permutation (the fused (heads, 3, dim) view is one kron layout)",
    "falcon": "-16: the fused (heads + 2, dim) view shares one head-dim permutation between q/k (fixed by "
              "the rotary embedding) and v",
    "mixtral": "-392: one hidden permutation shared by the 4 experts (grouped_mm meets a row's expert only at "
               "run time: per-expert layouts have no static form) and the experts' order fixed (topk, sort "
               "and the offsets read it by position)",
    "wav2vec2": "-24: the stream moves as kron(4 groups, 8) = 12, not the wreath 4 + 32: the weight-normed "
                "positional conv's weight is read by its norm too, so its groups share one in-group permutation",
    "t5": "-4: the decoder's cross-attention heads of both layers share one zero position bias tensor: one "
          "head order",
}


def short(e: BaseException, n: int = 70) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:n]}"


def row(name: str, repair: str | None, onnx: bool, discover_only: bool = False) -> dict:
    out = {c: "" for c in COLUMNS}
    out["family"] = name
    fam = build(name, batch=2, seed=0)
    out["hand count"] = "" if fam.hand is None else str(fam.hand)
    try:
        spec = gr.discover(fam.model, fam.inputs)
        out["discover"] = f"{len(spec.groups)} groups" + (" (use_cache off)" if spec.notes else "")
        out["free"] = str(spec.num_free)
        if fam.hand is not None:
            out["free vs hand: why"] = "=" if spec.num_free == fam.hand else WHY.get(
                name, f"{spec.num_free - fam.hand:+d}: not explained yet")
    except Exception as e:  # noqa: BLE001 - a table of outcomes
        out["discover"] = short(e)
        return out
    if discover_only:
        return out
    try:
        out["check fp32"] = f"ok ({spec.check(fam.model, fam.inputs):.1e})"
    except Exception as e:  # noqa: BLE001
        out["check fp32"] = short(e)
    b = build(name, batch=2, seed=1).model
    batches = [build(name, batch=8, seed=10 + k).inputs for k in range(4)]
    for dtype, col in ((torch.bfloat16, "bf16: check / merge"), (torch.float16, "fp16: check / merge")):
        half_a = copy.deepcopy(fam.model).to(dtype)
        try:
            spec.check(half_a, fam.inputs)
            out[col] = "ok"
        except Exception as e:  # noqa: BLE001
            out[col] = short(e)
            continue
        try:  # the merge of the pair in that dtype: the user's class and dtype back
            # discovered on the half model itself, as a user merging half models would (a spec traced in
            # float32 carries float32 constants, e.g. a UNet's timestep embedding)
            m = gr.merge(half_a, copy.deepcopy(b).to(dtype), batches, repair=repair)
            dt = next(m.parameters()).dtype
            out[col] += f" / ok ({type(m).__name__}, {str(dt).replace('torch.', '')})"
        except Exception as e:  # noqa: BLE001
            out[col] += f" / {short(e)}"
    merged = None
    try:
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
    ap.add_argument("--families", default=",".join(TABLE),
                    help=f"default: the 35 of issue 22; any of {', '.join(FAMILIES)}")
    ap.add_argument("--repair", default="exact", choices=["exact", "approx", "reset", "none"])
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--discover-only", action="store_true", help="discovery and the channel columns only")
    args = ap.parse_args()
    repair = None if args.repair == "none" else args.repair
    warnings.simplefilter("ignore")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for name in args.families.split(","):
        r = row(name, repair, not args.no_onnx, args.discover_only)
        print("| " + " | ".join(r[c].replace("|", "/") for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
