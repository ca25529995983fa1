"""Model + example inputs -> a torch.fx GraphModule with the shape of every value.

``torch.fx.symbolic_trace`` is tried first: its graph calls the model's own modules, so module
parameters keep their names. When it fails (Python control flow on shapes, Hugging Face models),
``torch.export.export(...).module()`` gives a graph of ATen ops with parameters as ``get_attr``
nodes under the same qualified names. Both kinds are run once on the example inputs by an
interpreter that records, for every node, the shape and dtype of what it produced.

Example inputs are an ``Inputs`` (``io/inputs.py``): a tensor, a tuple of tensors (positional
arguments) or a dict of tensors (keyword arguments, as Hugging Face models take them). Floating
inputs are cast to the model's floating dtype (a bfloat16 model is traced on bfloat16 inputs),
and all are moved to its device. An fx graph's placeholders are the forward's parameters, filled
by name; an exported graph flattens ``(args, kwargs)`` with its own input spec.

Hugging Face models are traced as they are configured, except that caching is off while tracing
(``config.use_cache = False``: with a cache their forward builds Python cache objects that neither
tracer follows); the caller's config is restored after, and the spec's notes say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from graphrepair.errors import DataError, ShapeError, TraceError, listed
from graphrepair.io.inputs import Inputs
from graphrepair.models import MODULE_TABLES, check_module, eval_mode, given_back
from graphrepair.runtime import model_device, model_dtype


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
    notes: tuple[str, ...] = ()  # what tracing changed for the duration of the trace, and why
    signature: tuple = ()  # the example's Inputs.signature(): names, dtypes, shapes


def example_inputs_for(model: nn.Module, example_inputs, where: str = "example_inputs") -> Inputs:
    """``example_inputs`` (a tensor, a tuple of tensors, a dict of tensors, an Inputs) as Inputs on
    the model's device, floating tensors in the model's floating dtype (integer ids stay); a
    DataError for any other form, for a keyword the forward does not take and for an argument it
    needs that the input does not give (``check_arguments``)."""
    inputs = Inputs.of(example_inputs, where)
    check_arguments(model, inputs, where)
    return inputs.to(model_device(model), model_dtype(model))


def check_arguments(model: nn.Module, inputs: Inputs, where: str = "example_inputs") -> None:
    """DataError naming a keyword input that ``model.forward`` does not take, or an argument it
    needs that the input does not give. A forward with ``**kwargs`` takes any keyword, except a
    Hugging Face model's (it has a ``config`` and a ``main_input_name``): its ``**kwargs`` carry
    options such as ``output_attentions``, and a data array by another name (``attention_masks``)
    would be ignored without a word. A forward of several inputs fed batches ``(x, y)`` reads ``y``
    as the labels (``split_batch``): the message says how to give several inputs."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    name = type(model).__name__
    if inputs.kwargs:
        hugging_face = hasattr(model, "config") and hasattr(model, "main_input_name")
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or hugging_face:
            names = [n for n, p in params.items()
                     if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
            for key in inputs.kwargs:
                if key not in names:
                    raise DataError(f"{where}: '{key}' is not an argument of {name}.forward "
                                    f"(it takes {', '.join(names) or 'no keyword argument'}); rename or drop it")
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    missing = [n for i, (n, p) in enumerate(params.items())
               if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_POSITIONAL
               and p.kind is not inspect.Parameter.VAR_KEYWORD and n not in inputs.kwargs
               and not (p.kind in positional and i < len(inputs.args))]
    if missing:
        given = f"{len(inputs.args)} positional tensor{'s' if len(inputs.args) != 1 else ''}" + (
            f" and {', '.join(inputs.kwargs)}" if inputs.kwargs else "")
        raise DataError(
            f"{where}: {name}.forward needs {', '.join(repr(n) for n in missing)} too, and the input gives "
            f"{given}. A batch (a, b) is read as (input, labels); give a forward of several inputs each "
            f"batch as ((a, b), labels) or (a, b) inside a tuple: ((a, b),)")


def as_tuple(example_inputs) -> tuple:
    """The positional tensors of ``example_inputs`` (a DataError when it holds keyword inputs:
    use ``Inputs.of`` for those)."""
    inputs = Inputs.of(example_inputs)
    if inputs.kwargs:
        raise DataError("these example inputs hold keyword inputs "
                        f"({', '.join(inputs.kwargs)}); this call takes positional tensors only")
    return inputs.args


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[list[str]]:
    """Caching off for the duration of a ``with`` block: every Hugging Face config of the model
    (any submodule's ``config`` with ``use_cache`` set) gets ``use_cache = False``, and its own
    value back after, whatever happens. Yields the notes saying what was changed (empty when
    nothing was)."""
    changed: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        if getattr(cfg, "use_cache", None) is True:
            changed.append((cfg, cfg.use_cache))
    notes = []
    try:
        for cfg, _ in changed:
            cfg.use_cache = False
        if changed:
            notes.append(f"{type(model).__name__} was traced with use_cache=False (a key/value cache is "
                         f"state for generation, which the tracers cannot follow; outputs are the same); "
                         f"its config was restored after")
        yield notes
    finally:
        for cfg, value in changed:
            cfg.use_cache = value


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
                f"Check the shape and dtype of the example inputs."
            )
            raise ShapeError(self.error) from e
        self.info[n.name] = value_info(out)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# torch.nn's transformer layers, which symbolic tracing would keep whole as leaves (torch.nn's own
