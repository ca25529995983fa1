"""``graphrepair merge``: align B to A, interpolate, REPAIR and export the merged model."""

from __future__ import annotations

import contextlib

import click

from graphrepair.cli.common import Session, echo, echo_json, run
from graphrepair.cli.options import (model_option, pair_options, positive, repair_mode, sweeps,
                                     with_options)


@click.command("merge")
@model_option
@with_options(pair_options)
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Interpolation weight of B: the merge is (1 - alpha) A + alpha B'.")
@click.option("--repair", type=click.Choice(["exact", "approx", "reset", "none"]), default="exact",
              show_default=True, help="exact: reset statistics from a pass of the merged model; approx: "
                                      "closed form; reset: BatchNorm statistics; none: plain interpolation.")
@click.option("--output", "output", type=click.Choice(["class", "graph"]), default="class", show_default=True,
              help="What the merge is: class: the model's own class (save_pretrained, --weights), REPAIR limited "
                   "to the corrections its parameters hold (scale only where a layer has no bias, left out where "
                   "none can fold, e.g. on a residual stream); graph: every correction, in a torch.fx GraphModule "
                   "(ONNX only).")
@click.option("--refit", type=int, default=0, show_default=True, metavar="SWEEPS",
              help="Then refit every Linear, Conv and BatchNorm of the merge by least squares, layer by layer, "
                   "to the interpolation of the endpoints' outputs on the fitting data (1 is usually enough; "
                   "each sweep costs about one pass of A, B and the merge per layer, cut off after the layer).")
@click.option("--refit-examples", type=int, default=512, show_default=True, metavar="N",
              help="How many of the fitting examples (the first) the refit reads.")
@click.option("--out", default="merged.onnx", show_default=True, metavar="FILE",
              help="The merged model as ONNX, verified with onnxruntime.")
@click.option("--no-onnx", is_flag=True, help="Do not write the ONNX file.")
@click.option("--weights", default=None, metavar="FILE",
              help="Also the merged state dict as safetensors (the model's own class: not with --output graph "
                   "when a REPAIR correction does not fold).")
@click.option("--out-hf", "out_hf", default=None, metavar="DIR",
              help="Also the merged model with save_pretrained into DIR (a new or empty folder), for Hugging Face "
                   "and diffusers models whose merge keeps their class; from_pretrained is checked first.")
