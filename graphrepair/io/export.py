"""``graphrepair.export_onnx``: the public form of the verified ONNX export pass.

The pass (``passes.export_onnx``) exports with ``torch.onnx.export(dynamo=True)``, runs the file in
onnxruntime on the example inputs and on a batch of another size, compares every output with
torch's and only then moves the file into place; here its errors become ExportError.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from passes.errors import ExportFailedError, ExportVerificationError
from passes.export_onnx import ExportReport
from passes.export_onnx import export_onnx as _export

from graphrepair.errors import ExportError, OutputError
from graphrepair.discovery.trace import as_tuple


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, rtol: float = 1e-4,
                atol: float = 1e-4, dynamic_batch: bool = True) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX, verified with onnxruntime; nothing is written on failure."""
    args = tuple(t.to(_device(model)) for t in as_tuple(example_inputs))
    try:
        return _export(model, args, path, rtol=rtol, atol=atol, dynamic_batch=dynamic_batch)
    except ExportVerificationError as e:
        raise ExportError(f"onnxruntime disagrees with torch for {path}: {e}; no file was written") from e
    except ExportFailedError as e:
        text = str(e)
        if "cannot write" in text or "directory" in text:
            raise OutputError(text) from e
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {text}") from e


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")