# modules are leaves) though no rule reads them: traced through, their linear layers, attention and
# norms get their own rules (nn.TransformerEncoder's channels were all fixed, "no rule"). Their
# forwards test their input's dimensions in Python, which stops symbolic tracing: torch.export
# traces such a model (``trace``'s fallback), or, where torch.export fails, symbolic tracing
# keeps them whole as before (``_with_leaves``)
_TRACED_THROUGH = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                   nn.TransformerDecoderLayer, nn.Transformer)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, _TRACED_THROUGH) and super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace``, tracing through ``_TRACED_THROUGH``."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _with_leaves(model: nn.Module) -> torch.fx.GraphModule | None:
    """For a model holding ``_TRACED_THROUGH`` layers, which symbolic tracing cannot trace
    through: its symbolic trace with them kept whole, as ``torch.fx.symbolic_trace`` keeps them
    (None for any other model, or where that fails too)."""
    if not any(isinstance(m, _TRACED_THROUGH) for m in model.modules()):
        return None
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:
        return None


def trace(model: nn.Module, example_inputs) -> Traced:
    """Trace ``model`` and record every node's output shape on ``example_inputs``."""
    check_module(model)
    inputs = example_inputs_for(model, example_inputs)
    name = type(model).__name__
    fx_error = None
    before = _registered(model)
    # given_back: symbolic tracing runs the forward, which may assign its buffers (a Proxy then)
    with given_back(model), eval_mode(model), torch.no_grad(), traceable(model) as notes:
        try:
            gm = _symbolic_trace(model)
            kind = "fx"
            placeholders = _placeholders(gm, inputs)
        except Exception as e:
            fx_error = _first_line(e)
            try:
                gm = _export(model, inputs)
                kind = "export"
                placeholders = _placeholders(gm, inputs)
            except Exception as e2:
                gm = _with_leaves(model)
                if gm is None:
                    raise TraceError(
                        f"cannot trace {name}: torch.fx.symbolic_trace failed ({fx_error}) and "
                        f"torch.export.export failed ({_first_line(e2)}). Make the forward traceable "
                        f"(no data-dependent Python control flow) or check the example input."
                    ) from e2
                # torch.nn's transformer layers kept whole, as symbolic_trace keeps them: their
                # channels fixed ("no rule"), the rest of the model discovered
                kind = "fx"
                placeholders = _placeholders(gm, inputs)
                notes.append(f"torch.export failed ({_first_line(e2)}): traced with torch.nn's "
                             f"transformer layers kept whole, their channels fixed")
        owners = {path for kind, path in before if kind == "submodule"} | {""}
        added = sorted((kind, path) for kind, path in _registered(model) - before
                       if path.rpartition(".")[0] in owners)  # (not the contents of a new submodule)
        if added:  # (given_back drops them again; the traced graph would read what the model lacks)
            raise TraceError(
                f"the forward of {name} registers {listed(f'{kind} {path!r}' for kind, path in added)} "
                f"when called (it builds itself on its first call): call the model once on an example "
                f"before graphrepair traces it")
        recorder = _record(gm, name, placeholders)
        if recorder is None:  # the graph writes into its inputs: it copies them first, and is run again
            _copy_inputs(gm, placeholders)
            notes.append("the forward writes into its inputs (an in-place op on an argument): the graph "
                         "copies them first, so that the caller's data and the other model's input stay "
                         "as given")
            recorder = _record(gm, name, placeholders)
    # the graph's buffers are all in its state dict, as symbolic tracing registers them (torch.export
    # keeps a non-persistent buffer so, which a copy of the graph, GraphModule's deepcopy, does not:
    # the copy's state dict then had a tensor the traced graph's had not); those the model holds
    # in no state dict are the graph's own, as traced
    for m in gm.modules():
        m._non_persistent_buffers_set.clear()
    own = frozenset(gm.state_dict()) - frozenset(model.state_dict())
    return Traced(gm=gm, kind=kind, model_name=name, info=recorder.info, fx_error=fx_error, graph_own=own,
                  notes=tuple(notes), signature=inputs.signature())


