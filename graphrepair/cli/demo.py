"""``graphrepair demo``: two small MLPs trained offline, merged naive / aligned / REPAIR."""

from __future__ import annotations


import click

from graphrepair.cli.common import Session, echo, echo_json, run
from graphrepair.cli.options import alpha_count


@click.command("demo")
@click.option("--out", "out_dir", default="graphrepair-demo", show_default=True, metavar="DIR",
              help="Directory for merged.onnx, barrier.png and layers.png (created if needed).")
@click.option("--pair", default="digits-mlp", show_default=True, metavar="NAME",
              help="Which pair of models to merge: digits-mlp (trained on the fly), or a checkpoint "
                   "pair of fixtures.pairs when its files are in fixtures/checkpoints/.")
@click.option("--alphas", type=int, default=11, show_default=True, help="Points on the path, ends included.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@run
def command(session: Session, out_dir, pair, alphas, as_json):
    """Train two small MLPs on offline digits, merge them naive / aligned / REPAIR, show the barriers."""
    from graphrepair.cli.inputs import check_files, pick_device
    from graphrepair.demo import OUTPUT_NAMES, available_pairs, make_out_dir, run_demo
    from graphrepair.errors import GraphRepairError

    alpha_count(alphas)
    pairs = available_pairs()
    if pair not in pairs:
        raise GraphRepairError(f"--pair {pair!r} is not a demo pair; choose one of {', '.join(pairs)}")
    out = make_out_dir(out_dir, "--out")
    check_files(session, {f"--out ({name})": out / name for name in OUTPUT_NAMES.values()}, {})
    result = run_demo(out, pair=pair, alphas=alphas, device=pick_device(session.device), quiet=session.quiet,
                      outputs=session.outputs)
    result.study.notes = list(dict.fromkeys(session.notes() + result.study.notes))
    if as_json:
        echo_json(result.as_dict())
    else:
        echo(result.text())
