"""The one place for node <-> module access, and for recognising the op that produces a tensor.

Module access: ``get_module`` (the module a ``call_module`` node calls), ``parent_and_attr``,
``replace_module``, ``insert_module_after`` (how ``torch.ao.quantization`` inserts observers: a
unique prefixed name, ``setattr`` on the GraphModule, ``graph.inserting_after``, ``create_node``,
then every former user of the node reads the new node instead).

Producers: ``describe_producer(gm, node)`` says whether ``node``'s value is the output of a
linear / conv / conv_transpose / batchnorm op and where that op keeps its weight and bias. Both
graph forms are recognised:

- ``call_module`` nodes calling nn.Linear, nn.ConvNd, nn.ConvTransposeNd, nn.BatchNormNd
  (``torch.fx.symbolic_trace``);
- ``call_function`` nodes (``torch.nn.functional`` or ATen, as in
  ``torch.export.export(model, args).module()``) whose weights arrive through ``get_attr`` nodes.

Axis conventions of the output tensor's channel axis and of the stored weight's output axis:

============== ================== ======================================= ===============
kind           output channel     stored weight                            output axis
============== ================== ======================================= ===============
linear         last axis (-1)     (out, in)                                 0
addmm / mm     last axis (-1)     (in, out), or t()/permute([1,0]) of       1 (0 through
               (2-D output)       an (out, in) parameter                    the transpose)
conv           1                  (out, in/groups, k...)                    0
conv_transpose 1                  (in, out/groups, k...): output channel    1 (per group)
                                  g*out/groups + j is weight[g-th block of
                                  in, j]
batchnorm      1                  gamma (C,), beta (C,)                     0
============== ================== ======================================= ===============
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from passes.base import annotate, annotation
from passes.errors import PassError

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Module access


def get_module(gm: GraphModule, node: Node) -> nn.Module:
    """The module a ``call_module`` node calls."""
    if node.op != "call_module":
        raise PassError(f"node {node.format_node()} is a {node.op} node, not call_module")
    try:
        return gm.get_submodule(node.target)
    except AttributeError as exc:
        raise PassError(
            f"node {node.format_node()} calls {node.target!r}, which is not a submodule of the "
            "GraphModule; was the module deleted without updating the graph?"
        ) from exc


def parent_and_attr(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """Split ``"layer1.0.conv1"`` into (the module ``layer1.0``, ``"conv1"``)."""
    prefix, _, attr = qualname.rpartition(".")
    try:
        parent = gm.get_submodule(prefix) if prefix else gm
    except AttributeError as exc:
        raise PassError(f"no submodule {prefix!r} on the way to {qualname!r}") from exc
    return parent, attr


def get_attr_value(gm: nn.Module, qualname: str) -> Any:
    """The object at attribute path ``qualname`` (what a ``get_attr`` node reads)."""
    parent, attr = parent_and_attr(gm, qualname)
    if not hasattr(parent, attr):
        raise PassError(f"the GraphModule has no attribute {qualname!r}")
    return getattr(parent, attr)


def replace_module(gm: GraphModule, qualname: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``qualname`` was; returns the old module."""
    parent, attr = parent_and_attr(gm, qualname)
    old = getattr(parent, attr, None)
    if not isinstance(old, nn.Module):
        raise PassError(f"{qualname!r} is not a submodule of the GraphModule; nothing to replace")
    setattr(parent, attr, new)
    return old


