"""Models, data and files for the commands, checked before any long computation.

Each failure is a GraphRepairError led by the option at fault (``--a``, ``--data``, ...); the
library's messages never name options, so the command line adds them here (``with_option``).
Data are checked by ``io.data`` (whole when held in memory, batch by batch as they stream
otherwise); here the model is tried on them: on two examples (what ONNX export uses) and on a whole
first batch (what the passes use), so that a model that fixes its batch size is caught up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from graphrepair.cli.common import Session, one_line
from graphrepair.errors import CheckpointError, DataError, GraphRepairError, LoadError, ShapeError

BATCH = 256  # the batch size of the statistics passes (merging.merge.FitData)


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
    """``model(x)`` without gradients; a failure is bad input, said in one line led by ``what``."""
    import torch

    try:
        with torch.no_grad():
            return model(x)
    except GraphRepairError:
        raise
    except Exception as e:
        raise error(f"{what}: {type(e).__name__}: {one_line(e, 200)}") from e


def _describe(x) -> str:
    return f"shape {tuple(x.shape[1:])} ({str(x.dtype).replace('torch.', '')})"


def probe(model, first, option: str, ref: str):
    """Run ``model`` on two examples of the first batch, then on the whole batch; returns the
    outputs on the two examples."""
    out = run_model(model, first[:2], f"{option} {ref}: the model cannot run on its examples of "
                                      f"{_describe(first)}; give data shaped like the model's input")
    if first.shape[0] > 2:
        run_model(model, first, f"{option} {ref}: the model runs on 2 examples but not on a batch of "
                                f"{first.shape[0]} (does it fix its batch size? the passes run batches of up "
                                f"to {BATCH})")
    return out


def require_groups(model, example, model_ref: str):
    """The spec of ``model``; an error when no hidden channel may move (nothing to align)."""
    from graphrepair.discovery.discover import discover
    from graphrepair.errors import NoGroupsError

    spec = discover(model, (example,))
    if not spec.groups:
        reasons = list(dict.fromkeys(f.reason for f in spec.fixed if not f.structural
                                     and not f.reason.startswith(("model input", "model output"))))[:2]
        why = f" (e.g. {'; '.join(one_line(r, 100) for r in reasons)})" if reasons else ""
        raise NoGroupsError(f"no permutation groups in {model_ref}: no hidden channel may move{why}, so there "
                            f"is nothing to align or repair; see `graphrepair inspect --model {model_ref}` "
                            f"for every axis kept fixed and why")
    return spec


# ------------------------------------------------------------------------------------------------
# Data


def load(ref: str, option: str):
    """``io.data.load_data(ref)``, held in memory as a checked ArrayDataset when it is arrays."""
    from graphrepair.io.data import in_memory, load_data

    try:
        data = load_data(ref)
        return in_memory(data, f"{option} {ref}") or data
    except GraphRepairError as e:
        raise with_option(option, ref, e) from e


@dataclass
class Fit:
    """The --data of a run: the data, the examples to use, two examples on the device."""

    data: object
    examples: int
    example: object
    notes: list[str] = field(default_factory=list)


def fit_data(ref: str, model, num_examples: int, device, needs_statistics: bool) -> Fit:
    """--data, checked and tried on the model. ``needs_statistics``: the run estimates channel
    statistics from it (activation matching, REPAIR), which needs at least two different examples."""
    from graphrepair.io.data import ArrayDataset, CheckedData, check_examples_vary, iter_batches, take_examples

    where = f"--data {ref}"
    data = load(ref, "--data")
    notes: list[str] = []
    if isinstance(data, ArrayDataset):
        n = len(data)
        if n < num_examples:
            notes.append(f"{where} has {n} examples; all of them are used (--num-examples {num_examples})")
            num_examples = n
    else:
        data = CheckedData(data, where=where, like=None)
        if isinstance(data.data, Iterator):  # one-shot: keep the examples the passes will need
            data = list(take_examples(data, num_examples, BATCH))
    if needs_statistics and num_examples < 2:
        raise DataError(f"{where}: {num_examples} example{'s' if num_examples != 1 else ''} cannot give channel "
                        f"statistics (a variance needs at least 2; thousands give good ones); give more "
                        f"examples or raise --num-examples")
    if needs_statistics and isinstance(data, ArrayDataset):
        check_examples_vary(data.x[:num_examples], where)
    first = next(iter_batches(data, BATCH))[:BATCH].to(device)
    probe(model, first, "--data", ref)
    from graphrepair import distributed

    data, num_examples = distributed.shard(data, num_examples, BATCH)  # this rank's batches under torchrun
    return Fit(_to_device(data, device, num_examples), num_examples, first[:2], notes)


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
    """--eval: labeled data like --data (same example shape and dtype), with integer class indices
    within the model's number of outputs, checked whole or batch by batch as it streams."""
    from graphrepair.io.data import ArrayDataset, CheckedData, LabelRule, check_batch_shape, check_labels

    where = f"--eval {ref}"
    data = load(ref, "--eval")
    if isinstance(data, ArrayDataset) and data.y is None:
        raise DataError(f"{where} has no labels: evaluation needs a 'y' array of class indices "
                        f"next to 'x' (e.g. numpy.savez(path, x=inputs, y=labels))")
    if not isinstance(data, ArrayDataset):
        data = CheckedData(data, where=where, like=None)
        if isinstance(data.data, Iterator):  # evaluated once per model and alpha: keep it
            data = list(data)
    first = next(iter(data if not isinstance(data, ArrayDataset) else [(data.x[:64], data.y[:64])]))
    x, y = first if isinstance(first, tuple) else (first, None)
    if x.dtype != example.dtype:
        raise DataError(f"{where}: inputs have dtype {str(x.dtype).replace('torch.', '')} but --data has "
                        f"{str(example.dtype).replace('torch.', '')}; give both the same")
    if x.is_floating_point():
        check_batch_shape(x, tuple(example.shape[1:]), where)
    else:
        check_batch_shape(x, (None,) * (example.dim() - 1), where)
    out = run_model(model, x[:2].to(device), f"{where}: the model cannot run on its examples of {_describe(x)}")
    logits = classifier_logits(out, where)
    rule = LabelRule(int(logits.shape[-1]), logits.dim() - 1)
    from graphrepair import distributed

    if isinstance(data, ArrayDataset):
        check_labels(data.y, data.x, rule, where)
        return _to_device(distributed.shard(data, None, 512, labeled=True)[0], device)
    check_labels(y, x, rule, where, 0)
    return distributed.shard(CheckedData(data, where=where, like=x, labels=rule), None, 512, labeled=True)[0]


