"""Models, data and files for the commands, checked before any long computation.

Each failure is a GraphRepairError led by the option at fault (``--a``, ``--data``, ...); the
library's messages never name options, so the command line adds them here (``with_option``).
Data are checked by ``io.data`` (whole when held in memory, batch by batch as they stream
otherwise); here the model is tried on them: on two examples (what ONNX export uses) and on a whole
first batch (what the passes use), so that a model that fixes its batch size is caught up front.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from graphrepair.cli.common import Session, one_line
from graphrepair.errors import CheckpointError, DataError, GraphRepairError, LoadError, ShapeError

BATCH = 256  # the batch size of the statistics passes


def with_option(option: str, ref, error: GraphRepairError) -> GraphRepairError:
    """The same error, its message led by the option (and the reference if the message lacks it)."""
    text = one_line(error)
    if text.startswith(option):
        return error
    lead = f"{option}: " if str(ref) in text else f"{option} {ref}: "
    return type(error)(lead + text)


# ------------------------------------------------------------------------------------------------
# Files


def model_file(model_ref: str) -> str | None:
    """The Python file of a ``path/to/models.py:FACTORY`` reference (an input too), else None."""
    module, colon, _ = model_ref.strip().rpartition(":")
    if colon and (module.endswith(".py") or "/" in module or os.sep in module):
        return module
    return None


def check_files(session: Session, outputs: Mapping[str, str | os.PathLike | None],
                inputs: Mapping[str, str | os.PathLike | None]) -> dict[str, Path | None]:
    """Every output checked before any work: writable, distinct, and not one of the inputs. The
    outputs are recorded in the session (an interrupt then says whether they were written)."""
    from graphrepair.io.outputs import check_distinct, check_not_inputs, check_output_path

    paths = {opt: None if p is None else check_output_path(p, opt) for opt, p in outputs.items()}
    check_distinct(paths)
    check_not_inputs(paths, inputs)
    session.planned.extend(p for p in paths.values() if p is not None)
    return paths


def check_checkpoint(path: str, option: str) -> Path:
    from graphrepair.io.fileio import check_source

    return check_source(path, option, error=CheckpointError)


# ------------------------------------------------------------------------------------------------
# Device, example input, models


def pick_device(name: str):
    """--device: CUDA when torch sees a GPU (``auto``), each torchrun process on its LOCAL_RANK's."""
    from graphrepair.runtime import pick_device as pick

    return pick(name)


