"""The ``graphrepair`` command line: inspect, merge, barrier, export, demo.

Every command turns a GraphRepairError (bad input: a file, a shape, a model reference) into one
line on stderr and exit status 2; ``--debug`` shows the traceback instead. Inputs are checked
before any long computation (output paths writable, alpha in [0, 1], the data's first batch run
through the model), and output files are written atomically and all together (``outputs.py``), so
a failed command leaves no partial file. Progress bars (stderr) cover every pass over data;
``--quiet`` turns them off. Models and in-memory data go to ``--device`` once, up front.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import torch

from graphrepair import distributed
from graphrepair.errors import DataError, GraphRepairError, OutputError, ShapeError
from graphrepair.runtime import pick_device

EXIT_BAD_INPUT = 2


class _State:
    debug = False
    quiet = False
    device = "auto"


STATE = _State()


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    if distributed.is_reporting():  # under torchrun: one line, from rank 0
        click.echo(f"graphrepair: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Bad input -> one line and exit 2; unexpected errors -> one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with distributed.step("the command"):  # a failure on any rank ends every rank
                return fn(*args, **kwargs)
        except GraphRepairError as e:
            if STATE.debug:
                raise
            _fail(" ".join(str(e).split()))
        except BrokenPipeError:  # output piped into head & co.
            sys.stderr.close()
            sys.exit(0)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug, not bad input: still one line unless --debug
            if STATE.debug:
                raise
            first = " ".join(str(e).split())[:500]
            _fail(f"internal error ({type(e).__name__}: {first}); rerun with --debug for the "
                  f"traceback and please report it", 1)

    return wrapper


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise GraphRepairError(f"--input-shape {text!r} is not a comma-separated list of integers "
                               f"(e.g. 1,3,32,32)") from None
    if not shape or any(s <= 0 for s in shape):
        raise GraphRepairError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,32,32)")
    return shape


def example_input(shape: tuple[int, ...], dtype: str, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == "long":
        return torch.randint(0, vocab, shape, generator=gen)
    return torch.randn(shape, generator=gen)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bars (they are shown only when stderr is a terminal anyway).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where models run.")
@click.version_option(package_name="graphrepair")
def main(debug: bool, quiet: bool, device: str) -> None:
    """Discover permutation symmetries of PyTorch models, merge models with REPAIR, export ONNX."""
    # Progress bars only on a terminal: piped or captured stderr keeps just the messages.
    STATE.debug, STATE.quiet, STATE.device = debug, quiet or not _is_terminal(sys.stderr), device
    try:
        distributed.launch(device)  # under torchrun: join the run; ranks but 0 print nothing
    except GraphRepairError as e:
        _fail(" ".join(str(e).split()))


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_model_option = click.option("--model", "model_ref", required=True, metavar="MODULE:FACTORY",
                             help="Zero-argument callable returning the nn.Module "
                                  "(e.g. fixtures.zoo:resnet20_bn).")
_shape_option = click.option("--input-shape", required=True, metavar="N,C,H,W",
                             help="Example input shape, batch first (e.g. 1,3,32,32).")
_dtype_option = click.option("--input-dtype", type=click.Choice(["float", "long"]), default="float",
                             show_default=True, help="long for token ids.")
_vocab_option = click.option("--vocab", type=int, default=2, show_default=True,
                             help="Token ids are drawn from [0, vocab) for --input-dtype long.")


@main.command()
@_model_option
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help=".safetensors or .pt/.pth state dict.")
@_shape_option
@_dtype_option
@_vocab_option
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
@click.option("--dot", "dot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the traced graph, coloured by group, as Graphviz DOT.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Prove the spec: random permutations of every group must keep the outputs.")
@handle_errors
def inspect(model_ref, checkpoint, input_shape, input_dtype, vocab, as_json, dot_path, check):
    """Show a model's permutation groups and the axes kept fixed, with reasons."""
    from graphrepair.discovery.discover import discover
    from graphrepair.io.fileio import atomic_write
    from graphrepair.io.loading import load_model
    from graphrepair.cli.report import print_spec, spec_to_dict, spec_to_dot

    model = load_model(model_ref, checkpoint)
    x = example_input(parse_shape(input_shape), input_dtype, vocab)
    spec = discover(model, (x,))
    max_diff = spec.check(model, (x,)) if check else None
    if dot_path:
        dot = spec_to_dot(spec)
        atomic_write(dot_path, lambda p: p.write_text(dot))
    if as_json:
        data = spec_to_dict(spec)
        data["check_max_abs_diff"] = max_diff
        click.echo(json.dumps(data, indent=2))
        return
    print_spec(spec)
    if max_diff is not None:
        click.echo(f"check: random permutations of all {len(spec.groups)} groups keep the outputs "
                   f"(max abs diff {max_diff:.2e})")
    if dot_path:
        click.echo(f"wrote {dot_path}")


