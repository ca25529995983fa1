"""graphrepair.io.loading (MODULE:FACTORY, checkpoints) and graphrepair.io.fileio (atomic outputs)."""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from graphrepair.errors import CheckpointError, LoadError, OutputError
from graphrepair.io.fileio import atomic_output, atomic_write, save_safetensors
from graphrepair.io.loading import (
    call_reference,
    load_checkpoint,
    load_factory,
    load_model,
    load_state_dict,
    resolve_reference,
)


def small_net(out: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))


class Tied(nn.Module):
    """Embedding and output layer share one weight (as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def write_module(directory: Path, source: str) -> str:
    """Write an importable module with a unique name into ``directory``; return its name."""
    name = f"grtest_{uuid.uuid4().hex[:12]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# MODULE:FACTORY


MODELS = """
    import torch
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def build_resnet():
        return build()

    def broken():
        raise RuntimeError("weights folder is gone")

    def not_a_model():
        return [1, 2, 3]

    def needs_args(depth, width=3):
        return build()

    class Builders:
        @staticmethod
        def small():
            return build()

    CONSTANT = 7
"""


@pytest.fixture
def models_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_module(tmp_path, MODELS)


def test_factory_from_module(models_module: str) -> None:
    model = load_factory(f"{models_module}:build")
    assert isinstance(model, nn.Sequential) and len(model) == 3


def test_factory_from_file_path(tmp_path: Path) -> None:
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(MODELS))
    model = load_factory(f"{path}:build")
    assert isinstance(model, nn.Sequential)
    # The second import of the same file reuses the module.
    assert type(load_factory(f"{path}:build")) is nn.Sequential


def test_factory_from_file_can_import_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "grtest_helper_layers.py").write_text("from torch import nn\nWIDTH = 5\n")
    path = tmp_path / "factory_file.py"
    path.write_text("from torch import nn\nimport grtest_helper_layers as h\ndef f():\n    return nn.Linear(h.WIDTH, 1)\n")
    assert load_factory(f"{path}:f").in_features == 5


def test_module_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As with ``python -m``: a MODULE:FACTORY module may sit in the working directory (the console
    script does not put it on the path), also one the factory imports only when called; the import
    path is as it was afterwards. (tests/test_packaging.py runs the console script itself.)"""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    name = write_module(tmp_path, MODELS)
    lazy = write_module(tmp_path, f"def build():\n    import {name}\n    return {name}.build()\n")
    before = list(sys.path)
    assert isinstance(load_factory(f"{lazy}:build"), nn.Sequential)
    assert sys.path == before


def test_factory_dotted_attribute(models_module: str) -> None:
    assert isinstance(load_factory(f"{models_module}:Builders.small"), nn.Sequential)


def test_factory_torch_class() -> None:
    assert isinstance(load_factory("torch.nn:Identity"), nn.Identity)


@pytest.mark.parametrize("ref", ["fixtures.zoo.mlp", "models.py", "build"])
def test_no_colon(ref: str) -> None:
    with pytest.raises(LoadError, match="not a MODULE:FACTORY reference") as info:
        load_factory(ref)
    assert ref in str(info.value)


@pytest.mark.parametrize("ref,part", [(":build", "module"), ("torch.nn:", "factory")])
def test_empty_part(ref: str, part: str) -> None:
    with pytest.raises(LoadError, match=f"empty {part} part"):
        load_factory(ref)


def test_module_not_found() -> None:
    with pytest.raises(LoadError) as info:
        load_factory("no_such_module_grtest:build")
    message = str(info.value)
    assert "cannot import module 'no_such_module_grtest'" in message
    assert "No module named 'no_such_module_grtest'" in message  # the ImportError's own message
    assert "PYTHONPATH" in message


def test_module_imports_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, "import grtest_absent_dependency\ndef build(): pass\n")
    with pytest.raises(LoadError) as info:
        load_factory(f"{name}:build")
    assert f"module '{name}' was found but it imports 'grtest_absent_dependency'" in str(info.value)


def test_module_raises_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, "raise ValueError('config missing')\n")
    with pytest.raises(LoadError, match="importing it raised ValueError: config missing"):
        load_factory(f"{name}:build")


def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist"):
        load_factory(f"{tmp_path / 'absent.py'}:build")


def test_file_with_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad_syntax.py"
    path.write_text("def build(:\n")
    with pytest.raises(LoadError, match="raised SyntaxError"):
        load_factory(f"{path}:build")


def test_no_such_attribute_suggests_close_names(models_module: str) -> None:
    with pytest.raises(LoadError) as info:
        load_factory(f"{models_module}:buld")
    message = str(info.value)
    assert f"module '{models_module}' has no attribute 'buld'" in message
    assert "did you mean: build" in message


def test_no_such_attribute_lists_callables(models_module: str) -> None:
    with pytest.raises(LoadError) as info:
        load_factory(f"{models_module}:zzzzzz")
    message = str(info.value)
    assert "it has:" in message and "build_resnet" in message and "broken" in message


def test_not_callable(models_module: str) -> None:
    with pytest.raises(LoadError, match="is a int, not callable"):
        load_factory(f"{models_module}:CONSTANT")


