"""The user's models: unwrap, check, snapshot and restore.

- ``@user_models("model_a", "model_b")`` on an API entry point: the named arguments (a model or a
  list of models) are unwrapped (``torch.compile``'s ``_orig_mod``, ``nn.DataParallel`` /
  ``DistributedDataParallel``'s ``.module``, with a warning), checked (a Python torch.nn.Module,
  not a state dict, a path, TorchScript or quantized: ``check_module``; not on the meta device;
  several models in one dtype) and given back as they came (``given_back``).
- ``given_back(*models)``: every buffer (its value, and which tensor it is) and every module's
  training flag restored after the block, whatever ran inside: a forward that counts its calls
  or keeps an EMA in a persistent buffer, spectral norm's power iteration in training mode.
- ``copy_with_state(module, state)``: a copy of a model carrying other weights, made without
  copying its own first; ``graph_for(spec, state)``: the traced graph carrying a model's weights.
- ``check_finite(state, who)``: a NumericError naming the first parameter with a NaN or Inf.
- ``forward_hooks(modules_by_name, fn)``: ``fn(name, inputs, output)`` after every call of each
  module inside a ``with`` block (how the refit and the layer report capture a module's inputs and
  outputs; graph nodes are observed with ``passes.observe`` instead).
- ``eval_mode(*models)``: the models in eval mode inside a ``with`` block, every module's flag
  restored after it; ``full_precision()``: IEEE float32 products on CUDA inside a block (the
  proofs of permutations and the ONNX check compare two computations). Both are
  ``passes.modules``' (the ONNX export uses them; ``passes`` cannot import ``graphrepair``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch import nn

from passes.base import deepcopy_quietly
from passes.errors import CopyError
from passes.modules import eval_mode, full_precision, restore_training

from graphrepair import runtime
from graphrepair.errors import GraphRepairError, GraphRepairWarning, MismatchError, NumericError, listed

if TYPE_CHECKING:
    from graphrepair.discovery.spec import PermutationSpec

__all__ = ["check_finite", "check_models", "check_module", "copy_with_state", "eval_mode", "forward_hooks", "full_precision",
           "given_back", "graph_for", "unwrap", "user_models", "with_metadata"]


# -- unwrap and check --------------------------------------------------------------------------

def unwrap(model: nn.Module, who: str = "the model") -> nn.Module:
    """The module a wrapper holds: ``torch.compile``'s result runs the original module
    (``_orig_mod``) under guards that a trace with other batch sizes breaks; ``nn.DataParallel``
    and ``DistributedDataParallel`` hold theirs in ``.module``. A warning says what was used."""
    if not isinstance(model, nn.Module):
        return model
    seen = []
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            seen.append("a torch.compile'd module (its _orig_mod)")
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            seen.append(f"a {type(model).__name__} wrapper (its .module)")
            model = model.module
        else:
            break
    if seen:
        warnings.warn(f"{who} is {' in '.join(seen)}: graphrepair works on the module inside, "
                      f"{type(model).__name__}, and returns models of that class", GraphRepairWarning, stacklevel=3)
    return model


def check_module(value, who: str = "the model", argument: str = "model", state: bool = True) -> None:
    """A GraphRepairError unless ``value`` (the API argument ``argument``) is a Python
    torch.nn.Module: for a state dict, a path or anything else, each saying what to do instead;
    for a TorchScript module, or a module holding one, naming it (neither torch.fx nor
    torch.export reads TorchScript, and its tables are no Python dicts); for a lazy module whose
    parameters are not made yet (its forward would make them); where ``state`` (the call
    permutes or merges the state dict), for a quantized module (its weights are packed integers),
    naming it."""
    kind = type(value).__name__
    if isinstance(value, Mapping):
        raise GraphRepairError(
            f"{who} ({argument}) is a mapping ({kind}), not a torch.nn.Module: a state dict? Build the model, "
            f"load the weights into it (model.load_state_dict(state)) and pass the model")
    if isinstance(value, (str, os.PathLike)):
        raise GraphRepairError(
            f"{who} ({argument}) is a path, {os.fspath(value)!r}, not a torch.nn.Module: the Python API "
            f"takes models; build the model and load its checkpoint first, or use the command line "
            f"(graphrepair merge --model MODULE:FACTORY --a A --b B ...)")
    if not isinstance(value, nn.Module):
        raise GraphRepairError(f"{who} ({argument}) must be a torch.nn.Module, got {kind}")
    for name, m in value.named_modules():
        where = "is" if name == "" else f"holds at {name!r}"
        if isinstance(m, torch.jit.ScriptModule):
            raise GraphRepairError(
                f"{who} {where} a TorchScript module (torch.jit.script or torch.jit.trace made it): "
                f"graphrepair traces Python modules with torch.fx or torch.export, which cannot read "
                f"TorchScript; use the nn.Module it was made from")
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise GraphRepairError(
                f"{who} {where} a lazy module ({type(m).__name__}) whose parameters are not made yet: its "
                f"first forward would make them, with random values; run the model once (model(x)) or "
                f"load its weights before giving it to graphrepair")
        if state and ".quantized." in type(m).__module__:  # torch.ao.nn.quantized (static and dynamic), intrinsic
            raise GraphRepairError(
                f"{who} {where} a quantized module ({type(m).__module__}.{type(m).__name__}): graphrepair "
                f"merges floating-point weights; merge the float models, then quantize the merged one")


def _dtype(model: nn.Module) -> torch.dtype | None:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def check_models(models: list[nn.Module], labels: list[str], tensors_only: bool = True) -> None:
    """State dicts of tensors only (no extra state; where ``tensors_only``: the calls that permute
    or merge them), weights that exist (no meta tensors) and, for several models, one floating
    dtype."""
    for m, who in zip(models, labels):
        state = m.state_dict(keep_vars=True)
        odd = next((k for k, t in state.items() if not isinstance(t, torch.Tensor)), None)
        if odd is not None and tensors_only:
            raise GraphRepairError(
                f"{who}'s state dict holds {odd!r}, a {type(state[odd]).__name__}, not a tensor (a module's "
                f"extra state, from its get_extra_state): graphrepair permutes and merges tensors and cannot "
                f"carry it; merge models whose state dicts hold tensors only (the plain torch.nn modules, "
                f"without the extra state)")
        meta = next((k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_meta), None)
        if meta is not None:
            raise GraphRepairError(f"{who} is on the meta device (no weights, e.g. parameter {meta!r}); "
                                   f"load its weights first (load_state_dict(..., assign=True), or "
                                   f"from_pretrained without device_map='meta')")
    dtypes = [_dtype(m) for m in models]
    first = next((i for i, d in enumerate(dtypes) if d is not None), None)
    for i, d in enumerate(dtypes):
        if first is not None and d is not None and d != dtypes[first]:
            a, b = str(dtypes[first]).removeprefix("torch."), str(d).removeprefix("torch.")
            raise GraphRepairError(f"{labels[first]} is {a} and {labels[i]} is {b}: models are merged in one "
                                   f"dtype; cast {labels[i]} to {a} (model.to(torch.{a})) or {labels[first]} "
                                   f"to {b} first")


def _labels(name: str, n: int | None, count: int) -> list[str]:
    if n is None:  # one model argument
        return [{"model_a": "model A", "model_b": "model B"}.get(name, "the model")]
    return [f"model {'AB'[i]}" if count == 2 else f"model {i}" for i in range(count)]


def user_models(*names: str, state: bool = True):
    """Decorator of an API entry point: its arguments ``names`` (a model, or a list or tuple of
    models) are unwrapped, checked (``check_module``, ``check_models``) and given back as they came
    (``given_back``); the function sees the unwrapped models. The call runs with CPU memory held
    for reuse (``runtime.held_memory``). ``state=False``: the call reads no state dict (an export,
    an evaluation): a module's extra state, or a quantized module, is let be."""

    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            models, labels = [], []
            for name in names:
                v = bound.arguments.get(name)
                if isinstance(v, (list, tuple)):
                    whos = _labels(name, len(v), len(v))
                    v = type(v)(unwrap(m, w) for m, w in zip(v, whos))
                    for i, (m, w) in enumerate(zip(v, whos)):
                        check_module(m, w, f"{name}[{i}]", state)
                    models.extend(v)
                    labels.extend(whos)
                else:
                    (who,) = _labels(name, None, 1)
                    v = unwrap(v, who)
                    check_module(v, who, name, state)
                    models.append(v)
                    labels.append(who)
                bound.arguments[name] = v
            check_models(models, labels, tensors_only=state)
            # out of inference mode, should the caller be in it: what the call makes (a merged
            # model's weights above all) are ordinary tensors, which the caller can run with
            # autograd, train and change in place outside it, like the models given
            with torch.inference_mode(False), given_back(*models), runtime.held_memory():
                try:
                    return fn(*bound.args, **bound.kwargs)
                except CopyError as e:  # (``passes`` raises its own errors)
                    raise GraphRepairError(str(e)) from e

        return wrapper

    return decorate


