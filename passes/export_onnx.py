"""Export a model to ONNX and keep the file only if onnxruntime agrees with torch.

Steps: ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch axis (axis 0 of every tensor
input, one shared symbol "batch"; traced from the example, repeated to a batch of 2 when its batch
is 1, since torch.export specialises size-1 dimensions) and the weights embedded, into memory;
``onnx.checker.check_model``; onnxruntime sessions (CPUExecutionProvider, plus CUDAExecutionProvider
when torch sees a GPU and onnxruntime offers it) run on the example inputs, on a batch of another
size (2B + 1 rows built from the example: x, x reversed, x[:1]) to prove the batch axis is dynamic,
and on any ``check_inputs``. Every output is compared with torch's:

    |ort - torch| <= atol + rtol * |torch|    elementwise (NaN matches NaN)

Inputs are positional (``args``) and keyword (``kwargs``) tensors, ``model(*args, **kwargs)``; the
ONNX inputs of keyword tensors carry their names and are fed by name.

Outputs are flattened in torch's pytree order (tuples and lists by position, dicts by insertion
order, HF ModelOutput by field), the same order the exporter gives the ONNX outputs; dataclasses
pytree does not know are flattened by field. A model whose output is a type that pytree knows
without keys (diffusers' ``BaseOutput`` classes such as ``UNet2DOutput``) or does not know at all
is exported through a wrapper that returns the flattened tensors as a tuple, in that order.

The model is exported and verified in memory (``export_verified``): nothing reaches the disk unless
onnxruntime agrees. ``export_onnx`` then writes the verified bytes to the path it is given (a write
that fails removes what it wrote). This module does not replace files atomically: a caller that
must never leave a half-written or replaced file (graphrepair's export) writes the verified bytes
through its own atomic mechanism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import inspect
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from passes.errors import ExportFailedError, ExportVerificationError
from passes.modules import eval_mode, full_precision


@dataclass(frozen=True)
class ExportReport:
    """What was written and how it was checked."""

    path: str
    node_count: int
    op_counts: dict[str, int]
    max_abs_diff: float
    providers_checked: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Flattening


def flatten_outputs(value: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors in ``value`` with a readable path each, in pytree order."""
    out: list[tuple[str, torch.Tensor]] = []

    def walk(v: Any, prefix: str) -> None:
        """Types pytree knows without key paths (diffusers' BaseOutput, a Mapping) or not at all:
        mappings by key, dataclasses by field, sequences by position."""
        if isinstance(v, torch.Tensor):
            out.append((prefix, v))
        elif isinstance(v, Mapping):
            for k in v:
                visit(v[k], f"{prefix}[{k!r}]")
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                visit(getattr(v, f.name), f"{prefix}.{f.name}")
        elif isinstance(v, (tuple, list)):
            for i, item in enumerate(v):
                visit(item, f"{prefix}[{i}]")

    def visit(v: Any, prefix: str) -> None:
        try:
            leaves, _ = pytree.tree_flatten_with_path(v)
        except (ValueError, TypeError):
            walk(v, prefix)
            return
        for path, leaf in leaves:
            name = prefix + pytree.keystr(path)
            if isinstance(leaf, torch.Tensor):
                out.append((name, leaf))
            elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
                for f in dataclasses.fields(leaf):
                    visit(getattr(leaf, f.name), f"{name}.{f.name}")

    visit(value, "")
    return out


def keyed_output(value: Any) -> bool:
    """Whether pytree flattens ``value`` with key paths and every leaf is a tensor or nothing
    (what the exporter needs of an output); else the export goes through ``_FlatOutputs``."""
    try:
        leaves, _ = pytree.tree_flatten_with_path(value)
    except (ValueError, TypeError):
        return False
    return all(isinstance(leaf, torch.Tensor) or leaf is None for _, leaf in leaves)


class _FlatOutputs(nn.Module):
    """``model`` called on positional tensors only (the first ``n_args`` its positional inputs,
    the others its keyword inputs ``keys``, in order) and returning the tensors of its output as
    a tuple, in ``flatten_outputs`` order."""

    def __init__(self, model: nn.Module, n_args: int, keys: Sequence[str]):
        super().__init__()
        self.model, self.n_args, self.keys = model, n_args, tuple(keys)

    def forward(self, *flat):
        kwargs = dict(zip(self.keys, flat[self.n_args:]))
        return tuple(t for _, t in flatten_outputs(self.model(*flat[:self.n_args], **kwargs)))


