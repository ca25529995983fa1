"""Models from ``MODULE:FACTORY`` references and weights from checkpoint files.

A reference names a zero-argument callable: ``fixtures.zoo:resnet18`` (an importable module) or
``path/to/models.py:build`` (a file, imported under a private module name). The part after the
last colon may be dotted (``pkg.mod:Builder.small``). ``resolve_reference`` and ``call_reference``
are shared with :mod:`graphrepair.io.data` (``MODULE:FUNCTION`` data sources). As with
``python -m``, modules in the working directory are importable: it is first on the import path
while a reference is imported and called (the ``graphrepair`` console script does not put it
there itself).

Checkpoints are state dicts: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
``torch.load(weights_only=True)`` (a dict holding the state dict under ``"state_dict"`` or
``"model"`` is unwrapped). A checkpoint that does not fit the model is reported in one message that
names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from graphrepair.errors import CheckpointError, LoadError
from graphrepair.models import with_metadata

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "call_reference",
    "load_checkpoint",
    "load_factory",
    "load_model",
    "load_state_dict",
    "resolve_reference",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SHOWN = 5  # names listed per category in mismatch messages before "... and N more"


# --------------------------------------------------------------------------------------------------
# MODULE:ATTR references


def _looks_like_file(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def _import_file(file_part: str, ref: str, kind: str) -> object:
    path = Path(file_part).expanduser()
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise LoadError(f"cannot load '{ref}': file '{path}' {where}; give MODULE:{kind} or path/to/file.py:{kind}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_graphrepair_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot load '{ref}': '{path}' is not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # Registered before execution so that dataclasses, pickling and self-imports work; the file's
    # directory is importable while it runs so that it can import its neighbours.
    sys.modules[name] = module
    directory = str(resolved.parent)
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, ImportError):
            raise LoadError(f"cannot load '{ref}': importing '{path}' failed: {exc}") from exc
        if isinstance(exc, Exception):
            raise LoadError(
                f"cannot load '{ref}': running '{path}' raised {type(exc).__name__}: {exc}"
            ) from exc
        raise
    finally:
        if added:
            try:
                sys.path.remove(directory)
            except ValueError:
                pass
    return module


@contextmanager
def _working_directory_importable() -> Iterator[None]:
    """The working directory first on ``sys.path`` for the block, unless it is there already ('' or
    its path, as ``python -m`` and the interactive interpreter put it); removed again afterwards."""
    cwd = os.getcwd()
    if any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path if isinstance(entry, str)):
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        try:
            sys.path.remove(cwd)
        except ValueError:
            pass


def _import_module(module_part: str, ref: str) -> object:
    try:
        return importlib.import_module(module_part)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing != module_part and not module_part.startswith(missing + "."):
            hint = f"module '{module_part}' was found but it imports '{missing}', which is not installed"
        elif missing:
            hint = (
                "is it installed, or on PYTHONPATH? (run from the directory that contains it, "
                "or give a file: path/to/file.py:NAME)"
            )
        else:
            hint = "fix the import error above"
        raise LoadError(f"cannot import module '{module_part}' for '{ref}': {exc}; {hint}") from exc
    except Exception as exc:
        raise LoadError(
            f"cannot import module '{module_part}' for '{ref}': importing it raised {type(exc).__name__}: {exc}"
        ) from exc


def _public_names(obj: object) -> list[str]:
    return sorted(n for n in dir(obj) if not n.startswith("_"))


def resolve_reference(ref: str, *, kind: str = "FACTORY") -> object:
    """Import ``MODULE:ATTR`` (or ``path/to/file.py:ATTR``) and return the attribute.

    ``kind`` is the word used in messages for the part after the colon (``FACTORY``, ``FUNCTION``).
    Raises LoadError naming what is wrong: no colon, module or file not importable (with the
    ImportError's message), or no such attribute (with the closest existing names).
    """
    if not isinstance(ref, str):
        raise LoadError(f"expected a 'MODULE:{kind}' string, got {type(ref).__name__} {ref!r}")
    module_part, colon, attr_part = ref.strip().rpartition(":")
    if not colon:
        raise LoadError(
            f"'{ref}' is not a MODULE:{kind} reference (no colon); "
            f"write e.g. 'mypackage.models:{kind.lower()}' or 'path/to/models.py:{kind.lower()}'"
        )
    if not module_part or not attr_part:
        missing = "module" if not module_part else kind.lower()
        raise LoadError(f"'{ref}' has an empty {missing} part; write MODULE:{kind}")

    if _looks_like_file(module_part):
        module = _import_file(module_part, ref, kind)
    else:
        with _working_directory_importable():
            module = _import_module(module_part, ref)

    obj: object = module
    walked: list[str] = []
    for part in attr_part.split("."):
        if not hasattr(obj, part):
            owner = f"module '{module_part}'" if not walked else f"'{module_part}:{'.'.join(walked)}'"
            names = _public_names(obj)
            close = difflib.get_close_matches(part, names, n=5, cutoff=0.5)
            if close:
                hint = f"did you mean: {', '.join(close)}?"
            else:
                callables = [n for n in names if callable(getattr(obj, n, None))]
                shown = ", ".join(callables[:10]) + (f", ... ({len(callables)} in all)" if len(callables) > 10 else "")
                hint = f"it has: {shown}" if callables else "it defines no public callables"
            raise LoadError(f"{owner} has no attribute '{part}' (from '{ref}'); {hint}")
        obj = getattr(obj, part)
        walked.append(part)
    return obj


def _required_parameters(fn: object) -> list[str]:
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def call_reference(ref: str, *, kind: str = "FACTORY") -> object:
    """Resolve ``ref`` and call it with no arguments; LoadError if it is not callable or raises.
    The working directory stays importable during the call (a factory may import lazily)."""
    with _working_directory_importable():
        return _call_reference(ref, kind)


def _call_reference(ref: str, kind: str) -> object:
    fn = resolve_reference(ref, kind=kind)
    if not callable(fn):
        raise LoadError(
            f"'{ref}' is a {type(fn).__name__}, not callable; {kind} must be a function or class "
            "that takes no arguments"
        )
    required = _required_parameters(fn)
    if required:
        raise LoadError(
            f"'{ref}' needs arguments ({', '.join(required)}), but {kind} is called with none; "
            "write a zero-argument function in a small file, e.g. "
            f"'def build(): return {ref.rpartition(':')[2]}(...)', and pass path/to/file.py:build"
        )
    try:
        return fn()
    except Exception as exc:
        raise LoadError(f"calling '{ref}' raised {type(exc).__name__}: {exc}") from exc


def load_factory(ref: str) -> nn.Module:
    """Build the model named by ``MODULE:FACTORY`` (a zero-argument callable returning an nn.Module),
    or by ``hf:DIR``, ``torchvision:NAME``, ``timm:NAME`` (``zoo_refs``)."""
    from graphrepair.io.zoo_refs import model_from_reference

    model = model_from_reference(ref)
    if model is not None:
        return model
    model = call_reference(ref, kind="FACTORY")
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"'{ref}' returned a {type(model).__name__}, not a torch.nn.Module; "
            "FACTORY must build and return the model"
        )
    from graphrepair.models import check_module, unwrap

    # a torch.compile'd or DataParallel model: the module inside (checkpoints hold its keys, not
    # the wrapper's "_orig_mod." / "module." ones); a warning, which the report shows as a note
    model = unwrap(model, f"the model '{ref}' builds")
    # TorchScript refused before anything runs it (the commands' probes would blame the input);
    # what only a merge refuses (quantized modules, extra state) is refused there
    check_module(model, f"the model '{ref}' builds", "--model", state=False)
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return str(tuple(shape))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _count(n: int, noun: str = "key") -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only refusal (it names the object not allowed)."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"it contains a {match.group(1)} object"
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return first[0] if first else type(exc).__name__


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a CPU state dict, with CheckpointError for every way it can fail."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint '{path}' is a directory; give the weights file inside it "
            f"({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint '{path}' as safetensors: {exc}") from exc
    elif suffix in _TORCH_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"cannot read checkpoint '{path}' with torch.load(weights_only=True): {_unpickling_reason(exc)}; "
                "it must hold a state dict of tensors -- save it with torch.save(model.state_dict(), path) "
                "(or as safetensors), not the model object"
            ) from exc
        except Exception as exc:
            if "TorchScript archive" in str(exc):  # torch's refusal of a torch.jit.save file
                raise CheckpointError(
                    f"checkpoint '{path}' is a TorchScript archive (torch.jit.save), not a state dict; save the "
                    "weights of the nn.Module it was made from with torch.save(model.state_dict(), path) "
                    "(or as safetensors)"
                ) from exc
            raise CheckpointError(
                f"cannot read checkpoint '{path}': {type(exc).__name__}: {exc}; "
                "is it a file written by torch.save?"
            ) from exc
    else:
        raise CheckpointError(
            f"checkpoint '{path}' has an unknown extension '{path.suffix}'; expected one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )

    state = loaded
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint '{path}' is not a state dict of tensors: {len(not_tensors)} of its "
            f"{len(state)} entries are not tensors: {_names(not_tensors)}; "
            "put the weights under the key 'state_dict' or save model.state_dict() alone"
        )
    bad_keys = [repr(k) for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"checkpoint '{path}' has keys that are not strings: {', '.join(bad_keys[:_SHOWN])}")
    return with_metadata(dict(state), state)  # a pickled state dict's module versions are kept


def _aliases(model_state: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    """Names of the state dict that are the same tensor (tied weights), per name."""
    groups: dict[tuple, set[str]] = {}
    for name, tensor in model_state.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(ident, set()).add(name)
    return {name: group for group in groups.values() for name in group}


def _natural(key: str) -> list:
    """Sort key that orders 'layers.10' after 'layers.9' (safetensors files store keys sorted as text)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _mismatch_message(path: Path, model: nn.Module, missing: list[str], unexpected: list[str],
                      misshaped: list[str], strict: bool) -> str:
    parts = []
    if missing:
        parts.append(f"missing {_count(len(missing))}: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {_count(len(unexpected))}: {_names(unexpected)}")
    if misshaped:
        parts.append(f"{_count(len(misshaped))} with a different shape: {_names(misshaped)}")
    advice = [
        "check that the model factory builds the architecture the checkpoint was saved from "
        "(same layer types, depth and widths)"
    ]
    if unexpected and missing:
        prefixes = {k.split(".", 1)[0] for k in unexpected if "." in k}
        if len(prefixes) == 1:
            prefix = next(iter(prefixes))
            stripped = {k.split(".", 1)[1] for k in unexpected if "." in k}
            if stripped & set(missing):
                advice.append(
                    f"the checkpoint's keys carry an extra '{prefix}.' prefix (e.g. from DataParallel "
                    "or a wrapper); save the inner module's state_dict"
                )
    if not strict:
        advice.append("shapes must match even with strict=False")
    name = type(model).__name__
    return f"checkpoint '{path}' does not fit the model ({name}): " + "; ".join(parts) + "; " + "; ".join(advice)


def _optional_keys(model: nn.Module) -> set[str]:
    """Keys torch's own strict load accepts as missing: a BatchNorm's ``num_batches_tracked``
    (absent from checkpoints of older torch versions; it starts again at 0)."""
    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place, on the model's devices) and return it.

    Tied weights need to be present under one of their names only (Hugging Face checkpoints drop
    the duplicates). With ``strict=False`` missing and unexpected keys are allowed, but a key with
    a different shape is still an error. The model's train/eval mode is left as it was.
    """
    path = Path(path)
    state = load_state_dict(path)
    model_state = model.state_dict()
    aliases = _aliases(model_state)

    optional = _optional_keys(model)
    missing = [k for k in model_state
               if k not in state and k not in optional and not (state.keys() & aliases.get(k, {k}))]
    unexpected = sorted((k for k in state if k not in model_state), key=_natural)
    misshaped = [
        f"{k}: checkpoint {_shape(state[k].shape)} vs model {_shape(model_state[k].shape)}"
        for k in model_state
        if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    if misshaped or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(path, model, missing, unexpected, misshaped, strict))

    complex_into_real = [f"{k} ({str(state[k].dtype).replace('torch.', '')})" for k in model_state
                         if k in state and state[k].is_complex() and not model_state[k].is_complex()]
    if complex_into_real:
        raise CheckpointError(f"checkpoint '{path}' holds complex values for real parameters of "
                              f"{type(model).__name__}: {_names(complex_into_real)}; loading would drop "
                              "their imaginary parts; save real tensors")
    # module versions (_metadata) from the checkpoint when it kept them (a pickled state dict),
    # else the model's own: _load_from_state_dict may read them (torchvision's MNASNet refuses none)
    to_load = with_metadata({k: v for k, v in state.items() if k in model_state},
                            state if getattr(state, "_metadata", None) is not None else model_state)
    try:
        model.load_state_dict(to_load, strict=False)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise CheckpointError(f"cannot load checkpoint '{path}' into {type(model).__name__}: {exc}") from exc
    return model


def load_model(ref: str, checkpoint: str | os.PathLike | None = None, *, strict: bool = True) -> nn.Module:
    """``load_factory(ref)``, then ``load_checkpoint`` if given; the model is returned in eval mode."""
    model = load_factory(ref)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
    return model.eval()