def unique_name(gm: nn.Module, prefix: str) -> str:
    """The first free attribute name ``{prefix}_{i}`` on ``gm`` (i = 0, 1, ...)."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def module_device(gm: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``gm`` (CPU for a module without tensors)."""
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block, each flag restored after it.
    A model already in eval mode throughout is left as it is, and only the flags the block
    changed are written back (a flag set through ``nn.Module.__setattr__`` costs about 1.1 us:
    the paper MLP's pair, with its taps, has about 90 modules, and a merge runs several passes)."""
    flags = {m: m.training for model in models for m in model.modules()}
    for model in models:
        if any(m.training for m in model.modules()):
            model.eval()
    try:
        yield
    finally:
        restore_training(flags)


def restore_training(flags: dict[nn.Module, bool]) -> None:
    """Each module's training flag as ``flags`` holds it, written only where it changed."""
    for m, training in flags.items():
        if m.training is not training:
            m.training = training


# ``full_precision``'s blocks open now in this process (any thread) and the settings the first one
# found; the flags are process-wide, so the first block in sets them and the last one out restores
_precision_lock = threading.Lock()
_precision_blocks = 0
_precision_saved: tuple | None = None


def _precision_api_is_new() -> bool:
    """torch >= 2.9's per-backend ``fp32_precision`` (mixing it with the legacy flags is an error there)."""
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _set_ieee() -> tuple:
    """Turn TF32 off; returns the settings it found."""
    if _precision_api_is_new():
        saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return saved


def _restore_precision(saved: tuple) -> None:
    if _precision_api_is_new():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """float32 matrix products and convolutions in IEEE float32 inside the block, not TF32, on
    CUDA; the settings are restored after it. cuDNN convolutions default to TF32 on Ampere and
    later (10 mantissa bits): a permuted ResNet-50 then differs from itself by 1e-2 on an H200,
    which is no evidence about the permutation. For checks that compare two computations
    (proofs of permutations, ONNX against torch); a no-op for the CPU.

    The flags are the process's, so blocks of several threads (merges in a thread pool) share
    them: the first block in sets them and the last one out restores what the first found.
    Each block saving and restoring its own left them as the last thread to leave had found
    them, IEEE after all blocks ended when two overlapped (with torch >= 2.9's API, every later
    read of the legacy cuDNN flag then raised, the ONNX exporter's included)."""
    global _precision_blocks, _precision_saved
    with _precision_lock:
        if _precision_blocks == 0:
            _precision_saved = _set_ieee()
        _precision_blocks += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_blocks -= 1
            if _precision_blocks == 0:
                _restore_precision(_precision_saved)
                _precision_saved = None


def named_nodes(gm: GraphModule, names, pass_name: str) -> dict[str, Node]:
    """The nodes of ``gm`` named in ``names``; a PassError naming every missing one."""
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in names if name not in nodes]
    if missing:
        raise PassError(
            f"{pass_name}: no node named {', '.join(map(repr, missing))} in the graph; "
            f"node names are those of gm.graph.nodes (e.g. {', '.join(list(nodes)[:5])})"
        )
    return nodes


def inserted_modules(gm: GraphModule, cls: type) -> dict[str, nn.Module]:
    """The ``cls`` modules that a pass inserted into ``gm``'s graph (``insert_module_after``),
    keyed by the node each follows, as recorded on the inserted node (``annotation(n)["after"]``)."""
    out: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        after = annotation(node).get("after")
        if node.op == "call_module" and after is not None:
            module = get_module(gm, node)
            if isinstance(module, cls):
                out[after] = module
    return out


