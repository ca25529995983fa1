"""``graphrepair export``: a model to ONNX, verified with onnxruntime before the file is kept."""

from __future__ import annotations

import click

from graphrepair.cli.common import Session, echo, echo_json, run
from graphrepair.cli.options import check_vocab, dtype_option, model_option, parse_shape, shape_option, vocab_option


@click.command("export")
@model_option
@click.option("--checkpoint", required=True, metavar="FILE", help=".safetensors or .pt/.pth state dict.")
@shape_option
@dtype_option
@vocab_option
@click.option("--out", required=True, metavar="FILE", help="The ONNX file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@run
def command(session: Session, model_ref, checkpoint, input_shape, input_dtype, vocab, out, as_json):
    """Export a model to ONNX, verified with onnxruntime against torch before the file is kept."""
    from graphrepair.cli.inputs import check_files, model_file

    shape = parse_shape(input_shape)
    check_vocab(vocab)
    path = check_files(session, {"--out": out}, {"--checkpoint": checkpoint, "--model": model_file(model_ref)})["--out"]

    from graphrepair.cli.inputs import example_input, load_models, pick_device, run_model
    from graphrepair.errors import ShapeError
    from graphrepair.io.export import export_dict, export_onnx, op_summary

    device = pick_device(session.device)
    (model,) = load_models(model_ref, [("--checkpoint", checkpoint)], device)
    x = example_input(shape, input_dtype, vocab, device)
    run_model(model, x, f"--input-shape {input_shape}: the model cannot run on a {input_dtype} input of shape "
                        f"{shape}", ShapeError)
    other = example_input((2 * shape[0] + 1,) + shape[1:], input_dtype, vocab, device)
    run_model(model, other, f"--input-shape {input_shape}: the model runs on a batch of {shape[0]} but not on one "
                            f"of {other.shape[0]} (it seems to fix its batch size; the ONNX file has a dynamic "
                            f"batch axis)", ShapeError)
    with session.outputs([path]) as (tmp,):
        rep = export_onnx(model, (x,), tmp)
    data = export_dict(rep, path)
    if as_json:
        echo_json(data)
        return
    echo(f"wrote {path}: {rep.node_count} nodes ({op_summary(rep.op_counts)})")
    echo(f"verified with onnxruntime ({', '.join(rep.providers_checked)}): max |diff| vs torch "
         f"{rep.max_abs_diff:.2e}")