def example_input(shape: tuple[int, ...], dtype: str, vocab: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    try:
        if dtype == "long":
            x = torch.randint(0, vocab, shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        return x.to(device)
    except (RuntimeError, MemoryError) as e:
        raise ShapeError(f"--input-shape {','.join(map(str, shape))}: cannot make an example input of that "
                         f"size ({one_line(e, 120)}); give one small batch") from e


def load_models(model_ref: str, checkpoints: list[tuple[str, str]], device) -> list:
    """One instance of MODULE:FACTORY per (option, checkpoint), weights loaded, in eval mode on
    ``device``; a failure names the option at fault (--model, --a, --b, --checkpoint)."""
    from graphrepair.io.loading import load_checkpoint, load_factory
    from graphrepair.io.zoo_refs import load_pretrained

    pretrained = {option: load_pretrained(model_ref, ckpt) for option, ckpt in checkpoints}  # hf:DIR folders
    for option, ckpt in checkpoints:
        if pretrained[option] is None:
            check_checkpoint(ckpt, option)
    models = []
    for option, ckpt in checkpoints:
        if pretrained[option] is not None:
            models.append(pretrained[option].eval().to(device))
            continue
        try:
            model = load_factory(model_ref)
        except GraphRepairError as e:
            raise with_option("--model", model_ref, e) from e
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as e:  # the factory raised something that is not an Exception
            raise LoadError(f"--model {model_ref}: calling it raised {type(e).__name__}: {e}") from e
        try:
            load_checkpoint(model, ckpt)
        except GraphRepairError as e:
            raise with_option(option, ckpt, e) from e
        models.append(model.eval().to(device))
    return models


def run_model(model, x, what: str, error: type[GraphRepairError] = DataError):
    """``model(x)`` (``x``: a tensor or ``Inputs``) without gradients; a failure is bad input, said
    in one line led by ``what``."""
    import torch

    try:
        with torch.no_grad():
            return x.call(model) if hasattr(x, "call") else model(x)
    except GraphRepairError:
        raise
    except Exception as e:
        raise error(f"{what}: {type(e).__name__}: {one_line(e, 200)}") from e


def _describe(x) -> str:
    """``x`` (a tensor or ``Inputs``) as the shape and dtype of one example."""
    if hasattr(x, "named"):
        if len(x.tensors()) != 1:
            return ", ".join(f"{n}: {tuple(t.shape[1:])} ({str(t.dtype).replace('torch.', '')})" for n, t in x.named())
        x = x.first
    return f"shape {tuple(x.shape[1:])} ({str(x.dtype).replace('torch.', '')})"


def probe(model, first, option: str, ref: str):
    """Run ``model`` on two examples of the first batch (``Inputs``), then on the whole batch;
    returns the outputs on the two examples. A keyword input the forward does not take, or an
    argument it needs that the batch does not give, is named first (``check_arguments``)."""
    from graphrepair.discovery.trace import check_arguments

    check_arguments(model, first, f"{option} {ref}")
    out = run_model(model, first.head(2), f"{option} {ref}: the model cannot run on its examples of "
                                          f"{_describe(first)}; give data shaped like the model's input")
    if first.batch_size > 2:
        run_model(model, first, f"{option} {ref}: the model runs on 2 examples but not on a batch of "
                                f"{first.batch_size} (does it fix its batch size? the passes run batches of up "
                                f"to {BATCH})")
    return out


# ------------------------------------------------------------------------------------------------
# Data


def load(ref: str, option: str):
    """``io.data.load_data(ref)``, held in memory as a checked ArrayDataset when it is arrays."""
    from graphrepair.io.data import load_data
    from graphrepair.io.examples import in_memory

    try:
        data = load_data(ref)
        return in_memory(data, f"{option} {ref}") or data
    except GraphRepairError as e:
        raise with_option(option, ref, e) from e


@dataclass
class Fit:
    """The --data of a run: its Examples (this process's share under torchrun), the examples to
    use, two examples on the device."""

    data: object
    examples: int
    example: object
    notes: list[str] = field(default_factory=list)


def _share(examples):
    """This process's share of ``examples`` under torchrun (a contiguous block of whole batches)."""
    from graphrepair import distributed

    run = distributed.current()
    return examples if run is None else examples.shard(run.rank, run.world)


def fit_data(ref: str, model, num_examples: int, device, needs_statistics: bool) -> Fit:
    """--data, checked and tried on the model. ``needs_statistics``: the run estimates channel
    statistics from it (activation matching, REPAIR), which needs at least two different examples.
    Data held as arrays were checked whole when loaded; other data are checked batch by batch as
    they stream (``Examples(strict=True)``)."""
    from graphrepair.io.data import ArrayDataset
    from graphrepair.io.checks import check_examples_vary
    from graphrepair.io.examples import Examples
    from graphrepair.io.inputs import Inputs
    from graphrepair.runtime import model_dtype

    where = f"--data {ref}"
    data = load(ref, "--data")
    notes: list[str] = []
    if isinstance(data, ArrayDataset):
        n = len(data)
        if n < num_examples:
            notes.append(f"{where} has {n} examples; all of them are used (--num-examples {num_examples})")
            num_examples = n
    if needs_statistics and num_examples < 2:
        raise DataError(f"{where}: {num_examples} example{'s' if num_examples != 1 else ''} cannot give channel "
                        f"statistics (a variance needs at least 2; thousands give good ones); give more "
                        f"examples or raise --num-examples")
    if needs_statistics and isinstance(data, ArrayDataset):
        check_examples_vary(Inputs.of(data.head(num_examples), where), where)
    fit = Examples(data, num_examples, BATCH, device=device, dtype=model_dtype(model), where=where,
                   strict=not isinstance(data, ArrayDataset))
    first = fit.example(BATCH)
    try:
        probe(model, first, "--data", ref)
    except DataError:
        better = fit.missing_batch_axis(model)  # single examples: say so, not "cannot run"
        if better is not None:
            raise with_option("--data", ref, better) from None
        raise
    fit = _share(fit)
    count = fit.count
    return Fit(fit, num_examples if count is None else count, first.head(2), notes)


def classifier_logits(out, where: str):
    """The class scores in a model's output: a tensor, ``out['logits']``/``out.logits``, or the first
    item of a tuple; DataError when there are none (evaluation needs them)."""
    import torch

    if isinstance(out, dict):
        if "logits" not in out:
            raise DataError(f"{where}: the model returns a dict without 'logits' (keys: "
                            f"{', '.join(map(str, list(out)[:6]))}); evaluation needs class scores: return "
                            f"the logits, or a dict or ModelOutput with 'logits'")
        out = out["logits"]
    elif hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not out.is_floating_point() or out.shape[-1] < 1:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise DataError(f"{where}: the model returns {what}; evaluation needs class scores of shape "
                        f"(N, classes) or (N, ..., classes)")
    return out


def eval_data(ref: str, model, example, device):
    """--eval: labeled data like --data (same example shape and kind), with integer class indices
    within the model's number of outputs, checked whole or batch by batch as it streams."""
    from graphrepair.io.data import ArrayDataset
    from graphrepair.io.checks import LabelRule, check_batch_shape, check_labels
    from graphrepair.io.examples import Examples
    from graphrepair.runtime import model_dtype

    where = f"--eval {ref}"
    data = load(ref, "--eval")
    if isinstance(data, ArrayDataset) and data.y is None:
        raise DataError(f"{where} has no labels: evaluation needs a 'y' array of class indices "
                        f"next to 'x' (e.g. numpy.savez(path, x=inputs, y=labels))")
    held = isinstance(data, ArrayDataset)
    evaluation = Examples(data, None, 512, device=device, dtype=model_dtype(model), where=where, labels=True,
                          strict=not held, consistent=False)
    batch = evaluation.first()
    first = batch.inputs.head(64)
    if first.names != example.names:
        raise DataError(f"{where}: inputs {', '.join(first.names)} but --data has {', '.join(example.names)}; "
                        f"give both the same")
    for (_, x), (_, like) in zip(first.named(), example.named()):
        if x.dtype != like.dtype:
            raise DataError(f"{where}: inputs have dtype {str(x.dtype).replace('torch.', '')} but --data has "
                            f"{str(like.dtype).replace('torch.', '')}; give both the same")
        if x.is_floating_point():
            check_batch_shape(x, tuple(like.shape[1:]), where)
        else:
            check_batch_shape(x, (None,) * (like.dim() - 1), where)
    out = run_model(model, first.head(2), f"{where}: the model cannot run on its examples of {_describe(first)}")
    logits = classifier_logits(out, where)
    rule = LabelRule(int(logits.shape[-1]), logits.dim() - 1)
    if held:
        check_labels(data.y, data.x, rule, where)
    else:
        check_labels(batch.labels, batch.inputs, rule, where, 0)
        evaluation.labels = rule  # and every batch as it streams
    return _share(evaluation)


__all__ = ["BATCH", "Fit", "check_checkpoint", "check_files", "classifier_logits",
           "eval_data", "example_input", "fit_data", "load", "load_models", "model_file", "pick_device",
           "probe", "run_model", "with_option"]
