"""``graphrepair.export_onnx``: the public form of the verified ONNX export pass.

The pass (``passes.export_onnx.export_verified``) exports with ``torch.onnx.export(dynamo=True)``
in memory, runs the model in onnxruntime on the example inputs and on a batch of another size and
compares every output with torch's; only then are its bytes written, atomically
(``fileio.atomic_output``). Its errors become ExportError (OutputError when the disk is full or the
directory cannot be written).

The comparison counts NaN as equal to NaN, so a model that computes NaN would "verify": weights and
buffers must be finite, and so must torch's outputs on the example inputs, before anything is
exported. An interrupt (Ctrl-C, SIGTERM) that the exporter turned into an error of its own is
raised again as what it was.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from passes.errors import ExportFailedError, ExportVerificationError
from passes.export_onnx import ExportReport, flatten_outputs
from passes.export_onnx import export_verified

from graphrepair.discovery.trace import example_inputs_for, traceable
from graphrepair.models import check_finite, eval_mode, user_models
from graphrepair.errors import ExportError, NumericError, OutputError, interrupt_in
from graphrepair.io.checks import check_tolerances
from graphrepair.io.fileio import atomic_output, disk_full
from graphrepair.io.inputs import Inputs


@user_models("model", state=False)
def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, rtol: float = 1e-4,
                atol: float = 1e-4, dynamic_batch: bool = True) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX, verified with onnxruntime; nothing is written on failure.

    ``example_inputs``: a tensor, a tuple of tensors (positional) or a dict of tensors (keyword
    inputs, e.g. ``input_ids`` and ``attention_mask``), moved to the model's device and cast to its
    floating dtype. Hugging Face models are exported with caching off (their config restored)."""
    check_tolerances(rtol, atol)
    inputs = example_inputs_for(model, example_inputs)
    name = type(model).__name__
    check_finite_model(model)
    check_finite_outputs(model, inputs)
    try:
        with traceable(model), atomic_output(path) as tmp:
            verified = export_verified(model, inputs.args, target=os.fspath(path), rtol=rtol, atol=atol,
                                       dynamic_batch=dynamic_batch, kwargs=dict(inputs.kwargs))
            tmp.write_bytes(verified.data)
        return verified.report(path)
    except (ExportVerificationError, ExportFailedError) as e:
        interrupt = interrupt_in(e)
        if interrupt is not None:
            raise interrupt from None
        full = disk_full(e)
        if full is not None:
            raise OutputError(f"cannot write '{path}': {full}; free space or choose another location") from e
        if isinstance(e, ExportVerificationError):
            raise ExportError(f"onnxruntime disagrees with torch for {path}: {e}; no file was written") from e
        text = str(e)
        if "cannot write" in text or "directory" in text:
            raise OutputError(text) from e
        limit = exporter_limit(model, text)
        if limit:  # static shapes fail the same way: the batch-size hint would mislead
            text = text.replace("; if the model fixes its batch size, try dynamic_batch=False", "")
        raise ExportError(f"cannot export {name} to ONNX: {text}{limit}") from e


def export_dict(report: ExportReport, path: str | os.PathLike | None = None) -> dict:
    """An export's report as plain data; ``path``: the file it became (when the export wrote a
    temporary file that was then moved into place)."""
    return {"path": str(path if path is not None else report.path), "node_count": report.node_count,
            "op_counts": report.op_counts, "max_abs_diff": report.max_abs_diff,
            "providers": list(report.providers_checked)}


def op_summary(op_counts: dict[str, int], top: int = 8) -> str:
    """The ``top`` most used ONNX ops of an export, most used first: ``"Gemm 9, Relu 8"``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(op_counts.items(), key=lambda kv: -kv[1])[:top])


def check_finite_model(model: nn.Module) -> None:
    """NumericError naming the first parameter or buffer holding NaN or Inf (the merge's check,
    ``models.check_finite``, with what it means for an export)."""
    buffers = dict(model.named_buffers())  # non-persistent ones too: the exported graph holds them
    check_finite({**dict(model.named_parameters()), **buffers}, type(model).__name__, buffers=set(buffers),
                 end="; the exported model could not be verified (NaN compares equal to NaN); fix the weights")


def check_finite_outputs(model: nn.Module, inputs) -> None:
    """NumericError when torch's outputs on ``inputs`` hold NaN or Inf (nothing to verify against)."""
    inputs = Inputs.of(inputs)
    try:
        with eval_mode(model), torch.no_grad(), traceable(model):
            outputs = flatten_outputs(inputs.call(model))
    except Exception:
        return  # the export reports why the model cannot run
    for label, t in outputs:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise NumericError(f"{type(model).__name__}: output {label or '0'} is NaN or infinite on the example "
                               f"input, so the ONNX file cannot be verified against it; check the weights and "
                               f"the example input")


# Ops and messages of torch.onnx's exporter that fail on the model as its library wrote it, merged or
# not: the limit is the exporter's, and the error says so.
EXPORTER_LIMITS = (
    ("grouped_mm", "the mixture-of-experts kernel (grouped_mm / grouped_mm_fallback) has no ONNX translation"),
    ("Cannot view a tensor with shape", "the exporter cannot express a view of a non-contiguous tensor "
                                        "(e.g. Swin's window partition, T5's attention reshapes)"),
)


def exporter_limit(model: nn.Module, text: str) -> str:
    """A sentence naming a known limit of torch.onnx's exporter found in ``text``, else ''."""
    for pattern, what in EXPORTER_LIMITS:
        if pattern in text:
            return (f". This is a limit of torch.onnx's exporter, not of graphrepair: {what}; the "
                    f"unmerged model fails the same way, with a static batch too")
    return ""
