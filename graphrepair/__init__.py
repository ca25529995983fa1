"""graphrepair: discover permutation symmetries of any PyTorch model, align and merge models with
REPAIR through graph passes, and export verified ONNX."""

from graphrepair.discovery.discover import discover
from graphrepair.errors import (CheckError, CheckpointError, DataError, ExportError, GraphRepairError,
                     LoadError, MismatchError, NumericError, OutputError, ShapeError, TraceError,
                     UnsupportedOpError)
from graphrepair.io.export import export_onnx
from graphrepair.merging.merge import MergeResult, align, merge, merge_models, prepare
from graphrepair.study.metrics import Curve, barrier, evaluate, layer_report
from graphrepair.discovery.permute import permute
from graphrepair.discovery.spec import FixedAxis, Group, PermutationSpec
from graphrepair.discovery.trace import trace

__all__ = [
    "discover", "permute", "export_onnx", "trace", "align", "merge", "merge_models", "prepare", "barrier",
    "evaluate", "layer_report", "Curve", "MergeResult", "PermutationSpec", "Group", "FixedAxis",
    "GraphRepairError", "TraceError", "ShapeError", "UnsupportedOpError", "MismatchError",
    "CheckError", "CheckpointError", "DataError", "LoadError", "ExportError", "NumericError",
    "OutputError",
]
__version__ = "0.1.0"
