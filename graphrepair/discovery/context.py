"""What a rule sees while discovery walks the graph: the ``Context``.

The context holds the axis solver, the traced shapes, the axis expressions of every value and
parameter seen so far, and the notes that become the spec (fixed axes with their reasons, the joins
of residual streams, concatenations and gates). A rule reads the node's arguments by name, from the
op's schema (``arg``), so that a positional and a keyword call mean the same.
"""

from __future__ import annotations

import typing
import warnings
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.operator_schemas import normalize_function, normalize_module

from graphrepair.discovery import axes as ax, parametrized
from graphrepair.discovery.axes import Expr, Fixed
from graphrepair.discovery.solver import AxisSolver
from graphrepair.discovery.spec import FixedAxis
from graphrepair.discovery.trace import TensorInfo, Traced

STRUCTURAL = "structural: "  # prefix of reasons for axes that are never channel axes


class Context:
    """What a rule sees: the solver, shapes, the axes of values and parameters, and notes."""

    def __init__(self, traced: Traced, aliases: dict[str, str], parametrised: dict | None = None,
                 state_shapes: dict[str, tuple] | None = None):
        self.traced = traced
        # weights computed from others (``parametrized.table``) and the state dict's shapes
        self.parametrised = parametrised or {}
        self.state_shapes = state_shapes or {}
        self.gm = traced.gm
        self.solver = AxisSolver()
        self.values: dict[str, Any] = {}  # node name -> list[Expr] | tuple of those | None
        self.params: dict[str, list[Expr]] = {}  # canonical state_dict key -> axes
        self.aliases = aliases  # state_dict key -> canonical key (tied weights share one)
        self.origins: list[FixedAxis] = []  # where non-structural fixing started
        self.joins: dict[str, str] = {}  # node name -> "residual" | "concat" | "gate"
        self.node: torch.fx.Node | None = None
        self._named: dict[str, Any] | None = None  # the node's arguments by name (``named_args``)
        self._touched: list[str] = []  # parameters the node's rule has read (fixed on rejection)
        self.model: nn.Module | None = None  # the model traced (names of what no state dict holds)
        self.unheld_table: dict | None = None  # ``models.unheld_tensors(model)``, made when first needed

    def begin(self, node: torch.fx.Node) -> None:
        """Start the rule of ``node``."""
        self.node = node
        self._named = None
        self._touched = []

    # -- shapes --------------------------------------------------------------------------------
    def info(self, arg) -> Any:
        return self.traced.info.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def shape(self, arg) -> tuple[int, ...] | None:
        i = self.info(arg)
        return i.shape if isinstance(i, TensorInfo) else None

    def out_shape(self) -> tuple[int, ...]:
        return self.shape(self.node)

    # -- axes of values --------------------------------------------------------------------------
    def axes(self, arg) -> list[Expr] | None:
        """Axis expressions of a tensor-valued argument, or None for anything else."""
        if isinstance(arg, torch.fx.Node):
            v = self.values.get(arg.name)
            return v if isinstance(v, list) else None
        return None

    def param(self, key: str, shape: tuple[int, ...]) -> list[Expr]:
        """The axes of the module tensor ``key`` a rule reads. One the state dict does not hold
        and no known parametrisation computes (a tensor attribute, or one a forward pre-hook
        makes from others) cannot carry a permutation: its axes are fixed, as a non-persistent
        buffer's read by the graph (``discover._get_attr_axes``)."""
        key = self.aliases.get(key, key)
        self._touched.append(key)
        if key not in self.params:
            if self.state_shapes and key not in self.state_shapes and key not in self.parametrised:
                self.params[key] = self.unheld(self.node.name, shape, (
                    f"'{key}' is not in the state dict (a tensor attribute, or one a forward "
                    f"pre-hook computes from others): permutations and merges cannot carry it"))
                return self.params[key]
            self.params[key] = [self.solver.fresh(s) for s in shape]
            if key in self.parametrised:  # its originals move with it, or it is fixed
                parametrized.link(self, self.parametrised[key], self.params[key])
        return self.params[key]

    def unheld(self, where: str, shape: tuple[int, ...], reason: str) -> list[Expr]:
        """Fixed axes of a tensor no state dict holds (permutations and merges cannot carry it),
        recorded as origins at node ``where`` for ``spec.fixed``."""
        for d, s in enumerate(shape):
            if s > 1:
                self.origins.append(FixedAxis(where, d, s, reason, "node"))
        return [Fixed(s, reason) for s in shape]

    def fresh(self, size: int) -> Expr:
        return self.solver.fresh(size)

    def fresh_axes(self, shape) -> list[Expr]:
        return [self.solver.fresh(s) for s in shape]

    def fixed_axes(self, shape, reason: str) -> list[Expr]:
        return [Fixed(s, reason) for s in shape]

    def unify(self, a: Expr, b: Expr, why: str | None = None) -> None:
        self.solver.unify(a, b, why or f"node {self.node.name}")

    def fix(self, e: Expr, reason: str, axis: int | None = None, where: str | None = None,
            structural: bool = False, record: bool = True) -> None:
        """Fix ``e``; non-structural fixings are recorded as origins for ``spec.fixed``."""
        if record and not structural and e.size > 1 and not ax.is_fixed(self.solver.resolve(e)):
            self.origins.append(FixedAxis(where or self.node.name, -1 if axis is None else axis,
                                          e.size, reason, "node"))
        self.solver.fix(e, (STRUCTURAL if structural else "") + reason)

    def fix_all(self, reason: str) -> None:
        """The conservative fallback: every axis of every tensor input, and of every parameter the
        node's rule has read (a module's weights), is fixed."""
        for a in tensor_args(self.node):
            v = self.values.get(a.name)
            for exprs in (v if isinstance(v, tuple) else (v,)):
                for d, e in enumerate(exprs if isinstance(exprs, list) else []):
                    self.fix(e, reason, d, a.name)
        if self.node.op == "call_module":  # the module's own weights, read or not by the rule
            m = self.module()
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                self.param(f"{self.node.target}.{name}", tuple(t.shape))
        for key in dict.fromkeys(self._touched):
            for d, e in enumerate(self.params[key]):
                self.fix(e, reason, d, key)

    # -- arguments by name ------------------------------------------------------------------------
    def named_args(self) -> dict[str, Any] | None:
        """The node's arguments by parameter name, defaults filled in, from the op's schema (ATen
        and torch functions, methods of torch.Tensor that have a torch function, torch.nn modules,
        Python functions by their signature); None when no schema is known."""
        if self._named is None:
            self._named = _normalize(self.gm, self.node, self.info) or {}
        return self._named or None

    def arg(self, name: str, default=None, index: int | None = None):
        """Argument ``name`` of the node. Read from the schema when there is one; otherwise from
        the keyword, or from position ``index`` when the op has no schema to name it."""
        named = self.named_args()
        if named is not None:
            return named.get(name, default)
        n = self.node
        if name in n.kwargs:
            return n.kwargs[name]
        if index is not None and len(n.args) > index:
            return n.args[index]
        return default

    def input(self):
        """The first argument (the tensor a module or a method is called on)."""
        n = self.node
        return n.args[0] if n.args else self.arg("input")

    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def join(self, kind: str) -> None:
        self.joins[self.node.name] = kind