def test_needs_arguments(models_module: str) -> None:
    with pytest.raises(LoadError) as info:
        load_factory(f"{models_module}:needs_args")
    assert "needs arguments (depth), but FACTORY is called with none" in str(info.value)


def test_factory_raises(models_module: str) -> None:
    with pytest.raises(LoadError, match="raised RuntimeError: weights folder is gone") as info:
        load_factory(f"{models_module}:broken")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_factory_returns_non_module(models_module: str) -> None:
    with pytest.raises(LoadError, match="returned a list, not a torch.nn.Module"):
        load_factory(f"{models_module}:not_a_model")


def test_shared_reference_helpers(models_module: str) -> None:
    assert resolve_reference(f"{models_module}:CONSTANT") == 7
    assert call_reference(f"{models_module}:not_a_model", kind="FUNCTION") == [1, 2, 3]
    with pytest.raises(LoadError, match="MODULE:FUNCTION"):
        resolve_reference("nocolon", kind="FUNCTION")


# --------------------------------------------------------------------------------------------------
# Checkpoints


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    source[1].running_mean.uniform_()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_safetensors(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    target = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    assert load_checkpoint(target, path) is target
    assert_same_weights(source, target)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_checkpoint_wrapped_state_dict(tmp_path: Path, wrapper: str) -> None:
    source = small_net()
    torch.save({"epoch": 3, wrapper: source.state_dict(), "note": "x"}, tmp_path / "w.pt")
    target = load_checkpoint(small_net(), tmp_path / "w.pt")
    assert_same_weights(source, target)


def test_checkpoint_keeps_mode_and_device(tmp_path: Path) -> None:
    save_safetensors(small_net().state_dict(), tmp_path / "w.safetensors")
    model = small_net().train()
    load_checkpoint(model, tmp_path / "w.safetensors")
    assert model.training


def test_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(small_net(), tmp_path / "absent.pt")
    assert "absent.pt" in str(info.value)


def test_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(small_net(), tmp_path)


def test_checkpoint_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match=r"unknown extension '\.h5'.*\.safetensors, \.pt, \.pth, \.bin"):
        load_checkpoint(small_net(), tmp_path / "w.h5")


@pytest.mark.parametrize("suffix,expect", [(".safetensors", "as safetensors"), (".pt", "is it a file written by torch.save")])
def test_checkpoint_corrupt(tmp_path: Path, suffix: str, expect: str) -> None:
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=expect) as info:
        load_checkpoint(small_net(), path)
    assert str(path) in str(info.value)


def test_checkpoint_whole_model_pickled(tmp_path: Path) -> None:
    torch.save(small_net(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_net(), tmp_path / "model.pt")
    message = str(info.value)
    assert "weights_only=True" in message
    assert "torch.nn.modules.container.Sequential" in message
    assert "model.state_dict()" in message
    assert "\x1b[" not in message  # torch's terminal colour codes are not passed on


def test_checkpoint_torchscript_archive(tmp_path: Path) -> None:
    """Before: torch's paragraph about weights_only and arbitrary code execution, ending in "is it
    a file written by torch.save?" (it is not: torch.jit.save wrote it)."""
    torch.jit.save(torch.jit.script(small_net()), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match=r"'.*scripted.pt' is a TorchScript archive \(torch.jit.save\), "
                                              r"not a state dict; .*torch.save\(model.state_dict\(\), path\)"):
        load_checkpoint(small_net(), tmp_path / "scripted.pt")


def test_checkpoint_not_a_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(small_net(), tmp_path / "w.pt")


def test_checkpoint_entries_not_tensors(tmp_path: Path) -> None:
    torch.save({"0.weight": torch.zeros(8, 4), "epoch": 3, "lr": 0.1}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_net(), tmp_path / "w.pt")
    assert "2 of its 3 entries are not tensors: epoch (int), lr (float)" in str(info.value)


def test_checkpoint_mismatch_names_every_problem(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    save_safetensors(source.state_dict(), tmp_path / "w.safetensors")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "w.safetensors")
    message = str(info.value)
    assert "w.safetensors" in message and "(Sequential)" in message
    assert "missing 2 keys: 4.weight, 4.bias" in message
    assert "unexpected 2 keys: 3.bias, 3.weight" in message
    assert "2 keys with a different shape:" in message
    assert "2.weight: checkpoint (3, 8) vs model (2, 8)" in message
    assert "2.bias: checkpoint (3,) vs model (2,)" in message
    assert "same layer types, depth and widths" in message
    assert "\n" not in message
    # Nothing was loaded.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_checkpoint_mismatch_truncates_long_lists(tmp_path: Path) -> None:
    save_safetensors(nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)]).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(nn.Sequential(nn.Linear(2, 2)), tmp_path / "w.safetensors")
    message = str(info.value)
    assert "unexpected 10 keys: 1.bias, 1.weight, 2.bias, 2.weight, 3.bias, ... and 5 more" in message
    assert "missing" not in message


def test_checkpoint_prefix_hint(tmp_path: Path) -> None:
    wrapped = nn.Module()
    wrapped.module = small_net()
    torch.save(wrapped.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"extra 'module\.' prefix"):
        load_checkpoint(small_net(), tmp_path / "w.pt")