def insert_module_after(gm: GraphModule, node: Node, module: nn.Module, prefix: str,
                        inserted_by: str = "") -> Node:
    """Call ``module`` on ``node``'s value and make every user of ``node`` read the result.

    The module is registered on ``gm`` under a fresh name ``{prefix}_{i}``; the new node records
    ``{"inserted_by": inserted_by, "after": node.name}`` (``passes.base.annotate``). The caller
    lints and recompiles. Shape metadata (``val``, ``tensor_meta``) is copied to the new node, so
    the module must not change its input's shape.
    """
    if node.op == "output":
        raise PassError(f"cannot insert a module after the output node {node.format_node()}")
    name = unique_name(gm, prefix)
    gm.add_submodule(name, module)
    anchor = node
    if node.op in ("placeholder", "get_attr"):
        # Keep the placeholders together at the top: insert after the last one if it comes later.
        seen = False
        for n in gm.graph.nodes:
            seen = seen or n is node
            if seen and n.op == "placeholder":
                anchor = n
    with gm.graph.inserting_after(anchor):
        new = gm.graph.create_node("call_module", name, (node,), {}, name=name)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    for key in ("val", "tensor_meta"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    annotate(new, inserted_by=inserted_by or prefix, after=node.name)
    return new


def node_rank(node: Node) -> int | None:
    """Number of dimensions of ``node``'s value if shape metadata is known, else None."""
    for key in ("val", "tensor_meta"):
        meta = node.meta.get(key)
        shape = getattr(meta, "shape", None)
        if shape is not None:
            return len(shape)
    return None


# ---------------------------------------------------------------------------------------------
# Producers


@dataclass(frozen=True)
class Arg:
    """Where an argument of a call_function node sits: positional index and keyword name."""

    index: int
    name: str


@dataclass(frozen=True)
class FunctionRule:
    """One row of the producer table for call_function nodes."""

    kind: str
    weight: Arg
    bias: Arg | None
    out_axis: int  # output axis of the weight as the op receives it
    channel_axis: int  # channel axis of the output tensor (-1 = last)
    groups: Arg | None = None
    tuple_output: bool = False  # output is getitem(node, 0)


@dataclass(frozen=True)
class Producer:
    """A recognised op producing a tensor with per-channel output weights.

    ``weight`` / ``bias`` are the raw arguments: for a call_module producer None (the tensors are
    ``module.weight`` / ``module.bias``), for a call_function producer the argument value
    (usually a ``get_attr`` Node, possibly a transpose of one, or None when absent).
    """

    kind: str
    node: Node
    output: Node
    module: nn.Module | None
    rule: FunctionRule | None
    channel_axis: int
    groups: int

    @property
    def is_module(self) -> bool:
        return self.module is not None

    def arg(self, slot: Arg | None) -> Any:
        return None if slot is None else call_arg(self.node, slot)


def call_arg(node: Node, slot: Arg, default: Any = None) -> Any:
    """The value of argument ``slot`` of a call node (positional or keyword)."""
    if slot.index < len(node.args):
        return node.args[slot.index]
    return node.kwargs.get(slot.name, default)


def _overloads(*packets_and_names: tuple[Any, tuple[str, ...]]) -> set[Any]:
    out: set[Any] = set()
    for packet, names in packets_and_names:
        for name in names:
            if name in packet.overloads():
                out.add(getattr(packet, name))
    return out


_W, _B, _IN = Arg(1, "weight"), Arg(2, "bias"), Arg(0, "input")
_LINEAR = FunctionRule("linear", _W, _B, out_axis=0, channel_axis=-1)
_CONV = FunctionRule("conv", _W, _B, out_axis=0, channel_axis=1, groups=Arg(6, "groups"))
_CONVT = FunctionRule("conv_transpose", _W, _B, out_axis=1, channel_axis=1, groups=Arg(6, "groups"))
_BN_ATEN = FunctionRule("batchnorm", _W, _B, out_axis=0, channel_axis=1)

# One row per op: target(s) -> rule. aten.convolution is split by its `transposed` flag below.
_FUNCTION_TABLE: list[tuple[set[Any], FunctionRule]] = [
    # y = x W^T + b, W (out, in)
    ({F.linear, aten.linear.default}, _LINEAR),
    # y = b + x M, M (in, out): aten's decomposition of linear (M = W.t())
    ({aten.addmm.default}, FunctionRule("linear", Arg(2, "mat2"), Arg(0, "self"), 1, -1)),
    # y = x M, M (in, out): linear without bias, decomposed
    ({aten.mm.default}, FunctionRule("linear", Arg(1, "mat2"), None, 1, -1)),
    # conv: weight (out, in/groups, k...)
    (
        {F.conv1d, F.conv2d, F.conv3d}
        | _overloads(*[(getattr(aten, f"conv{d}d"), ("default", "padding")) for d in (1, 2, 3)]),
        _CONV,
    ),
    # transposed conv: weight (in, out/groups, k...), groups at index 6 as for conv
    (
        {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
        | _overloads(
            (aten.conv_transpose1d, ("default",)),
            (aten.conv_transpose2d, ("input",)),
            (aten.conv_transpose3d, ("input",)),
        ),
        _CONVT,
    ),
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    ({F.batch_norm}, FunctionRule("batchnorm", Arg(3, "weight"), Arg(4, "bias"), 0, 1)),
    # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
    ({aten.batch_norm.default}, _BN_ATEN),
    # tuple-returning batch norms: (output, save_mean, save_rstd); output = getitem(node, 0)
    (
        _overloads(
            (aten._native_batch_norm_legit_no_training, ("default",)),
            (aten._native_batch_norm_legit, ("default",)),
            (aten.native_batch_norm, ("default",)),
        ),
        FunctionRule("batchnorm", _W, _B, 0, 1, tuple_output=True),
    ),
]

# aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
_CONVOLUTION = aten.convolution.default
_CONVOLUTION_RULES = {
    False: FunctionRule("conv", _W, _B, 0, 1, groups=Arg(8, "groups")),
    True: FunctionRule("conv_transpose", _W, _B, 1, 1, groups=Arg(8, "groups")),
}


# y = x @ M with M (in, out) a stored 2-D tensor: a linear layer written as a matrix product
# (``x @ self.weight``, ``torch.matmul``); a product of two activations is no producer
_MATMULS = {operator.matmul, torch.matmul, torch.mm, aten.matmul.default}
MATMUL = FunctionRule("linear", Arg(1, "other"), None, 1, -1)


def _stored_ndim(node: Node, qualname: str) -> int | None:
    """The number of axes of the tensor at ``qualname`` in ``node``'s graph module (None where it
    cannot be read)."""
    gm = node.graph.owning_module
    try:
        t = None if gm is None else get_attr_value(gm, qualname)
    except PassError:
        return None
    return t.ndim if isinstance(t, torch.Tensor) else None


def _function_rule(target: Any, node: Node) -> FunctionRule | None:
    if target is _CONVOLUTION:
        transposed = call_arg(node, Arg(6, "transposed"), False)
        return _CONVOLUTION_RULES[bool(transposed)]
    if target in _MATMULS:
        src = trace_tensor_source(node.args[1] if len(node.args) > 1 else None)
        return MATMUL if isinstance(src, TensorSource) and _stored_ndim(node, src.qualname) == 2 else None
    for targets, rule in _FUNCTION_TABLE:
        if target in targets:
            return rule
    return None


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv_transpose" if module.transposed else "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    return None


def describe_producer(gm: GraphModule, node: Node) -> Producer | None:
    """The producer whose output is ``node``'s value, or None if ``node`` is not one we know."""
    if node.op == "call_module":
        module = get_module(gm, node)
        kind = _module_kind(module)
        if kind is None:
            return None
        channel_axis = -1 if kind == "linear" else 1
        groups = getattr(module, "groups", 1)
        return Producer(kind, node, node, module, None, channel_axis, groups)
    if node.op != "call_function":
        return None
    op, output = node, node
    if node.target is operator.getitem:
        src, index = node.args[0], node.args[1]
        if not isinstance(src, Node) or src.op != "call_function" or index != 0:
            return None
        rule = _function_rule(src.target, src)
        if rule is None or not rule.tuple_output:
            return None
        op = src
    else:
        rule = _function_rule(node.target, node)
        if rule is None or rule.tuple_output:
            return None
    groups = int(call_arg(op, rule.groups, 1)) if rule.groups is not None else 1
    return Producer(rule.kind, op, output, None, rule, rule.channel_axis, groups)


def producer_kind(gm: GraphModule, node: Node) -> str | None:
    """"linear", "conv", "conv_transpose" or "batchnorm" if ``node`` is such an op's output."""
    producer = describe_producer(gm, node)
    return None if producer is None else producer.kind


# ---------------------------------------------------------------------------------------------
# Where a function's weight comes from

# Ops that transpose a 2-D tensor: aten.t, permute(w, [1, 0]), transpose(w, 0, 1).
_TRANSPOSES = _overloads((aten.t, ("default",)), (aten.permute, ("default",)), (aten.transpose, ("int",)))


def _is_transpose(node: Node) -> bool:
    if node.op == "call_function" and node.target in _TRANSPOSES:
        if node.target == aten.permute.default:  # permute(self, dims), positional or keyword
            dims = call_arg(node, Arg(1, "dims"))
            return isinstance(dims, (list, tuple)) and list(dims) == [1, 0]
        if node.target == aten.transpose.int:  # transpose(self, dim0, dim1)
            dims = [call_arg(node, Arg(1, "dim0")), call_arg(node, Arg(2, "dim1"))]
            return all(isinstance(d, int) for d in dims) and sorted(d % 2 for d in dims) == [0, 1]
        return True
    if node.op == "call_method" and node.target == "t":
        return True
    return False


@dataclass(frozen=True)
class TensorSource:
    """A stored tensor an op reads: its attribute path on the GraphModule, the nodes that carry it
    to the op (``get_attr`` and possibly one transpose), and whether the op sees it transposed."""

    qualname: str
    nodes: tuple[Node, ...]
    transposed: bool


def trace_tensor_source(arg: Any) -> TensorSource | str:
    """Follow a call_function's weight argument back to a stored tensor, or say why not."""
    if not isinstance(arg, Node):
        return f"the weight is {type(arg).__name__}, not a tensor read from the module"
    if arg.op == "get_attr":
        return TensorSource(str(arg.target), (arg,), False)
    if _is_transpose(arg) and isinstance(arg.args[0], Node) and arg.args[0].op == "get_attr":
        return TensorSource(str(arg.args[0].target), (arg.args[0], arg), True)
    return f"the weight is computed by {arg.format_node()}, not read from a parameter"