def _arg_type(value, info) -> Any:
    """The Python type of an argument, as ``normalize_function`` matches it against overloads."""
    if isinstance(value, torch.fx.Node):
        i = info(value)
        if isinstance(i, TensorInfo):
            return torch.Tensor
        return typing.List[torch.Tensor] if isinstance(i, tuple) else int  # noqa: UP006 (fx matches typing forms)
    if isinstance(value, (list, tuple)):
        kinds = {_arg_type(v, info) for v in value}
        return typing.List[kinds.pop()] if len(kinds) == 1 else type(value)  # noqa: UP006
    return type(value)


def _normalize(gm: torch.fx.GraphModule, node: torch.fx.Node, info) -> dict[str, Any] | None:
    """``normalize_function``/``normalize_module`` of torch.fx, with the argument types given when
    the schema match is ambiguous without them (``torch.max(x, 1)`` vs ``torch.max(x, y)``)."""
    args, kwargs = node.args, node.kwargs
    try:
        if node.op == "call_module":
            found = normalize_module(gm, node.target, args, kwargs, normalize_to_only_use_kwargs=True)
            return dict(found.kwargs) if found is not None else None
        target = node.target
        if node.op == "call_method":
            target = getattr(torch, node.target, None)
            if not callable(target):
                return None
        elif node.op != "call_function":
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
            except RuntimeError:  # ambiguous: name the types
                found = normalize_function(
                    target, args, kwargs, arg_types=tuple(_arg_type(a, info) for a in args),
                    kwarg_types={k: _arg_type(v, info) for k, v in kwargs.items()},
                    normalize_to_only_use_kwargs=True)
    except Exception:  # no schema, or none that matches: the rule reads keywords and positions
        return None
    return dict(found.kwargs) if found is not None else None


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


_TRUSTED = ("torch", "_operator", "operator", "builtins", "math")


def op_name(node: torch.fx.Node) -> str:
    """A canonical op name shared by the module-call, functional and ATen forms of an op.

    Functions from outside torch (and Python's operator/math/builtins) are named with their module
    (``torchvision.ops.stochastic_depth.stochastic_depth``): a user's function that happens to be
    called ``linear`` must not get the rule of ``F.linear``."""
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    name = getattr(t, "__name__", str(t))
    where = getattr(t, "__module__", None)
    if where and where.split(".")[0] not in _TRUSTED:
        return f"{where}.{name}"
    return {"iadd": "add", "isub": "sub", "imul": "mul", "truediv": "div", "itruediv": "div",
            "floordiv": "floor_divide", "matmul": "matmul"}.get(name, name)


def is_aten(node: torch.fx.Node) -> bool:
    return isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
