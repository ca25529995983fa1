"""graphrepair: discover permutation symmetries of any PyTorch model, align and merge models with
REPAIR through graph passes, and export verified ONNX.

The public names are imported on first use (PEP 562), so that ``import graphrepair.cli`` -- the
command line's entry point -- does not import torch before the command line has installed its
signal handlers (Ctrl-C in the first second is then an ordinary interrupt, not a traceback).
``from graphrepair import merge`` and ``gr.merge`` work as before.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "discover": "graphrepair.discovery.discover",
    "permute": "graphrepair.discovery.permute",
    "export_onnx": "graphrepair.io.export",
    "trace": "graphrepair.discovery.trace",
    "align": "graphrepair.merging.merge",
    "merge": "graphrepair.merging.merge",
    "merge_models": "graphrepair.merging.merge",
    "prepare": "graphrepair.merging.merge",
    "MergeResult": "graphrepair.merging.merge",
    "barrier": "graphrepair.study.metrics",
    "evaluate": "graphrepair.study.metrics",
    "layer_report": "graphrepair.study.metrics",
    "Curve": "graphrepair.study.metrics",
    "PermutationSpec": "graphrepair.discovery.spec",
    "Group": "graphrepair.discovery.spec",
    "FixedAxis": "graphrepair.discovery.spec",
    **{name: "graphrepair.errors" for name in (
        "GraphRepairError", "TraceError", "ShapeError", "UnsupportedOpError", "MismatchError", "CheckError",
        "CheckpointError", "DataError", "LoadError", "ExportError", "NumericError", "OutputError",
        "NoGroupsError", "PermutationError", "UnknownGroupError", "GraphRepairWarning")},
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


_SUBPACKAGES = ("cli", "demo", "discovery", "errors", "io", "merging", "progress", "study")


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # as eager imports made them attributes before
        return importlib.import_module(f"graphrepair.{name}")
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'graphrepair' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