def _input_tensors(args: tuple) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)]


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, batch) -> Any:
    """Axis 0 of every tensor input is ``batch``: a tuple for positional inputs only, else a dict
    keyed by the forward's argument names (as torch.export takes keyword inputs)."""
    def spec(a):
        return pytree.tree_map(lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.ndim > 0 else None, a)

    forward = model.forward
    params = inspect.signature(forward).parameters
    if not kwargs and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
        return spec(args)
    bound = inspect.signature(forward).bind(*args, **kwargs)
    out = {}
    for key, value in bound.arguments.items():
        kind = params[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[key] = {k: spec(v) for k, v in value.items()}
        else:
            out[key] = spec(value)
    return out


def _bigger_batch(args: tuple) -> tuple:
    """The example batch grown from B to 2B + 1 rows: x, x reversed along the batch, x[:1]."""

    def grow(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.ndim > 0:
            return torch.cat([a, a.flip(0), a[:1]], dim=0)
        return a

    return pytree.tree_map(grow, args)


def _export_batch(args: tuple) -> tuple:
    """The inputs the exporter traces with a dynamic batch axis: the example itself, or, when its
    batch is 1, the example repeated to a batch of 2. torch.export specialises every dimension of
    size 0 or 1 to that constant, so a batch-1 example either contradicts the dynamic "batch"
    symbol (``Invalid ranges [2:1]`` where a later op guards on it, e.g. ConvNeXt's and Swin's
    channels-last permutes) or bakes batch 1 into the graph (a ViT's class token expanded to
    ``x.size(0)``), which onnxruntime then refuses for any other batch size. The values do not
    matter to the trace; the verification still runs on the example itself (another batch size
    than the traced one) and on a bigger batch."""
    tensors = [a for a in _input_tensors(args) if a.ndim > 0]
    if not tensors or any(a.shape[0] != 1 for a in tensors):
        return args

    def grow(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.ndim > 0:
            return torch.cat([a, a], dim=0)
        return a

    return pytree.tree_map(grow, args)


# ---------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress logs, graph dumps and deprecation chatter (errors still
    raise, and their message carries the summary)."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch._guards",
             "torch.fx.experimental", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summary(exc: BaseException) -> str:
    """One readable line for an exporter error: the root cause and where in the model it arose."""
    cause = exc.__cause__ or exc
    text = _ANSI.sub("", str(cause)).strip()
    line = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
    where = re.search(r"raised this error:\s*\n\s*(File [^\n]*)", _ANSI.sub("", str(exc)))
    return f"{line} ({where.group(1).strip()})" if where else line


def _default_providers() -> list[str]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append("CUDAExecutionProvider")
    return providers


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _compare(
    ref: list[tuple[str, torch.Tensor]], got: list[np.ndarray], rtol: float, atol: float, where: str
) -> float:
    """Largest |got - ref| over all outputs; raises ExportVerificationError on a mismatch."""
    if len(ref) != len(got):
        raise ExportVerificationError(
            f"{where}: the ONNX model has {len(got)} outputs but torch returned {len(ref)} tensors "
            f"({', '.join(n or '<output>' for n, _ in ref)})",
            max_abs_diff=float("inf"),
        )
    worst = 0.0
    for i, ((name, r), g) in enumerate(zip(ref, got)):
        label = name or "<output>"
        expected = _numpy(r)
        if expected.shape != g.shape:
            raise ExportVerificationError(
                f"{where}: output {i} {label} has shape {g.shape} in onnxruntime but "
                f"{expected.shape} in torch",
                max_abs_diff=float("inf"),
                output_name=label,
                output_index=i,
            )
        e = expected.astype(np.float64)
        a = np.asarray(g).astype(np.float64)
        diff = np.abs(a - e)
        both_nan = np.isnan(a) & np.isnan(e)
        diff = np.where(both_nan, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = diff > atol + rtol * np.abs(np.nan_to_num(e))
        if diff.size and bool(bad.any()):
            flat = int(np.argmax(np.where(bad, diff, -1.0)))
            pos = tuple(int(k) for k in np.unravel_index(flat, diff.shape))
            biggest = float(diff.reshape(-1)[flat])
            raise ExportVerificationError(
                f"{where}: onnxruntime and torch differ on output {i} {label} by {biggest:.3g} at "
                f"index {pos} (torch {e[pos]:.6g}, onnxruntime {a[pos]:.6g}; tolerance "
                f"atol={atol:g} + rtol={rtol:g}*|torch|); the model was not written",
                max_abs_diff=biggest,
                output_name=label,
                output_index=i,
                where=pos,
            )
        if diff.size:
            worst = max(worst, float(diff.max()))
    return worst


def _run_torch(model: nn.Module, inputs: tuple[tuple, dict]) -> list[tuple[str, torch.Tensor]]:
    args, kwargs = inputs
    with torch.no_grad(), full_precision():  # the reference, not TF32 (see full_precision)
        return flatten_outputs(model(*_copied(args), **_copied(kwargs)))


def _copied(inputs):
    """``inputs`` (a tuple or dict, nested) with every tensor copied: each run of the model gets
    its own, so that a forward writing into its inputs (``x /= 255``) leaves the example as it
    is for the next run and for onnxruntime."""
    return pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, inputs)


def _feed(names: list[str], inputs: tuple[tuple, dict]) -> dict[str, np.ndarray]:
    """onnxruntime's feed: keyword tensors by their names when the ONNX inputs carry them, the
    positional tensors on the other inputs in order; else every tensor in flattening order."""
    args, kwargs = inputs
    positional = _input_tensors(args)
    keyed = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if keyed and all(k in names for k in keyed):
        rest = [n for n in names if n not in keyed]
        if len(rest) != len(positional):
            raise ExportFailedError(
                f"the ONNX model takes {len(names)} inputs {names} but the example has "
                f"{len(positional) + len(keyed)} tensors; pass every model input as a tensor")
        feed = {n: _numpy(t) for n, t in zip(rest, positional)}
        feed.update({k: _numpy(t) for k, t in keyed.items()})
        return feed
    tensors = _input_tensors((args, kwargs))
    if len(tensors) != len(names):
        raise ExportFailedError(
            f"the ONNX model takes {len(names)} inputs {names} but the example has "
            f"{len(tensors)} tensors; pass every model input as a tensor"
        )
    return {n: _numpy(t) for n, t in zip(names, tensors)}


def _verify(
    model: nn.Module,
    onnx_model: bytes,
    input_sets: list[tuple[str, tuple[tuple, dict]]],
    providers: Sequence[str],
    rtol: float,
    atol: float,
) -> float:
    import onnxruntime as ort

    available = ort.get_available_providers()
    worst = 0.0
    for provider in providers:
        if provider not in available:
            raise ExportFailedError(
                f"onnxruntime offers {available}, not {provider!r}; pass providers= from that list"
            )
        chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions
        try:
            session = ort.InferenceSession(onnx_model, sess_options=options, providers=chain)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportFailedError(f"onnxruntime could not load the exported model with {provider}: {exc}") from exc
        names = [i.name for i in session.get_inputs()]
        for label, args in input_sets:
            feed = _feed(names, args)
            try:
                ref = _run_torch(model, args)
            except Exception as exc:
                raise ExportFailedError(
                    f"torch itself fails on the {label} ({type(exc).__name__}: {exc}); if the model "
                    "fixes its batch size, export with dynamic_batch=False"
                ) from exc
            try:
                got = session.run(None, feed)
            except Exception as exc:  # onnxruntime's own exception types
                hint = "; the exported graph may fix the batch size: try dynamic_batch=False" if "batch" in label else ""
                raise ExportVerificationError(
                    f"{provider}, {label}: onnxruntime fails where torch succeeds: "
                    f"{str(exc).strip().splitlines()[0]}{hint}; the model was not written",
                    max_abs_diff=float("inf"),
                ) from exc
            worst = max(worst, _compare(ref, got, rtol, atol, f"{provider}, {label}"))
    return worst


def _check_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise ExportFailedError(f"cannot write {path}: directory {directory} does not exist; create it first")


def _write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``; a failed write removes what it wrote."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(path)
        directory = os.path.dirname(os.path.abspath(path)) or "."
        raise ExportFailedError(
            f"cannot write {path}: {exc.strerror or exc} in {directory}; choose a writable directory"
        ) from exc


# ---------------------------------------------------------------------------------------------
# The export


@dataclass(frozen=True)
class VerifiedExport:
    """An ONNX model that onnxruntime agreed with torch on, not yet written anywhere."""

    data: bytes  # the serialized ModelProto, weights embedded
    node_count: int
    op_counts: dict[str, int]
    max_abs_diff: float
    providers_checked: tuple[str, ...]

    def report(self, path: str | os.PathLike) -> ExportReport:
        """The report of this model once written to ``path``."""
        return ExportReport(os.fspath(path), self.node_count, self.op_counts, self.max_abs_diff,
                            self.providers_checked)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    providers: Sequence[str] | None = None,
    check_inputs: Sequence[tuple] | None = None,
    kwargs: dict[str, torch.Tensor] | None = None,
) -> ExportReport:
    """Export ``model`` to ``path`` as one ONNX file, verified with onnxruntime (see module doc).
    ``model(*example_inputs, **kwargs)`` is the example call.

    Raises ExportFailedError when no model could be produced or written, and
    ExportVerificationError when onnxruntime disagrees with torch; ``path`` is written only once
    the model is verified, and a write that fails removes what it wrote.
    """
    path = os.fspath(path)
    _check_directory(path)
    verified = export_verified(model, example_inputs, target=path, dynamic_batch=dynamic_batch, rtol=rtol,
                               atol=atol, providers=providers, check_inputs=check_inputs, kwargs=kwargs)
    _write(path, verified.data)
    return verified.report(path)


def export_verified(
    model: nn.Module,
    example_inputs: tuple,
    *,
    target: str = "ONNX",
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    providers: Sequence[str] | None = None,
    check_inputs: Sequence[tuple] | None = None,
    kwargs: dict[str, torch.Tensor] | None = None,
) -> VerifiedExport:
    """Export ``model`` to ONNX in memory and verify it with onnxruntime (see module doc); writes
    nothing. ``target`` names the destination in messages (the file the caller will write).

    Raises ExportFailedError when no model could be produced, and ExportVerificationError when
    onnxruntime disagrees with torch.
    """
    import onnx

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise ExportFailedError(
            f"example_inputs must be a tuple of model arguments, got {type(example_inputs).__name__}"
        )
    kwargs = dict(kwargs or {})
    if not isinstance(model, nn.Module):
        raise ExportFailedError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(target)
    providers = list(providers) if providers is not None else _default_providers()
    exported = model
    with eval_mode(model), torch.no_grad():
        try:
            probe = model(*_copied(example_inputs), **_copied(kwargs))
        except Exception as exc:
            raise ExportFailedError(
                f"torch itself fails on the example inputs ({type(exc).__name__}: {exc})") from exc
    if not keyed_output(probe):  # exported through positional inputs and a tuple of outputs
        if not all(isinstance(a, torch.Tensor) for a in example_inputs):
            raise ExportFailedError(f"{type(model).__name__} returns a {type(probe).__name__}, which the exporter "
                                    "cannot flatten; give its inputs as tensors (positional or keyword)")
        exported = _FlatOutputs(model, len(example_inputs), list(kwargs))
        exported.training = False  # the wrapper's own flag; the model's are eval_mode's
        example_inputs, kwargs = tuple(example_inputs) + tuple(kwargs.values()), {}
    del probe
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        try:
            dynamic_shapes = _dynamic_shapes(exported, example_inputs, kwargs, batch)
        except TypeError as exc:
            raise ExportFailedError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    example = (example_inputs, kwargs)
    with eval_mode(model):
        try:
            traced_args, traced_kwargs = _export_batch(example) if dynamic_batch else example
            with _quiet():
                program = torch.onnx.export(
                    exported,
                    _copied(traced_args),
                    None,
                    kwargs=_copied(traced_kwargs) or None,
                    dynamo=True,
                    external_data=False,
                    dynamic_shapes=dynamic_shapes,
                    verbose=False,
                    report=False,
                )
                proto = program.model_proto
                data = proto.SerializeToString()
        except Exception as exc:  # the exporter raises many types; all mean "no model"
            hint = "; if the model fixes its batch size, try dynamic_batch=False" if dynamic_batch else ""
            raise ExportFailedError(
                f"torch.onnx.export could not export {type(model).__name__} to {path}: "
                f"{_summary(exc)}{hint}"
            ) from exc
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ExportFailedError(f"the exported model for {path} is not valid ONNX: {exc}") from exc
        input_sets = [("example inputs", example)]
        if dynamic_batch:
            input_sets.append(("batch of another size", _bigger_batch(example)))
        for k, extra in enumerate(check_inputs or ()):
            input_sets.append((f"check_inputs[{k}]", (extra if isinstance(extra, tuple) else (extra,), {})))
        worst = _verify(model, data, input_sets, providers, rtol, atol)
    ops = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in proto.graph.node
    )
    return VerifiedExport(data, len(proto.graph.node), dict(ops), worst, tuple(providers))