# -- snapshot and restore ---------------------------------------------------------------------

@contextlib.contextmanager
def forward_hooks(modules_by_name: dict, fn) -> Iterator[None]:
    """Inside the block, ``fn(name, inputs, output)`` after every call of each module of
    ``modules_by_name`` ({name: module}; ``inputs`` the tuple of its positional arguments); the
    hooks are removed after it (also when it raises, e.g. an exception that ends a forward early)."""
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, inp, out))
               for name, m in modules_by_name.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def given_back(*models: nn.Module) -> Iterator[None]:
    """Every buffer of ``models`` and every module's training flag as they were before the block,
    after it (also when it raises). A buffer's values are copied back into the caller's own
    tensor where a forward changed them in place (its version counter moved), and the caller's
    tensor is put back where a forward replaced it (``self.calls = self.calls + 1``). Buffers are
    copied once on entry (BatchNorm statistics, counters: small beside the weights). An inference
    tensor (a model built or loaded under ``torch.inference_mode``) has no version counter and
    cannot be changed in place out of inference mode, where the calls run (``user_models``): it
    is only put back where it was replaced.

    Every module's parameters, buffers and submodules are put back as the objects they were (one
    a forward replaced is given back, one it registered is dropped again), and its other
    attributes too: one a forward sets on its module (``self.last = h``, a cache made on the
    first call) is removed again, or given back the object
    it held, so that tracing, which runs the forward on proxies, leaves no ``torch.fx.Proxy`` on
    the caller's model (nor on a copy made after it), and the calls' own forwards leave nothing of
    theirs.

    Parameters: those of modules whose forward writes into their weights (``nn.Embedding`` and
    ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they look up) are copied on entry
    and copied back; any other parameter a forward changed in place (its version counter moved)
    is named in a warning, since it could not be given back."""
    flags, saved, attrs, params, tables = {}, [], [], [], []
    for model in models:
        for path, m in model.named_modules():
            if m in flags:
                continue
            flags[m] = m.training
            attrs.append((m, dict(vars(m))))
            # which parameters, buffers and submodules the module holds, by object (a forward that
            # replaces one, ``self.gain = nn.Parameter(...)``, leaves the caller's optimizer and
            # every other holder with an object the model no longer reads)
            tables.append((m, {k: dict(vars(m)[k]) for k in MODULE_TABLES}, set(m._non_persistent_buffers_set)))
            writes = isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
            for name, p in m._parameters.items():
                if p is not None and not p.is_inference():
                    params.append((f"{path}.{name}" if path else name, p, p._version,
                                   p.detach().clone() if writes else None))
            for name, b in m._buffers.items():
                if b is not None:
                    frozen = b.is_inference()
                    saved.append((m, name, b, None if frozen else b._version, None if frozen else b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, version, copy_ in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if version is not None and b._version != version:
                    b.copy_(copy_)
            changed = []
            for name, p, version, copy_ in params:
                if p._version != version:
                    if copy_ is None:
                        changed.append(name)
                    else:
                        p.copy_(copy_)
        for m, held, transient in tables:
            for key, was in held.items():
                now = vars(m)[key]
                if now.keys() != was.keys() or any(now[k] is not v for k, v in was.items()):
                    now.clear()
                    now.update(was)
            if m._non_persistent_buffers_set != transient:
                m._non_persistent_buffers_set.intersection_update(transient)
                m._non_persistent_buffers_set.update(transient)
        for m, was in attrs:
            now = vars(m)
            for k in [k for k in now if k not in was]:
                del now[k]
            for k, v in was.items():
                if now.get(k, _GONE) is not v:
                    now[k] = v
        restore_training(flags)
        if changed:
            warnings.warn(f"the model's forward changed parameter{'s' if len(changed) > 1 else ''} "
                          f"{listed(repr(k) for k in changed)} in place "
                          f"during the call (graphrepair runs the forward, it does not write weights) and "
                          f"{'they' if len(changed) > 1 else 'it'} could not be given back", GraphRepairWarning,
                          stacklevel=3)


_GONE = object()  # (an attribute ``given_back`` finds removed)
MODULE_TABLES = ("_parameters", "_buffers", "_modules")  # nn.Module's own tables of what it holds
PLAIN_CONTAINER = "a plain list or dict"  # ``unheld_tensors``' kind for a tensor held in one


def _storage_key(t: torch.Tensor) -> tuple:
    """Where a tensor's values lie: storage address, offset, shape, strides, dtype (``unheld_tensors``)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tied_names(model: nn.Module) -> dict[str, str]:
    """state_dict key -> canonical key: tied parameters (one tensor, several names) share one,
    the first name of the tensor."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        out[name] = first.setdefault(id(t), name)
    return out


def unheld_tensors(model: nn.Module) -> dict[tuple, tuple[str, str]]:
    """The tensors ``model`` holds outside its state dict, by where their values lie (storage
    address, offset, shape, strides, dtype: a traced graph's constant shares a parameter's storage
    without being the same object) -> (the name a user knows it by, what kind of holding it is):
    "a buffer registered with persistent=False", "a tensor attribute", and ``PLAIN_CONTAINER`` for
    a module, parameter or tensor in a list, tuple or dict attribute (not registered:
    ``layers[0].weight``). What discovery names when a traced graph reads one (the tracer's own
    names, ``lifted_tensor_0``, tell nothing); look one up with ``unheld_name``."""
    found: dict[tuple, tuple[str, str]] = {}

    def add(t, name: str, kind: str) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            found.setdefault(_storage_key(t), (name, kind))

    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        for k in m._non_persistent_buffers_set:
            add(m._buffers.get(k), prefix + k, "a buffer registered with persistent=False")
        for k, v in vars(m).items():
            if k in MODULE_TABLES:
                continue
            if isinstance(v, torch.Tensor):
                add(v, prefix + k, "a tensor attribute")
                continue
            items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, (list, tuple)) else ()
            for i, item in items:
                at = f"{prefix}{k}[{i!r}]"
                if isinstance(item, nn.Module):
                    for name, t in (*item.named_parameters(), *item.named_buffers()):
                        add(t, f"{at}.{name}", PLAIN_CONTAINER)
                else:
                    add(item, at, PLAIN_CONTAINER)
    return found


def unheld_name(table: dict, t) -> tuple[str, str] | None:
    """(name, kind) of tensor ``t`` in a model's ``unheld_tensors`` table, or None."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    return table.get(_storage_key(t))


def copy_with_state(module: nn.Module, state: dict[str, torch.Tensor], *, own: bool = False,
                    device: torch.device | None = None) -> nn.Module:
    """A copy of ``module`` carrying ``state`` (every key of the module's state dict), made without
    copying the module's own weights first: the tensors of its state dict are left out of the deep
    copy and the copy is given the tensors of ``state`` (cast to the module's dtypes, on ``device``
    or the module's devices). ``own=True``: ``state``'s tensors belong to the caller and are taken
    as they are where no cast is needed, else they are copied. Everything else (non-persistent
    buffers, the graph of a GraphModule) is deep-copied as usual."""
    current = module.state_dict(keep_vars=True)
    _check_keys(current, state)
    memo = {id(t): t for t in current.values()}  # shared until replaced below
    memo.update(_empty_containers(module))
    clone = deepcopy_quietly(module, memo)
    _give(clone, current, state, own, device)
    if device is not None:
        clone.to(device)
    return clone


def assign_state(module: nn.Module, state: dict[str, torch.Tensor], *, own: bool = False) -> None:
    """``module`` itself given the tensors of ``state`` (every key of its state dict), as
    ``copy_with_state`` gives its copy them (cast to the module's dtypes and devices; ``own``
    likewise; names sharing one tensor keep sharing one); nothing is copied but what a cast needs."""
    current = module.state_dict(keep_vars=True)
    _check_keys(current, state)
    _give(module, current, state, own, None)


def _check_keys(current: dict, state: dict) -> None:
    missing = [k for k in current if k not in state]
    if missing:
        raise MismatchError(f"no weights given for parameter {missing[0]!r} of the model ({len(missing)} "
                            f"missing); are they from the architecture the spec was made for?")


def _give(module: nn.Module, current: dict, state: dict, own: bool, device) -> None:
    """``module``'s state-dict tensors (``current``, as they are now) replaced by ``state``'s."""
    new, first = {}, {}
    for k, t in current.items():
        if id(t) in first:  # tied: one tensor under two names stays one tensor
            new[k] = new[first[id(t)]]
            continue
        first[id(t)] = k
        v = state[k].detach()
        if v.shape != t.shape:
            raise MismatchError(f"parameter {k!r} has shape {tuple(v.shape)}, but the model's is {tuple(t.shape)}")
        # (an inference tensor, from a model built under torch.inference_mode, is copied: out of
        # inference mode it could not be a parameter that requires grad, nor change in place)
        v = v.to(device=device if device is not None else t.device, dtype=t.dtype, copy=not own or v.is_inference())
        new[k] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v
    _load_assigned(module, new, current)


_MODULE_LOAD = nn.Module._load_from_state_dict


def _assignable(m: nn.Module, attr: str) -> bool:
    """Whether ``attr`` is a parameter or a persistent buffer of ``m`` that holds a tensor."""
    if m._parameters.get(attr) is not None:
        return True
    return m._buffers.get(attr) is not None and attr not in m._non_persistent_buffers_set


def _load_assigned(module: nn.Module, state: dict, current: dict) -> None:
    """``module.load_state_dict(state, strict=True, assign=True)`` for a ``state`` with exactly
    the keys of ``current`` (the module's state dict, whose ``_metadata`` goes with it: modules
    whose ``_load_from_state_dict`` reads their version from it, torchvision's MNASNet, refuse a
    state dict without one). Each module's ``_load_from_state_dict`` is given its own entries,
    found in one pass over the keys (a module that keeps nn.Module's own has them assigned as it
    would assign them); ``load_state_dict`` filters every descendant's entries again
    at every level of the tree (a 20-layer merged graph with its resets: 121 entries, 63 modules,
    7,800 prefix tests, most of the load's time). Where some module has load hooks (which may
    read its descendants' entries), or the load finds anything amiss, ``load_state_dict`` itself."""
    named = list(module.named_modules(remove_duplicate=False))
    if any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for _, m in named):
        module.load_state_dict(with_metadata(state, current), strict=True, assign=True)
        return
    own: dict[str, dict] = {}
    for k, v in state.items():
        own.setdefault(k.rpartition(".")[0], {})[k] = v
    metadata = getattr(current, "_metadata", None) or {}
    missing, unexpected, errors = [], [], []
    swap = torch.__future__.get_swap_module_params_on_conversion()
    for name, m in named:
        mine = own.get(name, {})
        if not swap and type(m)._load_from_state_dict is _MODULE_LOAD and all(
                _assignable(m, k.rpartition(".")[2]) for k in mine):
            # what nn.Module's own ``_load_from_state_dict`` does with assign=True once the shapes
            # match (``_give`` checked them) and the tensors have their kinds (``_give`` made them)
            for k, v in mine.items():
                setattr(m, k.rpartition(".")[2], v)
            continue
        local = {**metadata.get(name, {}), "assign_to_params_buffers": True}
        m._load_from_state_dict(mine, f"{name}." if name else "", local, True, missing, unexpected, errors)
    if missing or unexpected or errors:  # its own message
        module.load_state_dict(with_metadata(state, current), strict=True, assign=True)


_EMPTY_KINDS = (dict, OrderedDict, set)


def _empty_containers(module: nn.Module) -> dict[int, object]:
    """A deep-copy memo entry for every empty dict, OrderedDict and set a module of ``module``
    holds as an attribute (its hook tables, mostly): a new empty one of the same type, what
    ``copy.deepcopy`` would make of it. deepcopy makes them through ``__reduce_ex__``, which
    for OrderedDict looks up its slot names anew each time (the type cannot cache them): half
    the time of copying the 20-layer paper MLP (2.3 -> 1.2 ms, 4.8 -> 3.4 ms for its traced
    graph; about 1,400 such tables per merge)."""
    memo = {}
    for m in module.modules():
        for v in vars(m).values():
            if type(v) in _EMPTY_KINDS and not v:
                memo[id(v)] = type(v)()
    return memo


def graph_for(spec: PermutationSpec, state: dict[str, torch.Tensor] | nn.Module,
              device: torch.device | None = None, own: bool = False) -> torch.fx.GraphModule:
    """A copy of the traced graph carrying the weights of ``state`` (a model or a state dict;
    ``own``: see ``copy_with_state``)."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    return copy_with_state(spec.traced.gm, graph_state(spec, sd),
                           own=own and not isinstance(state, nn.Module), device=device).eval()


def graph_state(spec: PermutationSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a model's state dict) as the traced graph's: with the graph's own tensors
    (``Traced.graph_own``: trace constants, non-persistent buffers, in no state dict of the model,
    e.g. timm Swin's index tensors, MaxViT's log coordinates) as traced."""
    mine = {k: v for k, v in spec.traced.gm.state_dict().items() if k in spec.traced.graph_own and k not in state}
    return {**mine, **state} if mine else state


def check_finite(state: dict[str, torch.Tensor], who: str, buffers: frozenset[str] | set[str] = frozenset(),
                 end: str = "; the model cannot be merged") -> None:
    """A NumericError naming the first parameter (or, among ``buffers``, buffer) with a NaN or Inf,
    its message ending with ``end``. The sums of all tensors on one device are checked together
    (one wait for the device instead of one per tensor): a NaN or Inf makes its tensor's sum
    non-finite, and a sum that overflows only sends the check to the per-tensor test, which then
    finds nothing. Complex tensors are checked too."""
    by_device: dict = {}
    for k, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            by_device.setdefault(t.device, []).append((k, t))
    for group in by_device.values():
        sums = torch.stack([t.detach().sum(dtype=torch.float32 if t.element_size() < 4 and not t.is_complex()
                                           else None).abs().float() for _, t in group])
        if bool(torch.isfinite(sums).all()):
            continue
        for k, t in group:
            if not torch.isfinite(t).all():
                kind = "buffer" if k in buffers else "parameter"
                raise NumericError(f"{who}: {kind} {k!r} contains NaN or Inf{end}")


def with_metadata(state: dict, like: dict) -> dict:
    """``state`` as an OrderedDict carrying ``like``'s ``_metadata`` (the per-module versions a
    state dict records and ``_load_from_state_dict`` reads, e.g. torchvision's MNASNet refuses a
    state dict without one). A state dict rebuilt as a plain dict loses them."""
    out = OrderedDict(state)
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return out
