"""Specs already discovered in this process, kept for reuse: a model is traced and discovered once.

A spec depends on the model's code and configuration and on the example's shapes, not on its
weights' values. It is kept for the model it was discovered on, with a key (``signature``) of
everything about the model that decides it, and reused for that model while the key stays:

- every module (``named_modules``, duplicates included): its name, its class and that class's
  ``forward``, ``extra_repr()`` (a conv's stride, groups ...) and its other attributes (flags,
  sizes, a config object's values, a function it calls, hooks), frozen into plain values;
- every parameter and buffer: name, shape, dtype, device, which names share one tensor (tied
  weights), and for a buffer outside the state dict (``persistent=False``) and a plain tensor
  attribute, which a trace keeps as a constant of the graph, a digest of its values;
- the example inputs: each one's shape, dtype and device;
- discovery's own rule tables (``rules.registry``), as they stand, and the forward hooks
  registered for every module (``rules.global_hooks``).

A model changed in any of these (a layer replaced, resized or retyped, a flag set, another example
shape) gets another key and is discovered afresh. An attribute the freezing does not understand is
keyed by its identity, never guessed at; a model some part of which cannot be keyed is not kept
(``signature`` gives None).

Why per model and not per key alone: what a forward reads outside the model (module-level
functions and flags, e.g. a helper whose behaviour a caller patched) is in no key, so another
model of the same architecture is discovered anew (one trace per model, as before; a merge
discovers model A only). The entry lives as long as its model (a weak reference): the spec's
traced graph reads that model's modules and tensors, and holding them after the caller dropped
the model would keep its weights in memory. The spec is frozen data (read-only tables), safe to
share between callers.
"""

from __future__ import annotations

import hashlib
import types
import weakref

import torch
from torch import nn

_entries: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # model -> (key, spec)
_stats = {"hits": 0, "misses": 0}

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
          torch.memory_format, torch.layout)
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                types.WrapperDescriptorType, type)
# nn.Module's own bookkeeping: the tables the signature reads otherwise (modules, tensors)
_SKIP = frozenset({"_parameters", "_buffers", "_modules", "training", "_is_full_backward_hook",
                   "_compiled_call_impl"})


def _digest(t: torch.Tensor) -> tuple:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return ("tensor", tuple(t.shape), t.dtype, hashlib.blake2b(data, digest_size=16).hexdigest())


def _freeze(v, depth: int = 0, memo: dict | None = None):
    """A hashable value standing for ``v`` (see the module doc). ``memo``: objects already frozen
    in this signature, by identity (a config object every layer holds is frozen once)."""
    if isinstance(v, _PLAIN):
        return v
    if memo is None:
        memo = {}
    found = memo.get(id(v))
    if found is not None and found[0] is v:
        return found[1]
    out = _freeze_new(v, depth, memo)
    memo[id(v)] = (v, out)
    return out


def _freeze_new(v, depth: int, memo: dict):
    if isinstance(v, nn.Module):
        return ("module", type(v))  # its contents are keyed by ``named_modules``
    if isinstance(v, torch.Tensor):
        return _digest(v)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_freeze(x, depth, memo) for x in v))
    if isinstance(v, (set, frozenset)):
        return ("set", frozenset(_freeze(x, depth, memo) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((_freeze(k, depth, memo), _freeze(x, depth + 1, memo)) for k, x in v.items()))
    if isinstance(v, _BY_IDENTITY):
        return v
    if isinstance(v, types.MethodType):
        return ("method", v.__func__, _freeze(v.__self__, depth + 1, memo) if not isinstance(v.__self__, nn.Module) else
                type(v.__self__))
    if depth < 4 and hasattr(v, "__dict__") and not isinstance(v, types.ModuleType):
        return ("object", type(v), _freeze(vars(v), depth + 1, memo))  # e.g. a Hugging Face config
    return ("identity", v) if _hashable(v) else ("id", type(v), id(v))


def _hashable(v) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _inputs(example_inputs) -> tuple | None:
    """Per input (positional or keyword, ``io.inputs.Inputs``): its name, shape, dtype and device;
    None for a form that is not inputs (discovery then says why)."""
    from graphrepair.errors import DataError
    from graphrepair.io.inputs import Inputs

    try:
        inputs = Inputs.of(example_inputs)
    except DataError:
        return None
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in inputs.named())


def _rules() -> tuple:
    """The op rules discovery applies now (a rule replaced gives another key)."""
    from graphrepair.discovery import rules
    from graphrepair.discovery.rules import registry
    return (tuple(registry.RULES.items()), tuple(registry.MODULE_RULES), tuple(rules.MODULE_RULES))


def _global_hooks(memo: dict) -> tuple:
    """The forward hooks registered for every module (``rules.global_hooks``): they run in every
    module call of a traced graph, so discovery fixes the modules' axes while any is registered."""
    from graphrepair.discovery.rules import global_hooks
    return tuple(_freeze(h, 0, memo) for h in global_hooks())


def signature(model: nn.Module, example_inputs) -> tuple | None:
    """What decides ``model``'s spec on ``example_inputs`` (see the module doc), or None where
    something cannot be keyed."""
    inputs = _inputs(example_inputs)
    if inputs is None:
        return None
    try:
        mods, memo = [], {}
        for name, m in model.named_modules(remove_duplicate=False):
            attrs = tuple((k, _freeze(v, 0, memo)) for k, v in vars(m).items() if k not in _SKIP)
            mods.append((name, type(m), type(m).forward, m.extra_repr(), attrs))
        first: dict[int, str] = {}
        tensors = []
        for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                            ("b", model.named_buffers(remove_duplicate=False))):
            for name, t in items:
                owner, _, attr = name.rpartition(".")
                persistent = attr not in model.get_submodule(owner)._non_persistent_buffers_set
                tensors.append((kind, name, tuple(t.shape), t.dtype, t.device, first.setdefault(id(t), name),
                                None if persistent else _digest(t)))
        key = (type(model), inputs, tuple(mods), tuple(tensors), _rules(), _global_hooks(memo))
        hash(key)
    except Exception:  # something that cannot be keyed: discovered every time, never guessed
        return None
    return key


def lookup(model: nn.Module, key: tuple | None):
    """The spec kept for ``model`` under ``key``, or None."""
    found = None if key is None else _entries.get(model)
    if found is None or found[0] != key:
        _stats["misses"] += 1
        return None
    _stats["hits"] += 1
    return found[1]


def keep(model: nn.Module, key: tuple | None, spec) -> None:
    """Keep ``spec`` for ``model`` under ``key``, while ``model`` lives."""
    if key is not None:
        _entries[model] = (key, spec)


def clear() -> None:
    """Forget every kept spec."""
    _entries.clear()


def info() -> dict:
    """{"hits", "misses", "entries"} since the process started."""
    return {**_stats, "entries": len(_entries)}
