"""Generic graph surgery on torch.fx GraphModules and ONNX export.

Nothing here knows about permutations or model merging; ``graphrepair`` builds on it.

- ``moments``: ``ChannelSums`` / ``CrossMoments``, streaming per-channel sums and cross products.
- ``observe``: ``insert_observers`` / ``observers``, identity modules that stream a node's moments.
- ``pair`` / ``pair_tap``: ``pair_graph`` runs two models of one graph side by side, node by node,
  with taps (``PairTap``) that see both values of a node (joint statistics without holding
  activations), and ``bind_pair`` / ``unbind_pair`` point a paired module at other models and taps
  of the same graph; ``in_place_ops`` says whether a graph may write into its inputs.
- ``insert_resets`` / ``resets`` / ``set_mode``: REPAIR's reset nodes.
- ``fold_affines``: fold resets and per-channel affines into the producing op; ``refold`` plays a
  recorded fold again on new weights of the same graph.
- ``fold_batchnorms``: fold eval-mode BatchNorm into the preceding conv / linear.
- ``export_verified`` / ``export_onnx``: ONNX export verified with onnxruntime before anything is
  written (the caller makes the write atomic).
"""

from passes.base import PassResult
from passes.errors import ExportFailedError, ExportVerificationError, PassError
from passes.export_onnx import ExportReport, VerifiedExport, export_onnx, export_verified, flatten_outputs
from passes.fold_affine import FoldStep, fold_affines, refold
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
from passes.pair import bind_pair, pair_graph, unbind_pair
from passes.reset import ChannelAffine, Reset, ResetSpec, insert_resets, resets, set_mode
from passes.moments import ChannelSums, CrossMoments, channel_matrix
from passes.observe import ChannelObserver, ObserverSpec, insert_observers, observers
from passes.pair_tap import PairTap, TapView

__all__ = [
    "ChannelAffine",
    "ChannelObserver",
    "ChannelSums",
    "CrossMoments",
    "ExportFailedError",
    "ExportReport",
    "ExportVerificationError",
    "FoldStep",
    "ObserverSpec",
    "PairTap",
    "PassError",
    "PassResult",
    "Producer",
    "Reset",
    "ResetSpec",
    "TapView",
    "VerifiedExport",
    "bind_pair",
    "channel_matrix",
    "describe_producer",
    "export_onnx",
    "export_verified",
    "flatten_outputs",
    "fold_affines",
    "fold_batchnorms",
    "get_module",
    "insert_module_after",
    "insert_observers",
    "insert_resets",
    "observers",
    "pair_graph",
    "parent_and_attr",
    "producer_kind",
    "refold",
    "replace_module",
    "resets",
    "set_mode",
    "unbind_pair",
]
