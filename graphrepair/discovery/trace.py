"""Model + example inputs -> a torch.fx GraphModule with the shape of every value.

``torch.fx.symbolic_trace`` is tried first: its graph calls the model's own modules, so module
parameters keep their names. When it fails (Python control flow on shapes, Hugging Face models),
``torch.export.export(...).module()`` gives a graph of ATen ops with parameters as ``get_attr``
nodes under the same qualified names. Both kinds are run once on the example inputs by an
interpreter that records, for every node, the shape and dtype of what it produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from graphrepair.errors import ShapeError, TraceError
from graphrepair.io.inputs import Inputs
from graphrepair.models import eval_mode, given_back


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class Traced:
    """A traced model: the graph, how it was obtained, and what every node produced."""

    gm: torch.fx.GraphModule
    kind: str  # "fx" (symbolic_trace) or "export" (torch.export)
    model_name: str
    info: dict[str, Any] = field(default_factory=dict)  # node name -> TensorInfo | tuple | None
    fx_error: str | None = None  # why symbolic_trace was not used, when it was not
    # state-dict keys of ``gm`` that are in no state dict of the model: tensors the trace made
    # constants of (torch.fx's ``_tensor_constantN``) and non-persistent buffers, which a
    # GraphModule keeps as ordinary buffers. They belong to the graph and keep their traced values.
    graph_own: frozenset = frozenset()


def as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, Inputs) and not example_inputs.kwargs:
        return example_inputs.args
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def value_info(value: Any) -> Any:
    """TensorInfo for a tensor, a tuple of infos for a tuple/list, None for anything else."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(value_info(v) for v in value)
    return None


def output_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output, in a fixed order (tuples, lists, dicts, dataclasses and
    Hugging Face ModelOutputs are walked)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for k in value for t in output_tensors(value[k])]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in output_tensors(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    return []


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, model_name: str):
        super().__init__(gm)
        self.info: dict[str, Any] = {}
        self.model_name = model_name
        self.error: str | None = None  # fx appends context to raised errors: keep ours

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:  # the example input does not fit: name the op that failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.error = (
                f"the example input does not fit {self.model_name}: node '{n.name}' "
                f"({n.format_node()}) failed with {type(e).__name__}: {first}. "
                f"Check the shape of the example inputs."
            )
            raise ShapeError(self.error) from e
        self.info[n.name] = value_info(out)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def trace(model: nn.Module, example_inputs) -> Traced:
    """Trace ``model`` and record every node's output shape on ``example_inputs``."""
    args = as_tuple(example_inputs)
    name = type(model).__name__
    fx_error = None
    # given_back: symbolic tracing runs the forward, which may assign its buffers (a Proxy then)
    with given_back(model), eval_mode(model), torch.no_grad():
        try:
            gm = torch.fx.symbolic_trace(model)
            kind = "fx"
        except Exception as e:
            fx_error = _first_line(e)
            try:
                gm = _export(model, args)
                kind = "export"
            except Exception as e2:
                raise TraceError(
                    f"cannot trace {name}: torch.fx.symbolic_trace failed ({fx_error}) and "
                    f"torch.export.export failed ({_first_line(e2)}). Make the forward traceable "
                    f"(no data-dependent Python control flow) or check the example input."
                ) from e2
        recorder = _ShapeRecorder(gm, name)
        try:
            recorder.run(*args)
        except Exception as e:
            if recorder.error is not None:  # fx appends its own context to the message: drop it
                raise ShapeError(recorder.error) from e.__cause__
            raise
    own = frozenset(gm.state_dict()) - frozenset(model.state_dict())
    return Traced(gm=gm, kind=kind, model_name=name, info=recorder.info, fx_error=fx_error, graph_own=own)


def _export(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    """torch.export's graph with the batch axis left dynamic, so that the graph runs on batches of
    any size (a statically exported graph guards on the example's batch size); static when the
    model pins its batch size."""
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.ndim > 0 else None
                    for a in args)
    try:
        return torch.export.export(model, args, dynamic_shapes=dynamic, strict=False).module()
    except Exception:
        return torch.export.export(model, args, strict=False).module()