# ------------------------------------------------------------------------------------------------
# Shared by merge, barrier, export and demo


def _one_line(text, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def _warnings_as_notes(notes: list[str]) -> Iterator[None]:
    """graphrepair's own warnings (fewer examples than asked for) become report notes, once each;
    library warnings are shown only with --debug."""
    if STATE.debug:
        yield
        return
    from graphrepair.io.data import FewerExamplesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        message = _one_line(w.message)
        if issubclass(w.category, FewerExamplesWarning) and message not in notes:
            notes.append(message)


def _with_option(option: str, ref: str, error: GraphRepairError) -> GraphRepairError:
    """The same error, its message led by the option (and the reference if the message lacks it)."""
    text = _one_line(error)
    lead = f"{option}: " if str(ref) in text else f"{option} {ref}: "
    return type(error)(lead + text)


def _load(ref: str, option: str):
    from graphrepair.io.data import load_data

    try:
        return load_data(ref)
    except GraphRepairError as e:
        raise _with_option(option, ref, e) from e


def _logits(out):
    logits = out["logits"] if isinstance(out, dict) or hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits


def _run_probe(model: torch.nn.Module, x: torch.Tensor, option: str, ref: str):
    """Run ``model`` on a couple of examples; a failure is bad data, said in one line."""
    try:
        with torch.no_grad():
            return model(x)
    except GraphRepairError:
        raise
    except Exception as e:
        raise DataError(f"{option} {ref}: the model cannot run on its examples of shape "
                        f"{tuple(x.shape[1:])} ({str(x.dtype).replace('torch.', '')}): "
                        f"{_one_line(e, 200)}; give data shaped like the model's input") from e


def _to_device(data, device: torch.device, limit: int | None = None):
    """In-memory data moves to the device once (at most ``limit`` examples); other data is moved
    batch by batch by the passes."""
    from graphrepair.io.data import ArrayDataset

    if isinstance(data, ArrayDataset):
        x = data.x if limit is None else data.x[:limit]
        y = None if data.y is None else (data.y if limit is None else data.y[:limit])
        return ArrayDataset(x.to(device), None if y is None else y.to(device), source=data.source)
    if isinstance(data, torch.Tensor):
        return (data if limit is None else data[:limit]).to(device)
    return data


def _fit_data(ref: str, model: torch.nn.Module, num_examples: int, device: torch.device,
              notes: list[str]) -> tuple[object, int, torch.Tensor]:
    """(data, examples to use, two example inputs on ``device``) for --data, checked on the model."""
    from graphrepair.io.data import iter_batches, take_examples
    from graphrepair.study.runner import known_length

    data = _load(ref, "--data")
    if isinstance(data, Iterator):  # one-shot: keep the examples the passes will need
        data = list(take_examples(data, num_examples, 256))
    n = known_length(data)
    if n is not None and n < num_examples:
        notes.append(f"--data {ref} has {n} examples; all of them are used (--num-examples {num_examples})")
        num_examples = n
    try:
        x = next(iter_batches(data, 2))[:2].to(device)
    except GraphRepairError as e:
        raise _with_option("--data", ref, e) from e
    _run_probe(model, x, "--data", ref)
    data, num_examples = distributed.shard(data, num_examples, 256)  # this rank's batches
    return _to_device(data, device, num_examples), num_examples, x


def _eval_data(ref: str, model: torch.nn.Module, example: torch.Tensor, device: torch.device):
    """--eval data with labels that fit the model: same example shape as --data, integer class
    indices within the model's number of outputs."""
    from graphrepair.io.data import ArrayDataset, check_batch_shape, iter_labeled

    data = _load(ref, "--eval")
    if isinstance(data, Iterator):  # evaluated once per model and alpha: keep it
        data = list(data)
    if isinstance(data, ArrayDataset) and data.y is None:
        raise DataError(f"--eval {ref} has no labels: evaluation needs a 'y' array of class indices "
                        f"next to 'x' (e.g. numpy.savez(path, x=inputs, y=labels))")
    try:
        x, y = next(iter_labeled(data, 64))
    except GraphRepairError as e:
        raise _with_option("--eval", ref, e) from e
    if x.is_floating_point():
        check_batch_shape(x, tuple(example.shape[1:]), f"--eval {ref}")
    else:
        check_batch_shape(x, (None,) * (example.dim() - 1), f"--eval {ref}")
    logits = _logits(_run_probe(model, x[:2].to(device), "--eval", ref))
    classes = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else None
    labels = data.y if isinstance(data, ArrayDataset) else y
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"--eval {ref}: labels 'y' have dtype {str(labels.dtype).replace('torch.', '')}; "
                        f"give integer class indices")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (classes is not None and hi >= classes):
        raise DataError(f"--eval {ref}: labels range over [{lo}, {hi}] but the model has {classes} outputs; "
                        f"give class indices in [0, {classes})" if classes else f"--eval {ref}: negative labels")
    return _to_device(distributed.shard(data, None, 512, labeled=True)[0], device)


