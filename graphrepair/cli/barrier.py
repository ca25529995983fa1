"""``graphrepair barrier``: accuracy and loss along the path A -> B, naive, aligned and REPAIRed."""

from __future__ import annotations

from pathlib import Path

import click

from graphrepair.cli.common import Session, echo, echo_json, run
from graphrepair.cli.options import (alpha_count, model_option, pair_options, positive, repair_mode, sweeps,
                                     with_options)


@click.command("barrier")
@model_option
@with_options(pair_options)
@click.option("--eval", "eval_ref", required=True, metavar="EVAL",
              help="Labeled data ('x' and 'y') to measure accuracy and loss on.")
@click.option("--alphas", type=int, default=11, show_default=True, help="Points on the path, ends included.")
@click.option("--repair", type=click.Choice(["exact", "approx", "reset", "none"]), default="exact",
              show_default=True, help="The REPAIRed curve (none: naive and aligned only).")
@click.option("--refit", type=int, default=0, show_default=True, metavar="SWEEPS",
              help="Add the curve of the repair followed by the least-squares refit (see merge --refit).")
@click.option("--plot", "plot_path", default=None, metavar="F.png",
              help="Write accuracy and loss against alpha (with --layers also F_layers.png).")
@click.option("--layers", is_flag=True,
              help="Per-layer variance-collapse ratio and LLFC cosine at alpha 0.5.")
@click.option("--json", "as_json", is_flag=True, help="Print the curves as JSON.")
@run
def command(session: Session, model_ref, ckpt_a, ckpt_b, fit_ref, method, num_examples, points, eval_ref,
            alphas, repair, refit, plot_path, layers, as_json):
    """Accuracy and loss along the path A -> B: naive, aligned, aligned + REPAIR."""
    from graphrepair.cli.inputs import check_files, model_file, with_option
    from graphrepair.study.plots import check_plot_path, layers_path
    from graphrepair.errors import GraphRepairError

    alpha_count(alphas)
    positive(num_examples, "--num-examples")
    sweeps(refit, "--refit")
    outputs = {"--plot": None, "--plot (layers figure)": None}
    if plot_path:
        try:
            check_plot_path(plot_path)
        except GraphRepairError as e:
            raise with_option("--plot", plot_path, e) from e
        outputs["--plot"] = plot_path
        if layers:
            outputs["--plot (layers figure)"] = layers_path(plot_path)
    paths = check_files(session, outputs, {"--a": ckpt_a, "--b": ckpt_b, "--data": fit_ref, "--eval": eval_ref,
                                           "--model": model_file(model_ref)})
    plots = [p for p in paths.values() if p is not None]

    from graphrepair.cli.inputs import eval_data, fit_data, load_models, pick_device
    from graphrepair.study.metrics import alpha_grid
    from graphrepair.study.runner import run_study

    grid = alpha_grid(alphas)
    device = pick_device(session.device)
    mode = repair_mode(repair)
    model_a, model_b = load_models(model_ref, [("--a", ckpt_a), ("--b", ckpt_b)], device)
    fit = fit_data(fit_ref, model_a, num_examples, device, needs_statistics=True)
    eval_set = eval_data(eval_ref, model_a, fit.example, device)
    study = run_study(model_a, model_b, fit_data=fit.data, eval_data=eval_set, alphas=grid, method=method, repair=mode,
                      num_examples=fit.examples, points=points, layers=layers, quiet=session.quiet, refit=refit,
                      name=model_ref, see=f"graphrepair inspect --model {model_ref}")
    warnings = study.warnings
    if plots:
        from graphrepair.study.plots import barrier_figure, layers_figure, save_figure

        title = f"{model_ref}: {Path(ckpt_a).name} -> {Path(ckpt_b).name}"
        figs = [barrier_figure(study.curves, title)]
        if layers:
            figs.append(layers_figure(study.layers, study.layer_labels, study.layer_alpha, title))
        with session.outputs(plots) as tmps:
            for fig, tmp in zip(figs, tmps):
                save_figure(fig, tmp)
    study.notes = list(dict.fromkeys(fit.notes + session.notes() + study.notes))
    if as_json:
        echo_json({"model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b), "eval": eval_ref,
                   "points": points, **{k: v for k, v in study.as_dict().items() if k != "warnings"},
                   "plots": [str(p) for p in plots], "warnings": warnings})
        return
    echo(study.headline(model_ref))
    echo(f"accuracy (%) and loss on {eval_ref} over {len(grid)} alphas; barrier = largest drop "
         f"(accuracy, points) or rise (loss) against the straight line between A and B:")
    echo(study.curve_table())
    if study.layers:
        echo("")
        echo(f"per layer at alpha {study.layer_alpha:g} (variance ratio = Var(merged) / mean "
             f"Var(A, B'), 1 = no collapse; LLFC cosine 1 = linear feature connectivity):")
        echo(study.layer_table())
    for p in plots:
        echo(f"wrote {p}")
    for w in warnings:
        echo(f"warning: {w}")
    for n in study.notes:
        echo(f"note: {n}")