@click.option("--eval", "eval_ref", default=None, metavar="EVAL",
              help="Labeled data ('x' and 'y'): accuracy and loss of A, B and the merge.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@run
def command(session: Session, model_ref, ckpt_a, ckpt_b, fit_ref, method, num_examples, points, alpha, repair,
            output, refit, refit_examples, out, no_onnx, weights, out_hf, eval_ref, as_json):
    """Align B to A, interpolate, REPAIR and export the merged model."""
    from graphrepair.cli.inputs import check_files, model_file
    from graphrepair.errors import OutputError
    from graphrepair.merging.merge import check_alpha

    check_alpha(alpha, "--alpha")
    positive(num_examples, "--num-examples")
    sweeps(refit, "--refit")
    positive(refit_examples, "--refit-examples")
    if no_onnx and not weights and not out_hf:
        raise OutputError("--no-onnx without --weights would write nothing; give --weights FILE or drop --no-onnx")
    paths = check_files(session, {"--out": None if no_onnx else out, "--weights": weights},
                        {"--a": ckpt_a, "--b": ckpt_b, "--data": fit_ref, "--eval": eval_ref,
                         "--model": model_file(model_ref)})
    onnx_path, weights_path = paths["--out"], paths["--weights"]

    from graphrepair.cli.inputs import eval_data, fit_data, load_models, pick_device
    from graphrepair.merging.merge import merge_models
    from graphrepair.study.metrics import evaluate

    device = pick_device(session.device)
    mode = repair_mode(repair)
    statistics = method == "activation" or mode is not None or refit > 0
    model_a, model_b = load_models(model_ref, [("--a", ckpt_a), ("--b", ckpt_b)], device)
    if out_hf is not None:
        _check_out_hf(out_hf, model_a, model_ref)
    fit = fit_data(fit_ref, model_a, num_examples, device, needs_statistics=statistics)
    eval_set = eval_data(eval_ref, model_a, fit.example, device) if eval_ref else None
    res = merge_models([model_a, model_b], fit.data, weights=[1 - alpha, alpha], method=method, repair=mode,
                       num_examples=fit.examples, points=points, quiet=session.quiet, refit=refit,
                       refit_examples=refit_examples, name=model_ref, see=f"graphrepair inspect --model {model_ref}",
                       output=output)
    own_class = type(res.model) is type(model_a)
    if weights_path is not None and not own_class:
        raise OutputError(_unfoldable(weights_path, res, type(model_a).__name__, points))
    if out_hf is not None and not own_class:
        raise OutputError(_not_own_class(out_hf, res, type(model_a).__name__))
    scores = {}
    if eval_set is not None:
        for name, m in (("A", model_a), ("B", model_b), ("merged", res.model)):
            scores[name] = evaluate(m, eval_set, quiet=session.quiet)
    export = None
    from graphrepair.distributed import is_reporting
    from graphrepair.io.export import export_dict, export_onnx

    with contextlib.ExitStack() as stack:
        place_hf = None
        if out_hf is not None and is_reporting():  # proved by from_pretrained, placed after the files
            from graphrepair.io.zoo_refs import staged_pretrained
            place_hf = stack.enter_context(staged_pretrained(res.model, out_hf, fit.example))
        with session.outputs([onnx_path, weights_path]) as (tmp_onnx, tmp_weights):
            if tmp_onnx is not None:
                export = export_onnx(res.model, fit.example, tmp_onnx)
            if tmp_weights is not None:
                from graphrepair.io.fileio import save_safetensors
                save_safetensors(res.model.state_dict(), tmp_weights, metadata={
                    "graphrepair": "merge", "model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b),
                    "alpha": repr(alpha), "method": method, "repair": repair, "points": points,
                    "refit": str(refit)})
        if place_hf is not None:  # the files are in place: the folder joins them (one rename)
            from pathlib import Path

            place_hf()
            session.written.append(Path(out_hf))
    result = res.as_dict()
    warnings = result.pop("warnings")
    report = {
        "model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b), "alpha": alpha, **result, "points": points,
        "onnx": None if export is None else export_dict(export, onnx_path),
        "weights": None if weights_path is None else str(weights_path),
        "out_hf": out_hf,
        "eval": {k: {"accuracy": a, "loss": lo} for k, (a, lo) in scores.items()} or None,
        "warnings": warnings,
        "notes": list(dict.fromkeys(fit.notes + session.notes() + res.notes)),
    }
    if as_json:
        echo_json(report)
    else:
        echo(merge_text(report, eval_ref))


def _check_out_hf(out_hf: str, model, model_ref: str) -> None:
    """Before any work: --out-hf needs a model that saves with save_pretrained, and a new or empty
    folder that is not the hf:DIR it reads."""
    import os

    from graphrepair.errors import OutputError
    from graphrepair.io.zoo_refs import hf_dir

    if not callable(getattr(model, "save_pretrained", None)):
        raise OutputError(f"--out-hf {out_hf}: {type(model).__name__} (--model {model_ref}) has no save_pretrained "
                          f"(only Hugging Face transformers and diffusers models do); write --out (ONNX) or "
                          f"--weights (safetensors) instead")
    source = hf_dir(model_ref)
    if source is not None and os.path.abspath(source) == os.path.abspath(out_hf):
        raise OutputError(f"--out-hf {out_hf} is the folder --model reads; give a new folder")
    if os.path.exists(out_hf) and (not os.path.isdir(out_hf) or os.listdir(out_hf)):
        raise OutputError(f"--out-hf {out_hf}: exists and is not an empty folder; give a new folder")


def _not_own_class(out_hf: str, res, class_name: str) -> str:
    kept = "; ".join(res.kept[:2]) + (f"; ... and {len(res.kept) - 2} more" if len(res.kept) > 2 else "")
    return (f"--out-hf {out_hf}: the merged model came back as a {type(res.model).__name__}, not a {class_name} "
            f"({len(res.kept)} REPAIR corrections could not be folded into {class_name}'s own parameters"
            + (f": {kept}" if kept else "") + "), so it has no save_pretrained. Write it with --out (ONNX, "
            f"the corrections included), or for a {class_name} drop --output graph or use --repair reset or none "
            f"(then --out-hf and --weights work). Nothing was written")


def _unfoldable(weights_path, res, class_name: str, points: str) -> str:
    kept = "; ".join(res.kept[:3]) + (f"; ... and {len(res.kept) - 3} more" if len(res.kept) > 3 else "")
    remedy = ("use --points conv or --repair reset/none" if points != "conv" else
              "use --repair reset or none (with --points conv these resets still could not be folded)")
    return (f"--weights {weights_path}: {len(res.kept) or 'some'} of the {res.resets} REPAIR resets could "
            f"not be folded into the weights ({kept or 'resets left as separate affines'}), so the merged "
            f"model is not a {class_name} and has no state dict of that class; the ONNX file "
            f"(--out) is the deliverable. For a safetensors state dict drop --output graph, or {remedy}. "
            f"Nothing was written")


def merge_text(r: dict, eval_ref: str | None) -> str:
    from graphrepair.io.export import op_summary
    from graphrepair.study.tables import number, percent, plural, text_table, wrapped_table

    lines = [f"merged {r['model']}: A {r['a']}, B {r['b']}, alpha {r['alpha']:g}",
             f"spec: {plural(r['groups'], 'permutation group')}, "
             f"{plural(r['free_channels'], 'channel')} may move"]
    how = "activation matching" if r["method"] == "activation" else "weight matching"
    lines.append(f"alignment: {how}" + (f", statistics from {r['examples']} examples" if r["examples"] else ""))
    if r["mean_corr"]:
        rows = [[g, r["group_sizes"].get(g, ""), number(c, 3)] for g, c in r["mean_corr"].items()]
        lines.append("mean correlation of matched units per group:")
        lines.append(wrapped_table(["group", "size", "corr"], rows, indent="  "))
        s = r["mean_corr_summary"]
        lines.append(f"  min {s['min']:.3f}, mean {s['mean']:.3f}")
    if r["repair"] in ("exact", "approx"):
        lines.append(f"REPAIR ({r['repair']}, points {r['points']}): {r['resets']} resets, {r['folded']} "
                     f"folded into the weights, {len(r['kept'])} kept as per-channel affines")
        for k in r["kept"][:10]:
            lines.append(f"  kept {k}")
        if len(r["kept"]) > 10:
            lines.append(f"  ... and {len(r['kept']) - 10} more")
        if r["treated"]:
            lines.append(f"  {len(r['treated'])} resets could not fold as they were; the merge keeps its class "
                         f"(--output class; --output graph keeps them all):")
            for point, what in list(r["treated"].items())[:10]:
                lines.append(f"  {point}: {what}")
            if len(r["treated"]) > 10:
                lines.append(f"  ... and {len(r['treated']) - 10} more")
    elif r["repair"] == "reset":
        lines.append("repair: BatchNorm statistics re-estimated on the merged model")
    else:
        lines.append("repair: none (plain interpolation of the aligned models)")
    if r["refit"]:
        f = r["refit"]
        lines.append(f"refit: {f['layers']} layers refit by least squares ({plural(f['sweeps'], 'sweep')} on "
                     f"{f['examples']} examples), {len(f['kept'])} kept as they were")
    lines.append(f"dead channels: {r['dead_channels']}")
    if r["method"] == "activation" and r["examples"]:
        lines.append(f"units matched without activation signal: {r['unsignalled']} (placed by their weights: "
                     f"{r['unsignalled'] - r['arbitrary']}, arbitrary: {r['arbitrary']})")
    if r["eval"]:
        rows = [[k, percent(v["accuracy"]), number(v["loss"])] for k, v in r["eval"].items()]
        lines.append(f"evaluation on {eval_ref}:")
        lines.append(text_table(["model", "accuracy %", "loss"], rows, indent="  "))
    if r["onnx"]:
        o = r["onnx"]
        lines.append(f"wrote {o['path']}: {o['node_count']} nodes ({op_summary(o['op_counts'])}); max |diff| vs "
                     f"onnxruntime {o['max_abs_diff']:.2e} ({', '.join(o['providers'])})")
    if r["weights"]:
        lines.append(f"wrote {r['weights']}: state dict of {r['merged_class']}")
    if r.get("out_hf"):
        lines.append(f"wrote {r['out_hf']}: {r['merged_class']}.save_pretrained (from_pretrained gives the merge)")
    lines.extend(f"warning: {w}" for w in r["warnings"])
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
