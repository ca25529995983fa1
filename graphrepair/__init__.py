"""graphrepair: discover permutation symmetries of any PyTorch model, align and merge models with
REPAIR through graph passes, and export verified ONNX."""

from .discover import discover
from .errors import (CheckError, CheckpointError, DataError, ExportError, GraphRepairError,
                     LoadError, MismatchError, NumericError, ShapeError, TraceError,
                     UnsupportedOpError)
from .permute import permute
from .spec import FixedAxis, Group, PermutationSpec
from .trace import trace

__all__ = [
    "discover", "permute", "trace", "PermutationSpec", "Group", "FixedAxis",
    "GraphRepairError", "TraceError", "ShapeError", "UnsupportedOpError", "MismatchError",
    "CheckError", "CheckpointError", "DataError", "LoadError", "ExportError", "NumericError",
]
__version__ = "0.1.0"