def _to_device(data, device, limit: int | None = None):
    """In-memory data moves to the device once (at most ``limit`` examples); other data is moved
    batch by batch by the passes."""
    from graphrepair.io.data import ArrayDataset

    if isinstance(data, ArrayDataset):
        x = data.x if limit is None else data.x[:limit]
        y = None if data.y is None else (data.y if limit is None else data.y[:limit])
        return ArrayDataset(x.to(device), None if y is None else y.to(device), source=data.source)
    return data


def check_statistics(dead: int, spec, where: str, examples: int) -> list[str]:
    """After the statistics pass: an error when no unit of model A varies at all (``dead``
    channels of the spec's: nothing was matched or repaired), a warning when the examples are
    fewer than the widest group's channels (the correlations are then rank-deficient and the
    matching partly arbitrary)."""
    if dead and dead >= spec.num_free:
        raise DataError(f"{where}: no unit of model A varies over the {examples} examples (all "
                        f"{spec.num_free} channels are constant), so nothing can be matched or repaired; "
                        "give real, varied data")
    widest = max((g.size for g in spec.groups), default=0)
    if 0 < examples < widest:
        return [f"statistics from only {examples} examples for groups of up to {widest} channels: the "
                f"correlations are rank-deficient and the matching partly arbitrary; use thousands of examples"]
    return []


__all__ = ["BATCH", "Fit", "check_checkpoint", "check_files", "check_statistics", "classifier_logits",
           "eval_data", "example_input", "fit_data", "load", "load_models", "model_file", "pick_device",
           "probe", "require_groups", "run_model", "with_option"]