def _registered(model: nn.Module) -> set[tuple[str, str]]:
    """(kind, path) of every parameter, buffer and submodule ``model`` holds (what a forward that
    builds itself on its first call adds to)."""
    kinds = tuple(zip(MODULE_TABLES, ("parameter", "buffer", "submodule")))
    return {(kind, f"{path}.{k}" if path else k) for path, m in model.named_modules()
            for table, kind in kinds for k in vars(m)[table]}


def _record(gm: torch.fx.GraphModule, name: str, placeholders: list) -> _ShapeRecorder | None:
    """``gm`` run on copies of ``placeholders``, every node's output recorded; None where the run
    wrote into one of them (its version counter moved)."""
    own = [p.clone() if isinstance(p, torch.Tensor) else p for p in placeholders]
    versions = [p._version if isinstance(p, torch.Tensor) else None for p in own]
    recorder = _ShapeRecorder(gm, name)
    try:
        recorder.run(*own)
    except Exception as e:
        if recorder.error is not None:  # fx appends its own context to the message: drop it
            raise ShapeError(recorder.error) from e.__cause__
        raise
    if any(v is not None and p._version != v for p, v in zip(own, versions)):
        return None
    return recorder


def _copy_inputs(gm: torch.fx.GraphModule, placeholders: list) -> None:
    """``gm`` reading copies of its tensor inputs (``clone`` after the placeholders): an in-place op
    on an argument then writes into the copy."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(nodes[-1]):
        for node, value in reversed(list(zip(nodes, placeholders))):
            if isinstance(value, torch.Tensor):
                copy_ = gm.graph.call_method("clone", (node,))
                node.replace_all_uses_with(copy_, delete_user_cb=lambda user, c=copy_: user is not c)
    gm.graph.lint()
    gm.recompile()


def _placeholders(gm: torch.fx.GraphModule, inputs: Inputs) -> list:
    """The values of ``gm``'s placeholders, in order, for one call ``gm(*args, **kwargs)``: an
    exported graph flattens ``(args, kwargs)`` with its input spec; an fx graph's placeholders are
    the forward's parameters (keywords filled by name, defaults for the rest)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        import torch.fx._pytree as fx_pytree

        try:
            return list(fx_pytree.tree_flatten_spec((inputs.args, dict(inputs.kwargs)), info.in_spec))
        except Exception as e:
            raise ShapeError(f"the example inputs ({inputs.describe()}) do not fit the traced graph's "
                             f"inputs: {_first_line(e)}") from e
    if not inputs.kwargs:
        return list(inputs.args)
    try:
        bound = inspect.signature(gm.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError as e:
        raise DataError(f"the example inputs ({inputs.describe()}) do not fit the forward's arguments: {e}") from e
    bound.apply_defaults()
    return list(bound.arguments.values())


def _dynamic_batch(model: nn.Module, inputs: Inputs):
    """torch.export's dynamic_shapes for ``inputs``: axis 0 of every tensor left to the exporter
    (Dim.AUTO), keyed by the forward's argument names when there are keyword inputs."""
    def spec(t):
        return {0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.ndim > 0 else None

    if not inputs.kwargs:
        return tuple(spec(a) for a in inputs.args)
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    out = {}
    params = inspect.signature(model.forward).parameters
    for key, value in bound.arguments.items():
        kind = params[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[key] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[key] = {k: spec(v) for k, v in value.items()}
        else:
            out[key] = spec(value)
    return out


def _export(model: nn.Module, inputs: Inputs) -> torch.fx.GraphModule:
    """torch.export's graph with the batch axis left dynamic, so that the graph runs on batches of
    any size (a statically exported graph guards on the example's batch size); static when the
    model pins its batch size."""
    args, kwargs = inputs.args, dict(inputs.kwargs)
    try:
        dynamic = _dynamic_batch(model, inputs)
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False).module()
    except Exception:
        return torch.export.export(model, args, kwargs, strict=False).module()