def _load_models(model_ref: str, checkpoints: list[tuple[str, str]], device: torch.device):
    """One instance of MODULE:FACTORY per (option, checkpoint), weights loaded, in eval mode on
    ``device``; a failure names the option at fault (--model, --a, --b, --checkpoint)."""
    from graphrepair.io.loading import load_checkpoint, load_factory

    models = []
    for option, ckpt in checkpoints:
        try:
            model = load_factory(model_ref)
        except GraphRepairError as e:
            raise _with_option("--model", model_ref, e) from e
        try:
            load_checkpoint(model, ckpt)
        except GraphRepairError as e:
            raise _with_option(option, ckpt, e) from e
        models.append(model.eval().to(device))
    return models


def _load_pair(model_ref: str, ckpt_a: str, ckpt_b: str, device: torch.device):
    return _load_models(model_ref, [("--a", ckpt_a), ("--b", ckpt_b)], device)


def _repair_mode(repair: str) -> str | None:
    return None if repair == "none" else repair


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise DataError(f"{option} must be a positive number, got {value}")
    return value


def _corr_summary(mean_corr: dict[str, float]) -> dict | None:
    vals = list(mean_corr.values())
    return {"min": min(vals), "mean": sum(vals) / len(vals)} if vals else None


def _echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


