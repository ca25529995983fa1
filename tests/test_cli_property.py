"""Property: whatever a hostile user feeds the command line -- files of random bytes or of arrays of
random shapes and dtypes, checkpoints with missing, extra or mis-shaped tensors, option strings of
any text -- the run keeps the README's promise:

* exit 0, and every output it names is valid (ONNX that onnx's checker accepts, a safetensors state
  dict of the model's keys); or
* exit 2 with exactly one line on stderr (``graphrepair: error: ...``), no traceback, and the
  output folder unchanged (a pre-existing output intact, no temporary file).

Exit 1 ("internal error") is a failure: it means bad input was not recognised as such. The examples
are derandomised (the same ones on every run) and few, on the small digits MLP of
``tests/hostile_models.py``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphrepair.cli import main
from tests import hostile_models

M = "tests.hostile_models"
OLD = b"old output, must survive"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("property")
    hostile_models.write_inputs(d)
    return d


# ------------------------------------------------------------------------------------------------
# What a hostile user hands over: each strategy draws a recipe; ``make`` turns it into a file.

DTYPES = ["float32", "float64", "float16", "int64", "uint8", "bool", "complex64"]
SHAPES = [(64,), (8, 8), (32,), (64, 1), (), (0,), (65,)]

arrays = st.fixed_dictionaries({
    "n": st.sampled_from([0, 1, 2, 3, 50, 300]),
    "shape": st.sampled_from(SHAPES),
    "dtype": st.sampled_from(DTYPES),
    "fill": st.sampled_from(["random", "zeros", "nan", "inf", "huge"]),
})
good_data = st.tuples(st.just("good"), st.sampled_from(["fit.npz", "test.npz"]))
data_files = st.one_of(
    good_data, good_data, good_data,
    st.tuples(st.just("npz"), arrays, st.one_of(st.none(), arrays), st.sampled_from([".npz", ".pt", ".safetensors"])),
    st.tuples(st.just("npy"), arrays),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.sampled_from([".npz", ".npy", ".pt", ".safetensors", ""])),
    st.tuples(st.just("missing")),
    st.tuples(st.just("directory")),
    st.tuples(st.just("reference"), st.sampled_from([f"{M}:batches", f"{M}:labeled_batches", f"{M}:later_nan",
                                                      f"{M}:nothing", "no_such_module:f", ":", "x:"])),
)
good_checkpoint = st.tuples(st.just("good"), st.sampled_from(["a", "b"]))
checkpoints = st.one_of(
    good_checkpoint, good_checkpoint, good_checkpoint, good_checkpoint,
    st.tuples(st.just("edited"), st.sampled_from(["drop", "extra", "reshape", "retype", "nan", "scalar"]),
              st.sampled_from([".safetensors", ".pt"])),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.sampled_from([".safetensors", ".pt", ".pth", ".bin", ""])),
    st.tuples(st.just("pickle"), st.sampled_from([[1, 2], {"w": [1.0]}, {"state_dict": {"a.weight": 3}}, "text"])),
    st.tuples(st.just("missing")),
    st.tuples(st.just("directory")),
)
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
numbers = st.one_of(st.sampled_from(["0.5", "0", "1", "-0.1", "1.5", "nan", "inf", "1e309", "0x1", ""]), texts)
counts = st.one_of(st.sampled_from(["1", "2", "0", "-5", "300", "99999999999", "1.5", "ten"]), texts)
shapes = st.one_of(st.sampled_from(["2,64", "1,64", "2,8,8", "2,,64", "2x64", "0,64", "-1,64", "2,64,", " 2 , 64 ",
                                    "2,65", "99999,99999,99999"]), texts)


def _array(recipe: dict) -> np.ndarray:
    shape = (recipe["n"], *recipe["shape"]) if recipe["shape"] != () or recipe["n"] else ()
    rng = np.random.default_rng(0)
    values = {"random": rng.normal(size=shape), "zeros": np.zeros(shape), "nan": np.full(shape, np.nan),
              "inf": np.full(shape, np.inf), "huge": np.full(shape, 1e30)}[recipe["fill"]]
    if recipe["dtype"] in ("int64", "uint8"):
        values = np.nan_to_num(values, nan=0, posinf=5, neginf=0).clip(0, 9)
    return values.astype(recipe["dtype"])


def make_data(recipe: tuple, inputs: Path, d: Path, name: str) -> str:
    kind = recipe[0]
    d = d / name
    d.mkdir()
    if kind == "good":
        return str(inputs / recipe[1])
    if kind == "reference":
        return recipe[1]
    if kind == "missing":
        return str(d / "absent.npz")
    if kind == "directory":
        (d / "dir.npz").mkdir()
        return str(d / "dir.npz")
    if kind == "bytes":
        path = d / f"junk{recipe[2]}"
        path.write_bytes(recipe[1])
        return str(path)
    if kind == "npy":
        path = d / "x.npy"
        np.save(path, _array(recipe[1]))
        return str(path)
    x, y, suffix = recipe[1], recipe[2], recipe[3]
    items = {"x": _array(x)} | ({} if y is None else {"y": _array(y)})
    path = d / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, **items)
    elif suffix == ".pt":
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in items.items()}, path)
    else:
        from safetensors.numpy import save_file
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in items.items()}, str(path))
        except Exception:  # a dtype safetensors cannot hold: the file is junk then
            path.write_bytes(b"\x00" * 8)
    return str(path)


def make_checkpoint(recipe: tuple, inputs: Path, d: Path, name: str) -> str:
    kind = recipe[0]
    if kind == "good":
        return str(inputs / f"mlp_{recipe[1]}.safetensors")
    if kind == "missing":
        return str(d / f"{name}_absent.safetensors")
    if kind == "directory":
        (d / f"{name}_dir.safetensors").mkdir()
        return str(d / f"{name}_dir.safetensors")
    if kind == "bytes":
        path = d / f"{name}{recipe[2]}"
        path.write_bytes(recipe[1])
        return str(path)
    if kind == "pickle":
        path = d / f"{name}.pt"
        torch.save(recipe[1], path)
        return str(path)
    how, suffix = recipe[1], recipe[2]
    torch.manual_seed(0)
    state = dict(hostile_models.MLP().state_dict())
    if how == "drop":
        state.pop("b.bias")
    elif how == "extra":
        state["c.weight"] = torch.zeros(3)
    elif how == "reshape":
        state["b.weight"] = torch.zeros(16, 32)
    elif how == "retype":
        state["a.weight"] = state["a.weight"].to(torch.int64)
    elif how == "nan":
        state["head.bias"][0] = float("nan")
    else:
        state["a.bias"] = torch.tensor(1.0)
    path = d / f"{name}_{how}{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from graphrepair.io.fileio import save_safetensors
        save_safetensors(state, path)
    return str(path)


def rarely(strategy):
    """None (the option left out) four times in five."""
    return st.one_of(st.none(), st.none(), st.none(), st.none(), strategy)


GOOD = {"a": ("good", "a"), "b": ("good", "b"), "data": ("good", "fit.npz"), "eval": None, "alpha": None,
        "num_examples": None, "method": None, "repair": None, "shape": "2,64", "vocab": None, "dtype": None,
        "weights": True}
HOSTILE = {
    "a": checkpoints, "b": checkpoints, "data": data_files, "eval": st.one_of(st.none(), data_files),
    "alpha": rarely(numbers), "num_examples": rarely(counts),
    "method": rarely(st.sampled_from(["weight", "activation", "bogus"])),
    "repair": rarely(st.sampled_from(["none", "reset", "approx", "??"])),
    "shape": st.one_of(st.just("2,64"), shapes), "vocab": rarely(counts),
    "dtype": rarely(st.sampled_from(["long", "double"])), "weights": st.booleans(),
}


@st.composite
def runs(draw) -> dict:
    """One run: a command and its inputs, good ones but for one that is hostile (files, then
    options), or several hostile at once."""
    r = {"command": draw(st.sampled_from(["merge", "merge", "merge", "export", "inspect"])), **GOOD}
    target = draw(st.sampled_from(["a", "data", "data", "eval", "eval", "options", "everything"]))
    keys = {"a": ["a"], "data": ["data"], "eval": ["eval"], "everything": list(HOSTILE),
            "options": ["alpha", "num_examples", "method", "repair", "shape", "vocab", "dtype"]}[target]
    for key in keys:
        r[key] = draw(HOSTILE[key])
    return r


def _args(r: dict, inputs: Path, d: Path, out: Path) -> list[str]:
    if r["command"] == "merge":
        args = ["merge", "--model", f"{M}:mlp", "--a", make_checkpoint(r["a"], inputs, d, "a"),
                "--b", make_checkpoint(r["b"], inputs, d, "b"), "--data", make_data(r["data"], inputs, d, "data"),
                "--out", str(out / "merged.onnx")]
        if r["eval"] is not None:
            args += ["--eval", make_data(r["eval"], inputs, d, "eval")]
        for key, option in (("alpha", "--alpha"), ("num_examples", "--num-examples"), ("method", "--method"),
                            ("repair", "--repair")):
            if r[key] is not None:
                args += [option, r[key]]
        if r["weights"]:
            args += ["--weights", str(out / "merged.safetensors")]
        return args
    args = [r["command"], "--model", f"{M}:mlp", "--checkpoint", make_checkpoint(r["a"], inputs, d, "a"),
            "--input-shape", r["shape"]]
    if r["dtype"] is not None:
        args += ["--input-dtype", r["dtype"]]
    if r["vocab"] is not None:
        args += ["--vocab", r["vocab"]]
    if r["command"] == "export":
        args += ["--out", str(out / "merged.onnx")]
    return args + (["--json"] if r["command"] == "inspect" else [])


def _state(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(r=runs())
def test_any_input_keeps_the_promise(inputs, monkeypatch, r):
    monkeypatch.setenv("GRAPHREPAIR_TEST_DATA", str(inputs / "functions.npz"))
    with tempfile.TemporaryDirectory() as scratch:
        d, out = Path(scratch) / "in", Path(scratch) / "out"
        d.mkdir()
        out.mkdir()
        (out / "merged.onnx").write_bytes(OLD)
        args = _args(r, inputs, d, out)
        before = _state(out)
        result = CliRunner().invoke(main, ["-q", *args], catch_exceptions=True)
        err = result.stderr
        assert "Traceback" not in err, (args, err)
        if result.exit_code == 0:
            import onnx
            from safetensors.torch import load_file

            if r["command"] in ("merge", "export"):
                onnx.checker.check_model(onnx.load(str(out / "merged.onnx")))
            if r["command"] == "merge" and r["weights"]:
                assert set(load_file(str(out / "merged.safetensors"))) == set(hostile_models.MLP().state_dict())
            assert sorted(os.listdir(out)) == sorted(["merged.onnx"] + (["merged.safetensors"] if r["weights"]
                                                                          and r["command"] == "merge" else []))
            return
        lines = err.strip().splitlines()
        assert result.exit_code == 2, (args, result.exit_code, err)
        assert len(lines) == 1 and lines[0].startswith("graphrepair: error: "), (args, err)
        assert _state(out) == before, args
