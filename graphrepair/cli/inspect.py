"""``graphrepair inspect``: a model's permutation groups and the axes kept fixed, with reasons."""

from __future__ import annotations

import json

import click

from graphrepair.cli.common import Session, echo, run
from graphrepair.cli.inputs import check_files, example_input, load_models, model_file, pick_device, run_model
from graphrepair.cli.options import check_vocab, dtype_option, model_option, parse_shape, shape_option, vocab_option


@click.command("inspect")
@model_option
@click.option("--checkpoint", default=None, metavar="FILE", help=".safetensors or .pt/.pth state dict.")
@shape_option
@dtype_option
@vocab_option
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
@click.option("--dot", "dot_path", default=None, metavar="FILE",
              help="Write the traced graph, coloured by group, as Graphviz DOT.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Prove the spec: random permutations of every group must keep the outputs.")
@run
def command(session: Session, model_ref, checkpoint, input_shape, input_dtype, vocab, as_json, dot_path, check):
    """Show a model's permutation groups and the axes kept fixed, with reasons."""
    shape = parse_shape(input_shape)
    check_vocab(vocab)
    paths = check_files(session, {"--dot": dot_path},
                        {"--checkpoint": checkpoint, "--model": model_file(model_ref)})
    device = pick_device(session.device)

    from graphrepair.discovery.discover import discover
    from graphrepair.io.loading import load_factory
    from graphrepair.cli.inputs import with_option
    from graphrepair.cli.report import print_spec
    from graphrepair.errors import GraphRepairError, ShapeError

    if checkpoint is not None:
        (model,) = load_models(model_ref, [("--checkpoint", checkpoint)], device)
    else:
        try:
            model = load_factory(model_ref).eval().to(device)
        except GraphRepairError as e:
            raise with_option("--model", model_ref, e) from e
    x = example_input(shape, input_dtype, vocab, device)
    run_model(model, x, f"--input-shape {input_shape}: the model cannot run on a {input_dtype} input of shape "
                        f"{shape}", ShapeError)
    spec = discover(model, (x,))
    max_diff = spec.check(model, (x,)) if check else None
    if paths["--dot"] is not None:
        dot = spec.to_dot()
        with session.outputs([paths["--dot"]]) as (tmp,):
            tmp.write_text(dot)
    if as_json:
        data = spec.as_dict()
        data["check_max_abs_diff"] = max_diff
        echo(json.dumps(data, indent=2))
        return
    print_spec(spec)
    if max_diff is not None:
        echo(f"check: random permutations of all {len(spec.groups)} groups keep the outputs "
             f"(max abs diff {max_diff:.2e})")
    if paths["--dot"] is not None:
        echo(f"wrote {paths['--dot']}")