def test_checkpoint_not_strict(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 9))
    load_checkpoint(model, tmp_path / "w.pt", strict=False)  # 3.* unexpected, 4.* missing: allowed
    assert torch.equal(model[0].weight, source[0].weight)
    torch.save({**source.state_dict(), "4.weight": torch.zeros(2, 2)}, tmp_path / "w2.pt")
    with pytest.raises(CheckpointError, match=r"4\.weight: checkpoint \(2, 2\) vs model \(9, 2\).*strict=False"):
        load_checkpoint(model, tmp_path / "w2.pt", strict=False)


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Tied()
    save_safetensors(source.state_dict(), tmp_path / "tied.safetensors")  # shared storage is cloned
    target = Tied()
    load_checkpoint(target, tmp_path / "tied.safetensors")
    assert target.head.weight is target.embed.weight
    assert torch.equal(target.embed.weight, source.embed.weight)


def test_tied_weights_stored_once(tmp_path: Path) -> None:
    # Hugging Face writes a tied weight under one of its names only.
    source = Tied()
    torch.save({"embed.weight": source.embed.weight.detach().clone()}, tmp_path / "w.pt")
    target = load_checkpoint(Tied(), tmp_path / "w.pt")
    assert torch.equal(target.head.weight, source.embed.weight)


def test_load_state_dict_returns_cpu_tensors(tmp_path: Path) -> None:
    torch.save(small_net().state_dict(), tmp_path / "w.pt")
    state = load_state_dict(tmp_path / "w.pt")
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(t.device.type == "cpu" for t in state.values())


def test_load_model(models_module: str, tmp_path: Path) -> None:
    source = small_net()
    save_safetensors(source.state_dict(), tmp_path / "w.safetensors")
    model = load_model(f"{models_module}:build", tmp_path / "w.safetensors")
    assert not model.training
    assert_same_weights(source, model)
    assert not load_model(f"{models_module}:build").training


# --------------------------------------------------------------------------------------------------
# Atomic files


def test_atomic_write_writes(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    assert atomic_write(target, lambda p: p.write_bytes(b"payload")) == target
    assert target.read_bytes() == b"payload"
    assert entries(tmp_path) == ["out.bin"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_keeps_suffix_for_writers_that_check_it(tmp_path: Path) -> None:
    import numpy as np

    atomic_write(tmp_path / "d.npz", lambda p: np.savez(p, x=np.arange(3)))
    assert entries(tmp_path) == ["d.npz"]
    assert np.load(tmp_path / "d.npz")["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("error", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    def write(path: Path) -> None:
        path.write_bytes(b"half of the data")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "out.onnx", write)
    assert entries(tmp_path) == []


def test_atomic_write_disk_full(tmp_path: Path) -> None:
    def write(path: Path) -> None:
        path.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device in .*; free space or choose another location"):
        atomic_write(tmp_path / "out.onnx", write)
    assert entries(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def write(path: Path) -> None:
        path.write_bytes(b"new but broken")
        raise ValueError("verification failed")

    with pytest.raises(ValueError, match="verification failed"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert entries(tmp_path) == ["out.bin"]


def test_atomic_output_context(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "a.txt") as tmp:
        assert tmp.parent == tmp_path and tmp.name != "a.txt"
        tmp.write_text("hello")
        assert not (tmp_path / "a.txt").exists()
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_output_directory_missing(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist; create it first") as info:
        atomic_write(tmp_path / "no" / "out.bin", lambda p: p.write_bytes(b""))
    assert str(tmp_path / "no") in str(info.value)


def test_output_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="it is a directory"):
        atomic_write(tmp_path, lambda p: p.write_bytes(b""))


def test_output_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        atomic_write(tmp_path / "file" / "out.bin", lambda p: p.write_bytes(b""))


def test_output_directory_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod cannot stop root, so refuse the creation of the temporary file the way the OS would.
    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OutputError, match="permission denied in directory") as info:
        atomic_write(tmp_path / "out.bin", lambda p: p.write_bytes(b""))
    assert "choose a writable location" in str(info.value)
    monkeypatch.undo()
    assert entries(tmp_path) == []


def test_save_safetensors_handles_awkward_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "transposed": base.t(),  # not contiguous
        "view": base[1],  # shares storage with "base"
        "base": base,
        "grad": torch.ones(2, requires_grad=True) * 2,
        "ids": torch.arange(5),
    }
    save_safetensors(state, tmp_path / "s.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "s.safetensors"))
    for key, value in state.items():
        assert torch.equal(back[key], value.detach()), key
    assert back["ids"].dtype == torch.int64
    assert entries(tmp_path) == ["s.safetensors"]


def test_save_safetensors_rejects_non_tensor_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'step' is a int"):
        save_safetensors({"w": torch.zeros(2), "step": 3}, tmp_path / "s.safetensors")
    assert entries(tmp_path) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    """Writers that replace their temporary file themselves (safetensors) must not leave 0600."""
    import os
    import stat

    import torch

    from graphrepair.io.fileio import save_safetensors

    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
