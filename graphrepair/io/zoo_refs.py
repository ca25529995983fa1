"""Models named the way their libraries name them, besides ``MODULE:FACTORY``:

* ``hf:DIR``          a local folder written by ``save_pretrained`` (Hugging Face transformers or
                      diffusers): the class its ``config.json`` names (``architectures`` for
                      transformers, ``_class_name`` for diffusers; ``AutoModel`` when it names
                      none), built from the config with random weights, offline. The checkpoints
                      (``--a``, ``--b``) give the weights: ``DIR/model.safetensors`` or
                      ``DIR/diffusion_pytorch_model.safetensors`` of each saved model.
* ``torchvision:NAME`` ``torchvision.models.get_model(NAME, weights=None)``.
* ``timm:NAME``       ``timm.create_model(NAME, pretrained=False)``.

Nothing is downloaded. ``model_from_reference(ref)`` returns None for any other reference, which
then goes to ``MODULE:FACTORY`` loading. ``save_pretrained_verified`` writes a model back with
``save_pretrained`` into a new folder and proves that ``from_pretrained`` gives its outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from graphrepair.errors import LoadError, OutputError

__all__ = ["KINDS", "hf_dir", "load_pretrained", "model_from_reference", "save_pretrained_verified"]

SAVED_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "model.safetensors.index.json", "diffusion_pytorch_model.bin")

KINDS = ("hf", "torchvision", "timm")


def _split(ref: str) -> tuple[str, str] | None:
    kind, colon, rest = ref.strip().partition(":")
    if not colon or kind not in KINDS:
        return None
    if not rest:
        raise LoadError(f"--model {ref}: give the {'folder' if kind == 'hf' else 'model name'} after '{kind}:'")
    return kind, rest


def hf_dir(ref: str) -> str | None:
    """The folder of an ``hf:DIR`` reference, else None."""
    parts = _split(ref) if ref.strip().startswith("hf:") else None
    return parts[1] if parts else None


def model_from_reference(ref: str) -> nn.Module | None:
    """The model an ``hf:``, ``torchvision:`` or ``timm:`` reference names, None for any other
    reference; LoadError (naming the reference and what to do) when it cannot be built."""
    parts = _split(ref)
    if parts is None:
        return None
    kind, rest = parts
    try:
        if kind == "hf":
            return _hf(rest, ref)
        if kind == "torchvision":
            return _torchvision(rest, ref)
        return _timm(rest, ref)
    except LoadError:
        raise
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as exc:
        raise LoadError(f"--model {ref}: building it raised {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


def _torchvision(name: str, ref: str) -> nn.Module:
    try:
        from torchvision import models
    except ImportError as exc:
        raise LoadError(f"--model {ref}: torchvision is not installed (pip install torchvision)") from exc
    available = models.list_models()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise LoadError(f"--model {ref}: torchvision has no model '{name}'"
                        + (f" (did you mean {', '.join(close)}?)" if close else "; see torchvision.models.list_models()"))
    return models.get_model(name, weights=None)


def _timm(name: str, ref: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise LoadError(f"--model {ref}: timm is not installed (pip install timm)") from exc
    if name not in timm.list_models():
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise LoadError(f"--model {ref}: timm has no model '{name}'"
                        + (f" (did you mean {', '.join(close)}?)" if close else "; see timm.list_models()"))
    return timm.create_model(name, pretrained=False)


def _hf_class(folder: str, ref: str) -> tuple[type, object]:
    """(the class a save_pretrained folder's config.json names, the config to build it from)."""
    path = Path(folder)
    config_file = path / "config.json"
    if not path.is_dir():
        raise LoadError(f"--model {ref}: '{folder}' is not a folder; hf:DIR names a folder written by save_pretrained")
    if not config_file.is_file():
        raise LoadError(f"--model {ref}: '{folder}' has no config.json; hf:DIR names a folder written by "
                        "save_pretrained")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"--model {ref}: cannot read {config_file}: {exc}") from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "_class_name" in raw:  # diffusers
        try:
            import diffusers
        except ImportError as exc:
            raise LoadError(f"--model {ref}: the folder holds a diffusers model ({raw['_class_name']}); "
                            "install diffusers") from exc
        cls = getattr(diffusers, raw["_class_name"], None)
        if cls is None:
            raise LoadError(f"--model {ref}: diffusers has no class {raw['_class_name']!r} (config.json's _class_name)")
        return cls, cls.load_config(str(path))
    try:
        import transformers
    except ImportError as exc:
        raise LoadError(f"--model {ref}: install transformers to load a save_pretrained folder") from exc
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if cls is None:
        raise LoadError(f"--model {ref}: transformers has no class {names[0]!r} (config.json's architectures)")
    return cls, config


