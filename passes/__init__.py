"""Generic graph surgery on torch.fx GraphModules and ONNX export.

Nothing here knows about permutations or model merging; ``graphrepair`` builds on it.

- ``insert_observers`` / ``observers`` / ``CrossMoments``: streaming per-channel statistics.
- ``insert_resets`` / ``resets`` / ``set_mode``: REPAIR's reset nodes.
- ``fold_affines``: fold resets and per-channel affines into the producing op.
- ``fold_batchnorms``: fold eval-mode BatchNorm into the preceding conv / linear.
- ``export_onnx``: ONNX export verified with onnxruntime, written atomically.
"""

from passes.base import PassResult
from passes.errors import ExportFailedError, ExportVerificationError, PassError
from passes.export_onnx import ExportReport, export_onnx, flatten_outputs
from passes.fold_affine import fold_affines
from passes.fold_batchnorm import fold_batchnorms
from passes.modules import (
    Producer,
    describe_producer,
    get_module,
    insert_module_after,
    parent_and_attr,
    producer_kind,
    replace_module,
)
from passes.reset import ChannelAffine, Reset, ResetSpec, insert_resets, resets, set_mode
from passes.track import (
    ChannelObserver,
    CrossMoments,
    ObserverSpec,
    channel_matrix,
    insert_observers,
    observers,
)

__all__ = [
    "ChannelAffine",
    "ChannelObserver",
    "CrossMoments",
    "ExportFailedError",
    "ExportReport",
    "ExportVerificationError",
    "ObserverSpec",
    "PassError",
    "PassResult",
    "Producer",
    "Reset",
    "ResetSpec",
    "channel_matrix",
    "describe_producer",
    "export_onnx",
    "flatten_outputs",
    "fold_affines",
    "fold_batchnorms",
    "get_module",
    "insert_module_after",
    "insert_observers",
    "insert_resets",
    "observers",
    "parent_and_attr",
    "producer_kind",
    "replace_module",
    "resets",
    "set_mode",
]