_pair_options = [
    click.option("--a", "ckpt_a", required=True, metavar="A", help="Checkpoint of model A (alpha 0)."),
    click.option("--b", "ckpt_b", required=True, metavar="B", help="Checkpoint of model B (alpha 1)."),
    click.option("--data", "fit_ref", required=True, metavar="FIT",
                 help="Fitting data for alignment and REPAIR statistics: .npz/.npy/.pt/.safetensors "
                      "with 'x', or MODULE:FUNCTION."),
    click.option("--method", type=click.Choice(["activation", "weight"]), default="activation",
                 show_default=True, help="Align by activation correlation or by weight matching."),
    click.option("--num-examples", type=int, default=5000, show_default=True,
                 help="Examples for the statistics passes."),
    click.option("--points", type=click.Choice(["all", "conv"]), default="all", show_default=True,
                 help="REPAIR reset points: every conv/linear and residual output, or conv/linear only "
                      "(always foldable into the weights)."),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


# ------------------------------------------------------------------------------------------------
# merge


@main.command()
@_model_option
@_with(_pair_options)
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Interpolation weight of B: the merge is (1 - alpha) A + alpha B'.")
@click.option("--repair", type=click.Choice(["exact", "approx", "reset", "none"]), default="exact",
              show_default=True, help="exact: reset statistics from a pass of the merged model; approx: "
                                      "closed form; reset: BatchNorm statistics; none: plain interpolation.")
@click.option("--out", default="merged.onnx", show_default=True, metavar="FILE",
              help="The merged model as ONNX, verified with onnxruntime.")
@click.option("--no-onnx", is_flag=True, help="Do not write the ONNX file.")
@click.option("--weights", default=None, metavar="FILE",
              help="Also the merged state dict as safetensors (only when every reset folded).")
@click.option("--eval", "eval_ref", default=None, metavar="EVAL",
              help="Labeled data ('x' and 'y'): accuracy and loss of A, B and the merge.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def merge(model_ref, ckpt_a, ckpt_b, fit_ref, method, num_examples, points, alpha, repair, out,
          no_onnx, weights, eval_ref, as_json):
    """Align B to A, interpolate, REPAIR and export the merged model."""
    from graphrepair.merging.merge import merge_models
    from graphrepair.study.metrics import evaluate
    from graphrepair.io.outputs import atomic_outputs, check_distinct, check_output_path

    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise DataError(f"--alpha {alpha}: must be in [0, 1] (0 = model A, 1 = model B)")
    num_examples = _positive(num_examples, "--num-examples")
    onnx_path = None if no_onnx else check_output_path(out, "--out")
    weights_path = check_output_path(weights, "--weights") if weights else None
    if onnx_path is None and weights_path is None:
        raise OutputError("--no-onnx without --weights would write nothing; give --weights FILE or drop --no-onnx")
    check_distinct({"--out": onnx_path, "--weights": weights_path})
    device = pick_device(STATE.device)
    notes: list[str] = []
    with _warnings_as_notes(notes):
        model_a, model_b = _load_pair(model_ref, ckpt_a, ckpt_b, device)
        fit, num_examples, example = _fit_data(fit_ref, model_a, num_examples, device, notes)
        eval_data = _eval_data(eval_ref, model_a, example, device) if eval_ref else None
        res = merge_models([model_a, model_b], fit, weights=[1 - alpha, alpha], method=method,
                           repair=_repair_mode(repair), num_examples=num_examples, points=points,
                           quiet=STATE.quiet)
        own_class = type(res.model) is type(model_a)
        if weights_path is not None and not own_class:
            kept = "; ".join(res.kept[:3]) + (f"; ... and {len(res.kept) - 3} more" if len(res.kept) > 3 else "")
            raise OutputError(
                f"--weights {weights_path}: {len(res.kept) or 'some'} of the {res.resets} REPAIR resets could "
                f"not be folded into the weights ({kept or 'resets left as separate affines'}), so the merged "
                f"model is not a {type(model_a).__name__} and has no state dict of that class; the ONNX file "
                f"(--out) is the deliverable. For a safetensors state dict use --points conv or --repair "
                f"reset/none. Nothing was written")
        scores = {}
        if eval_data is not None:
            for name, m in (("A", model_a), ("B", model_b), ("merged", res.model)):
                scores[name] = evaluate(m, eval_data, quiet=STATE.quiet)
        export = None
        with atomic_outputs([onnx_path, weights_path]) as (tmp_onnx, tmp_weights):
            if tmp_onnx is not None:
                from graphrepair.io.export import export_onnx
                export = export_onnx(res.model, (example,), tmp_onnx)
            if tmp_weights is not None:
                from graphrepair.io.fileio import save_safetensors
                save_safetensors(res.model.state_dict(), tmp_weights, metadata={
                    "graphrepair": "merge", "model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b),
                    "alpha": repr(alpha), "method": method, "repair": repair, "points": points})
    notes = notes + [n for n in res.notes if n not in notes]
    report = {
        "model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b), "alpha": alpha, "method": res.method,
        "repair": res.repair, "points": points, "examples": res.examples,
        "groups": len(res.spec.groups), "free_channels": res.spec.num_free,
        "group_sizes": {g.name: g.size for g in res.spec.groups},
        "mean_corr": res.mean_corr, "mean_corr_summary": _corr_summary(res.mean_corr),
        "resets": res.resets, "folded": res.folded, "kept": res.kept, "dead_channels": res.dead_channels,
        "merged_class": type(res.model).__name__,
        "onnx": None if export is None else {
            "path": str(onnx_path), "node_count": export.node_count, "op_counts": export.op_counts,
            "max_abs_diff": export.max_abs_diff, "providers": list(export.providers_checked)},
        "weights": None if weights_path is None else str(weights_path),
        "eval": {k: {"accuracy": a, "loss": lo} for k, (a, lo) in scores.items()} or None,
        "notes": notes,
    }
    if as_json:
        _echo_json(report)
    else:
        click.echo(_merge_text(report, eval_ref))


def _merge_text(r: dict, eval_ref: str | None) -> str:
    from graphrepair.cli.tables import number, percent, plural, text_table, wrapped_table

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
    elif r["repair"] == "reset":
        lines.append("repair: BatchNorm statistics re-estimated on the merged model")
    else:
        lines.append("repair: none (plain interpolation of the aligned models)")
    lines.append(f"dead channels: {r['dead_channels']}")
    if r["eval"]:
        rows = [[k, percent(v["accuracy"]), number(v["loss"])] for k, v in r["eval"].items()]
        lines.append(f"evaluation on {eval_ref}:")
        lines.append(text_table(["model", "accuracy %", "loss"], rows, indent="  "))
    if r["onnx"]:
        o = r["onnx"]
        ops = ", ".join(f"{k} {v}" for k, v in sorted(o["op_counts"].items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"wrote {o['path']}: {o['node_count']} nodes ({ops}); max |diff| vs onnxruntime "
                     f"{o['max_abs_diff']:.2e} ({', '.join(o['providers'])})")
    if r["weights"]:
        lines.append(f"wrote {r['weights']}: state dict of {r['merged_class']}")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# barrier


@main.command()
@_model_option
@_with(_pair_options)
@click.option("--eval", "eval_ref", required=True, metavar="EVAL",
              help="Labeled data ('x' and 'y') to measure accuracy and loss on.")
@click.option("--alphas", type=int, default=11, show_default=True, help="Points on the path, ends included.")
@click.option("--repair", type=click.Choice(["exact", "approx", "reset", "none"]), default="exact",
              show_default=True, help="The REPAIRed curve (none: naive and aligned only).")
@click.option("--plot", "plot_path", default=None, metavar="F.png",
              help="Write accuracy and loss against alpha (with --layers also F_layers.png).")
@click.option("--layers", is_flag=True,
              help="Per-layer variance-collapse ratio and LLFC cosine at alpha 0.5.")
@click.option("--json", "as_json", is_flag=True, help="Print the curves as JSON.")
@handle_errors
def barrier(model_ref, ckpt_a, ckpt_b, fit_ref, method, num_examples, points, eval_ref, alphas,
            repair, plot_path, layers, as_json):
    """Accuracy and loss along the path A -> B: naive, aligned, aligned + REPAIR."""
    from graphrepair.study.metrics import alpha_grid
    from graphrepair.io.outputs import atomic_outputs, check_distinct, check_output_path
    from graphrepair.cli.plots import check_plot_path, layers_path
    from graphrepair.study.runner import run_study
    from graphrepair.cli.tables import plural

    grid = alpha_grid(alphas)
    num_examples = _positive(num_examples, "--num-examples")
    plots: list[Path] = []
    if plot_path:
        plots.append(check_output_path(check_plot_path(plot_path), "--plot"))
        if layers:
            plots.append(check_output_path(layers_path(plot_path), "--plot (layers figure)"))
        check_distinct({"--plot": plots[0], "--plot (layers figure)": plots[1] if layers else None})
    device = pick_device(STATE.device)
    notes: list[str] = []
    with _warnings_as_notes(notes):
        model_a, model_b = _load_pair(model_ref, ckpt_a, ckpt_b, device)
        fit, num_examples, example = _fit_data(fit_ref, model_a, num_examples, device, notes)
        eval_data = _eval_data(eval_ref, model_a, example, device)
        study = run_study(model_a, model_b, fit_data=fit, eval_data=eval_data, alphas=grid, method=method,
                          repair=_repair_mode(repair), num_examples=num_examples, points=points,
                          layers=layers, quiet=STATE.quiet)
        if plots:
            from graphrepair.cli.plots import barrier_figure, layers_figure, save_figure
            title = f"{model_ref}: {Path(ckpt_a).name} -> {Path(ckpt_b).name}"
            figs = [barrier_figure(study.curves, title)]
            if layers:
                figs.append(layers_figure(study.layers, study.layer_labels, study.layer_alpha, title))
            with atomic_outputs(plots) as tmps:
                for fig, tmp in zip(figs, tmps):
                    save_figure(fig, tmp)
    study.notes = notes + [n for n in study.notes if n not in notes]
    if as_json:
        _echo_json({"model": model_ref, "a": str(ckpt_a), "b": str(ckpt_b), "eval": eval_ref,
                    "points": points, **study.as_dict(), "plots": [str(p) for p in plots]})
        return
    corr = _corr_summary(study.mean_corr)
    head = (f"path A -> B of {model_ref} ({plural(study.groups, 'group')}, "
            f"{plural(study.free_channels, 'channel')} may move); "
            f"{method} alignment" + (f" on {study.examples} examples" if study.examples else ""))
    if corr:
        head += f", mean matched correlation {corr['mean']:.3f} (min {corr['min']:.3f})"
    click.echo(head)
    click.echo(f"accuracy (%) and loss on {eval_ref} over {len(grid)} alphas; barrier = largest drop "
               f"(accuracy, points) or rise (loss) against the straight line between A and B:")
    click.echo(study.curve_table())
    if study.layers:
        click.echo("")
        click.echo(f"per layer at alpha {study.layer_alpha:g} (variance ratio = Var(merged) / mean "
                   f"Var(A, B'), 1 = no collapse; LLFC cosine 1 = linear feature connectivity):")
        click.echo(study.layer_table())
    for p in plots:
        click.echo(f"wrote {p}")
    for n in study.notes:
        click.echo(f"note: {n}")


# ------------------------------------------------------------------------------------------------
# export


@main.command()
@_model_option
@click.option("--checkpoint", required=True, metavar="FILE", help=".safetensors or .pt/.pth state dict.")
@_shape_option
@_dtype_option
@_vocab_option
@click.option("--out", required=True, metavar="FILE", help="The ONNX file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def export(model_ref, checkpoint, input_shape, input_dtype, vocab, out, as_json):
    """Export a model to ONNX, verified with onnxruntime against torch before the file is kept."""
    from graphrepair.io.export import export_onnx
    from graphrepair.io.outputs import check_output_path

    path = check_output_path(out, "--out")
    shape = parse_shape(input_shape)
    device = pick_device(STATE.device)
    (model,) = _load_models(model_ref, [("--checkpoint", checkpoint)], device)
    x = example_input(shape, input_dtype, vocab).to(device)
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise ShapeError(f"--input-shape {input_shape}: the model cannot run on a {input_dtype} input of "
                         f"shape {shape}: {_one_line(e, 200)}") from e
    rep = export_onnx(model, (x,), path)
    data = {"path": str(path), "node_count": rep.node_count, "op_counts": rep.op_counts,
            "max_abs_diff": rep.max_abs_diff, "providers": list(rep.providers_checked)}
    if as_json:
        _echo_json(data)
        return
    ops = ", ".join(f"{k} {v}" for k, v in sorted(rep.op_counts.items(), key=lambda kv: -kv[1])[:8])
    click.echo(f"wrote {path}: {rep.node_count} nodes ({ops})")
    click.echo(f"verified with onnxruntime ({', '.join(rep.providers_checked)}): max |diff| vs torch "
               f"{rep.max_abs_diff:.2e}")


# ------------------------------------------------------------------------------------------------
# demo


@main.command()
@click.option("--out", "out_dir", default="graphrepair-demo", show_default=True, metavar="DIR",
              help="Directory for merged.onnx, barrier.png and layers.png (created if needed).")
@click.option("--pair", default="digits-mlp", show_default=True, metavar="NAME",
              help="Which pair of models to merge: digits-mlp (trained on the fly), or a checkpoint "
                   "pair of fixtures.pairs when its files are in fixtures/checkpoints/.")
@click.option("--alphas", type=int, default=11, show_default=True, help="Points on the path, ends included.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@handle_errors
def demo(out_dir, pair, alphas, as_json):
    """Train two small MLPs on offline digits, merge them naive / aligned / REPAIR, show the barriers."""
    from graphrepair.demo import available_pairs, run_demo

    pairs = available_pairs()
    if pair not in pairs:
        raise GraphRepairError(f"--pair {pair!r} is not a demo pair; choose one of {', '.join(pairs)}")
    from graphrepair.study.metrics import alpha_grid
    alpha_grid(alphas)
    notes: list[str] = []
    with _warnings_as_notes(notes):
        result = run_demo(out_dir, pair=pair, alphas=alphas, device=pick_device(STATE.device),
                          quiet=STATE.quiet)
    result.study.notes = notes + [n for n in result.study.notes if n not in notes]
    if as_json:
        _echo_json(result.as_dict())
    else:
        click.echo(result.text())


if __name__ == "__main__":  # pragma: no cover
    main()