def _hf(folder: str, ref: str) -> nn.Module:
    cls, config = _hf_class(folder, ref)
    if hasattr(cls, "_class_name") or not hasattr(cls, "config_class") or cls.__name__ == "AutoModel":
        return cls.from_config(config)  # diffusers' ModelMixin and AutoModel build from a config
    return cls(config)


def load_pretrained(ref: str, checkpoint: str | os.PathLike) -> nn.Module | None:
    """For an ``hf:DIR`` model, a checkpoint that is a ``save_pretrained`` folder (or the weights
    file in one) is loaded with the class's ``from_pretrained``: transformers may store weights
    under other names than its modules' (its checkpoint conversions), which only
    ``from_pretrained`` maps. None for anything else (a state dict in the model's own names
    loads as any checkpoint)."""
    if hf_dir(ref) is None:
        return None
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent if path.name in SAVED_WEIGHTS else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    cls, _ = _hf_class(hf_dir(ref), ref)
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as exc:
        from graphrepair.errors import CheckpointError

        raise CheckpointError(f"cannot load '{folder}' with {cls.__name__}.from_pretrained: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


@contextlib.contextmanager
def staged_pretrained(model: nn.Module, folder: str | os.PathLike, example, *,
                      atol: float = 1e-4) -> Iterator[Callable[[], float]]:
    """``model.save_pretrained`` into a temporary folder beside ``folder`` (new, or an empty
    folder), proved: the saved folder is loaded back with the class's ``from_pretrained`` and its
    outputs on ``example`` compared with ``model``'s; OutputError otherwise. Yields ``place()``,
    which moves the folder into place and returns the largest absolute difference; a folder not
    placed when the block ends (another output failed, or the block raised) is removed, so the
    caller can place it after its other outputs are committed."""
    from graphrepair.discovery.spec import _outputs  # the proof's output reader
    from graphrepair.io.inputs import Inputs

    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"--out-hf {folder}: exists and is not an empty folder; give a new folder")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--out-hf {folder}: the folder {parent} does not exist; create it first")
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent)
    placed = False
    try:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp)
        loaded.to(next(model.parameters()).device)
        inputs = Inputs.of(example)
        ref, got = _outputs(model, inputs), _outputs(loaded, inputs)
        worst = max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
        if len(ref) != len(got) or not worst <= atol + 1e-4 * max(float(a.float().abs().max()) for a in ref):
            raise OutputError(f"--out-hf {folder}: {type(model).__name__}.from_pretrained of the saved folder does "
                              f"not give the merged model's outputs (max abs diff {worst:.3g}); nothing was written")

        def place() -> float:
            nonlocal placed
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
            placed = True
            return worst

        yield place
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_verified(model: nn.Module, folder: str | os.PathLike, example, *, atol: float = 1e-4) -> float:
    """``staged_pretrained`` placed at once: ``folder`` holds the proved ``save_pretrained`` of
    ``model``, or nothing is written; the largest absolute difference is returned."""
    with staged_pretrained(model, folder, example, atol=atol) as place:
        return place()
