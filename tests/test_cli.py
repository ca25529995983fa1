"""The command line: merge, barrier, export and demo on two small digits MLPs, and every kind of bad
input ending in one line on stderr, exit status 2 and no output file.

Fixtures are built once per module: two ``fixtures.zoo:mlp3`` networks (3 hidden layers of width 32)
trained for a few epochs on scikit-learn's 8x8 digits from different seeds, saved as safetensors,
the digits as .npz files, and a residual MLP (in a user file, ``models.py:resmlp``) whose REPAIR
resets after the residual adds cannot be folded into the weights. The demo's default pair is checked
on the one run of ``graphrepair demo`` per session (``wheel_demo`` in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from graphrepair.cli import main
from graphrepair.cli.merge import merge_text

ROOT = Path(__file__).resolve().parents[1]

MODELS_PY = '''
import torch
from torch import nn


class ResMLP(nn.Module):
    """Two residual blocks: REPAIR resets after the adds stay separate affines."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.f1 = nn.Linear(32, 32)
        self.f2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.f1(h))
        h = h + torch.relu(self.f2(h))
        return self.head(h)


def resmlp():
    return ResMLP()


def fit_batches():
    """MODULE:FUNCTION data: a one-shot generator of input batches."""
    import numpy as np
    x = torch.from_numpy(np.load(__file__.replace("models.py", "fit.npz"))["x"])
    return (x[i:i + 100] for i in range(0, len(x), 100))
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from fixtures.datasets import digits
    from fixtures.train import train_pair
    from fixtures.zoo import mlp, mlp3
    from graphrepair.io.fileio import save_safetensors

    d = tmp_path_factory.mktemp("cli")
    x, y = digits("train", flatten=True)
    x_test, y_test = digits("test", flatten=True)
    a, b = train_pair(mlp3, (x, y), epochs=8, lr=0.05, batch_size=64)
    save_safetensors(a.state_dict(), d / "a.safetensors")
    save_safetensors(b.state_dict(), d / "b.safetensors")
    torch.manual_seed(0)
    save_safetensors(mlp(depth=2, width=16, in_features=64).state_dict(), d / "other_arch.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x00not a safetensors file" * 4)
    np.savez(d / "fit.npz", x=x.numpy())
    np.savez(d / "fit_labeled.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "test.npz", x=x_test.numpy(), y=y_test.numpy())
    np.savez(d / "no_y.npz", x=x_test.numpy())
    np.savez(d / "no_x.npz", inputs=x_test.numpy(), y=y_test.numpy())
    np.savez(d / "narrow.npz", x=x_test.numpy()[:, :10], y=y_test.numpy())
    np.savez(d / "labels_20.npz", x=x_test.numpy(), y=y_test.numpy() + 10)
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 broken zip")
    (d / "models.py").write_text(MODELS_PY)
    sys.path.insert(0, str(d))
    try:
        import importlib
        models = importlib.import_module("models")
        for name, seed in (("ra", 0), ("rb", 1)):
            torch.manual_seed(seed)
            save_safetensors(models.resmlp().state_dict(), d / f"{name}.safetensors")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("models", None)
    return d


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def pair_args(w: Path, *extra) -> list:
    return ["--model", "fixtures.zoo:mlp3", "--a", w / "a.safetensors", "--b", w / "b.safetensors",
            "--data", w / "fit.npz", *extra]


def new_files(directory: Path, before: set[str]) -> set[str]:
    return {p.name for p in directory.iterdir()} - before


def onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def load_mlp3(path: Path) -> torch.nn.Module:
    from fixtures.zoo import mlp3

    model = mlp3()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def accuracy_and_loss(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy, computed here (not by the library's ``evaluate``)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    target = torch.from_numpy(y)
    return (float((logits.argmax(1) == target).double().mean()),
            float(torch.nn.functional.cross_entropy(logits, target)))


def barrier_on_grid(alphas: list[float], values: list[float], higher_is_better: bool) -> float:
    """REPAIR's Eq. 1 on the grid, computed here: the largest rise of ``values`` above the straight
    line between the endpoints (for accuracies, the largest drop below it)."""
    gaps = []
    for a, v in zip(alphas, values):
        line = (1 - a) * values[0] + a * values[-1]
        gaps.append(line - v if higher_is_better else v - line)
    return max(gaps)


def assert_one_line_error(result, *phrases: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    err = result.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphrepair: error: ")
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_json_onnx_and_weights_agree_with_torch(work, tmp_path):
    out, weights = tmp_path / "merged.onnx", tmp_path / "merged.safetensors"
    result = cli("-q", "merge", *pair_args(work), "--eval", work / "test.npz", "--out", out,
                 "--weights", weights, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["groups"], report["free_channels"]) == (3, 96)
    assert report["method"] == "activation" and report["repair"] == "exact"
    assert report["resets"] == report["folded"] == 3 and report["kept"] == []
    assert set(report["mean_corr"]) == set(report["group_sizes"]) and len(report["mean_corr"]) == 3
    assert report["mean_corr_summary"]["min"] <= report["mean_corr_summary"]["mean"] <= 1
    assert report["examples"] == 1437  # the whole fit file, fewer than --num-examples
    assert any("1437 examples" in n for n in report["notes"])
    assert report["onnx"]["node_count"] > 0 and report["onnx"]["max_abs_diff"] < 1e-4
    assert report["merged_class"] == "Sequential"

    # The safetensors file is a state dict of the user's class; the ONNX file computes the same.
    from fixtures.zoo import mlp3
    model = mlp3()
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    data = np.load(work / "test.npz")
    x, y = data["x"], data["y"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = onnx_outputs(out, x)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    accuracy = float((got.argmax(1) == y).mean())
    assert abs(accuracy - report["eval"]["merged"]["accuracy"]) < 1e-9
    # every figure of the report is the one computed here from the files, outside the command line
    ends = {name: load_mlp3(work / f"{name.lower()}.safetensors") for name in ("A", "B")}
    for name, m in {**ends, "merged": model}.items():
        acc, loss = accuracy_and_loss(m, x, y)
        assert report["eval"][name]["accuracy"] == pytest.approx(acc, abs=1e-9), name
        assert report["eval"][name]["loss"] == pytest.approx(loss, rel=1e-5), name
    import graphrepair as gr
    fit = torch.from_numpy(np.load(work / "fit.npz")["x"])
    res = gr.merge_models([ends["A"], ends["B"]], fit, num_examples=len(fit))
    assert (report["dead_channels"], report["unsignalled"], report["arbitrary"]) == (
        res.dead_channels, res.unsignalled, res.arbitrary)
    # every dead unit of A is matched without activation signal; the weights place all but ``arbitrary``
    assert report["dead_channels"] <= report["unsignalled"] and report["arbitrary"] <= report["unsignalled"]
    assert report["eval"]["A"]["accuracy"] > 0.9 and report["eval"]["merged"]["accuracy"] > 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx", "merged.safetensors"]


def test_merge_text_report(work, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli("-q", "merge", *pair_args(work), "--alpha", "0.3", "--repair", "approx", "--out", out,
                 "--eval", work / "test.npz")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for phrase in ("alpha 0.3", "spec: 3 permutation groups, 96 channels may move", "activation matching",
                   "mean correlation of matched units per group", "min ", "REPAIR (approx, points all): "
                   "3 resets, 3 folded", "dead channels:",
                   "units matched without activation signal: ", "evaluation on", "merged", f"wrote {out}",
                   "max |diff| vs onnxruntime"):
        assert phrase in text, (phrase, text)
    assert out.exists() and result.stderr == ""


def test_merge_refit_reports_its_layers_and_beats_repair_on_the_fit(work, tmp_path):
    """--refit 1: the report names the layers refit; the merged weights differ from REPAIR's and the
    merge is at least as accurate on the fitting data (what the refit fits) as without it."""
    runs = {}
    for refit in ("0", "1"):
        weights = tmp_path / f"r{refit}.safetensors"
        result = cli("-q", "merge", *pair_args(work), "--refit", refit, "--refit-examples", "600", "--no-onnx",
                     "--weights", weights, "--eval", work / "fit_labeled.npz", "--json")
        assert result.exit_code == 0, result.stderr
        runs[refit] = (json.loads(result.stdout), load_file(str(weights)))
    (plain, w0), (fitted, w1) = runs["0"], runs["1"]
    assert plain["refit"] is None
    assert fitted["refit"] == {"sweeps": 1, "examples": 600, "layers": 4, "kept": {}}
    assert "refit: 4 layers refit by least squares (1 sweep on 600 examples)" in merge_text(fitted, None)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert fitted["eval"]["merged"]["loss"] < plain["eval"]["merged"]["loss"]


def test_merge_weight_matching_weights_only(work, tmp_path):
    weights = tmp_path / "w.safetensors"
    result = cli("-q", "merge", *pair_args(work), "--method", "weight", "--repair", "none", "--no-onnx",
                 "--weights", weights, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "weight" and report["repair"] is None and report["onnx"] is None
    assert "units matched without activation signal" not in merge_text(report, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    state = load_file(str(weights))
    a = load_file(str(work / "a.safetensors"))
    assert set(state) == set(a) and all(state[k].shape == a[k].shape for k in a)


def test_merge_unfoldable_weights_is_an_error_and_writes_nothing(work, tmp_path):
    before = {p.name for p in tmp_path.iterdir()}
    result = cli("merge", "--model", f"{work / 'models.py'}:resmlp", "--a", work / "ra.safetensors",
                 "--b", work / "rb.safetensors", "--data", work / "fit.npz", "--num-examples", "300",
                 "--out", tmp_path / "r.onnx", "--weights", tmp_path / "r.safetensors", "--output", "graph")
    line = assert_one_line_error(result, "--weights", "2 of the 5 REPAIR resets could not be folded",
                                 "not a ResMLP", "the ONNX file (--out) is the deliverable", "--points conv")
    assert "_gr_reset" in line  # names which resets stayed
    assert new_files(tmp_path, before) == set()


def test_merge_unfoldable_onnx_is_written(work, tmp_path):
    out = tmp_path / "r.onnx"
    result = cli("-q", "merge", "--model", f"{work / 'models.py'}:resmlp", "--a", work / "ra.safetensors",
                 "--b", work / "rb.safetensors", "--data", f"{work / 'models.py'}:fit_batches",
                 "--num-examples", "300", "--out", out, "--json", "--output", "graph")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resets"] == 5 and report["folded"] == 3 and len(report["kept"]) == 2
    assert report["examples"] == 300 and report["merged_class"] == "GraphModule"
    x = np.load(work / "fit.npz")["x"][:50]
    assert onnx_outputs(out, x).shape == (50, 10)


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written

BAD_MERGE = {
    "missing checkpoint": (["--a", "{w}/nope.safetensors"], ["--a", "does not exist", "nope.safetensors"]),
    "unreadable checkpoint": (["--b", "{w}/garbage.safetensors"], ["--b", "cannot read checkpoint"]),
    "other architecture": (["--b", "{w}/other_arch.safetensors"], ["does not fit the model", "missing"]),
    "missing data": (["--data", "{w}/nope.npz"], ["--data", "does not exist"]),
    "unreadable data": (["--data", "{w}/garbage.npz"], ["--data", "cannot read data file"]),
    # a file without 'x' gives its named arrays as keyword inputs: 'inputs' is not the MLP's
    "data without x": (["--data", "{w}/no_x.npz"], ["--data", "'inputs' is not an argument of Sequential.forward",
                                                   "rename or drop it"]),
    "data shape": (["--data", "{w}/narrow.npz"], ["--data", "cannot run on its examples of shape (10,)"]),
    "data reference": (["--data", "fixtures.datasets:nothing_here"], ["nothing_here"]),
    "eval without y": (["--eval", "{w}/no_y.npz"], ["--eval", "has no labels", "'y'"]),
    "eval shape": (["--eval", "{w}/narrow.npz"], ["--eval", "shape (10,)", "expected (64,)"]),
    "eval labels": (["--eval", "{w}/labels_20.npz"], ["--eval", "[10, 19]", "10 outputs"]),
    "alpha above 1": (["--alpha", "1.5"], ["--alpha 1.5: must be in [0, 1] (0 = model A, 1 = model B)"]),
    "alpha below 0": (["--alpha", "-0.1"], ["--alpha -0.1", "[0, 1]"]),
    "missing out dir": (["--out", "{t}/nodir/merged.onnx"], ["--out", "does not exist"]),
    "out is a directory": (["--out", "{t}"], ["--out", "is a directory"]),
    "weights dir missing": (["--weights", "{t}/nodir/w.safetensors"], ["--weights", "does not exist"]),
    "same file twice": (["--out", "{t}/x.onnx", "--weights", "{t}/x.onnx"], ["--out and --weights"]),
    "num examples": (["--num-examples", "0"], ["--num-examples", "positive"]),
    "refit below 0": (["--refit", "-1"], ["--refit", "sweeps >= 0, got -1"]),
    "refit examples": (["--refit", "1", "--refit-examples", "0"], ["--refit-examples", "positive"]),
    "factory": (["--model", "fixtures.zoo:mlp_nope"], ["--model", "mlp_nope"]),
}


@pytest.mark.parametrize("case", list(BAD_MERGE))
def test_merge_bad_input(work, tmp_path, case):
    extra, phrases = BAD_MERGE[case]
    extra = [e.format(w=work, t=tmp_path) for e in extra]
    args = pair_args(work)
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "merged.onnx")]
    for opt in ("--a", "--b", "--data", "--model"):  # a bad value replaces the good one
        if opt in extra:
            i = args.index(opt)
            del args[i:i + 2]
    before = {p.name for p in tmp_path.iterdir()}
    assert_one_line_error(cli("merge", *args, *extra), *phrases)
    assert new_files(tmp_path, before) == set()
    assert not list(work.glob(".*tmp*"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_merge_read_only_directory(work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = cli("merge", *pair_args(work), "--out", ro / "merged.onnx")
        assert_one_line_error(result, "--out", "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_merge_unwritable_directory_reported_before_work(work, tmp_path, monkeypatch):
    """What a read-only directory looks like to the check (root, who runs CI here, ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    result = cli("merge", *pair_args(work), "--weights", ro / "w.safetensors", "--out", tmp_path / "m.onnx")
    assert_one_line_error(result, "--weights", f"directory '{ro}' is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"] and list(ro.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_device_cuda_without_gpu(work, tmp_path):
    result = cli("--device", "cuda", "merge", *pair_args(work), "--out", tmp_path / "m.onnx")
    assert_one_line_error(result, "--device cuda", "no CUDA device")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_exception(work, tmp_path):
    result = cli("--debug", "merge", *pair_args(work), "--alpha", "2", "--out", tmp_path / "m.onnx")
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "DataError" and "--alpha 2.0" in str(result.exception)


# ------------------------------------------------------------------------------------------------
# barrier


def test_barrier_json_layers_and_plots(work, tmp_path):
    plot = tmp_path / "path.png"
    result = cli("-q", "barrier", *pair_args(work), "--eval", work / "test.npz", "--alphas", "5",
                 "--layers", "--plot", plot, "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    curves = {c["label"]: c for c in r["curves"]}
    assert list(curves) == ["naive", "aligned", "REPAIR"]
    for c in curves.values():
        assert c["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert len(c["accuracy"]) == len(c["loss"]) == 5
        # the endpoints are A and B on every path
        assert c["accuracy"][0] == curves["naive"]["accuracy"][0]
        assert c["accuracy"][-1] == curves["naive"]["accuracy"][-1]
        assert c["accuracy_barrier"] == pytest.approx(barrier_on_grid(c["alphas"], c["accuracy"], True), abs=1e-12)
        assert c["loss_barrier"] == pytest.approx(barrier_on_grid(c["alphas"], c["loss"], False), abs=1e-12)
    mid = 2
    assert curves["REPAIR"]["accuracy"][mid] >= curves["aligned"]["accuracy"][mid]
    assert curves["aligned"]["accuracy"][mid] > curves["naive"]["accuracy"][mid]
    assert curves["aligned"]["loss_barrier"] < curves["naive"]["loss_barrier"]
    assert curves["REPAIR"]["loss_barrier"] <= curves["aligned"]["loss_barrier"]
    assert r["endpoints"]["A"]["accuracy"] == curves["naive"]["accuracy"][0]

    layers = r["layers"]
    assert r["layer_alpha"] == 0.5 and [row["layer"] for row in layers] == ["1", "3", "5"]
    for row in layers:
        aligned, repaired = row["variance_ratio"]["aligned"], row["variance_ratio"]["REPAIR"]
        assert aligned < 0.95 and abs(repaired - 1) < abs(aligned - 1)  # REPAIR undoes the collapse
        assert 0.5 < row["llfc_cosine"]["aligned"] <= 1.0 + 1e-6
    # variance collapse grows with depth (REPAIR Figure 2)
    assert layers[-1]["variance_ratio"]["aligned"] < layers[0]["variance_ratio"]["aligned"]

    assert r["plots"] == [str(plot), str(tmp_path / "path_layers.png")]
    import matplotlib.image as mpimg
    for p in r["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(p).shape[0] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path.png", "path_layers.png"]


def test_barrier_text_table(work):
    result = cli("-q", "barrier", *pair_args(work), "--eval", work / "test.npz", "--alphas", "3",
                 "--repair", "none")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("alpha"))
    assert header.split() == ["alpha", "acc", "naive", "acc", "aligned", "loss", "naive", "loss", "aligned"]
    rows = [line.split() for line in lines if line[:4] in ("0.00", "0.50", "1.00")]
    assert [r[0] for r in rows] == ["0.00", "0.50", "1.00"] and all(len(r) == 5 for r in rows)
    barrier = next(line.split() for line in lines if line.startswith("barrier"))
    naive_acc, aligned_acc = float(barrier[1]), float(barrier[2])
    # the barrier row is Eq. 1 over the printed rows (each rounded to 0.01 points: 3 roundings)
    alphas = [float(r[0]) for r in rows]
    for column, printed in ((1, naive_acc), (2, aligned_acc)):
        assert printed == pytest.approx(barrier_on_grid(alphas, [float(r[column]) for r in rows], True), abs=0.016)
    assert naive_acc > aligned_acc + 10  # points: alignment removes most of the naive path's drop
    assert "per layer" not in result.stdout


def test_barrier_with_refit_adds_its_curve(work):
    result = cli("-q", "barrier", *pair_args(work), "--eval", work / "test.npz", "--alphas", "3", "--refit", "1",
                 "--json")
    assert result.exit_code == 0, result.stderr
    curves = {c["label"]: c for c in json.loads(result.stdout)["curves"]}
    assert list(curves) == ["naive", "aligned", "REPAIR", "REPAIR + refit"]
    repair, refit = curves["REPAIR"], curves["REPAIR + refit"]
    assert refit["accuracy"][0] == repair["accuracy"][0] and refit["accuracy"][2] == repair["accuracy"][2]
    # the midpoint is the refit merge's, made here through the API on the same files
    import graphrepair as gr

    fit, test = np.load(work / "fit.npz"), np.load(work / "test.npz")
    a, b = load_mlp3(work / "a.safetensors"), load_mlp3(work / "b.safetensors")
    merged = gr.merge(a, b, torch.from_numpy(fit["x"]), alpha=0.5, repair="exact", refit=1, num_examples=len(fit["x"]))
    acc, loss = accuracy_and_loss(merged, test["x"], test["y"])
    assert refit["accuracy"][1] == pytest.approx(acc, abs=1e-9) and refit["loss"][1] == pytest.approx(loss, rel=1e-4)
    assert (refit["accuracy"][1], refit["loss"][1]) != (repair["accuracy"][1], repair["loss"][1])


BAD_BARRIER = {
    "no eval labels": (["--eval", "{w}/no_y.npz"], ["--eval", "has no labels"]),
    "one alpha": (["--eval", "{w}/test.npz", "--alphas", "1"], ["--alphas", "at least 2"]),
    "plot format": (["--eval", "{w}/test.npz", "--plot", "{t}/p.xyz"], ["--plot", "'.xyz'", ".png"]),
    "plot dir": (["--eval", "{w}/test.npz", "--plot", "{t}/nodir/p.png"], ["--plot", "does not exist"]),
    "checkpoint": (["--eval", "{w}/test.npz", "--a", "{w}/other_arch.safetensors"], ["--a", "does not fit"]),
    "refit": (["--eval", "{w}/test.npz", "--refit", "-2"], ["--refit", "sweeps >= 0, got -2"]),
}


@pytest.mark.parametrize("case", list(BAD_BARRIER))
def test_barrier_bad_input(work, tmp_path, case):
    extra, phrases = BAD_BARRIER[case]
    extra = [e.format(w=work, t=tmp_path) for e in extra]
    args = pair_args(work)
    if "--a" in extra:
        i = args.index("--a")
        del args[i:i + 2]
    assert_one_line_error(cli("barrier", *args, *extra), *phrases)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# export


def test_export_end_to_end(work, tmp_path):
    """``python -m graphrepair export``: the written file computes what the checkpoint computes."""
    out = tmp_path / "a.onnx"
    proc = subprocess.run([sys.executable, "-m", "graphrepair", "export", "--model", "fixtures.zoo:mlp3",
                           "--checkpoint", str(work / "a.safetensors"), "--input-shape", "2,64",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: " in proc.stdout and "Gemm 4" in proc.stdout
    assert "max |diff| vs torch" in proc.stdout
    from fixtures.zoo import mlp3
    model = mlp3()
    model.load_state_dict(load_file(str(work / "a.safetensors")))
    x = np.load(work / "test.npz")["x"]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_outputs(out, x), ref, atol=1e-4, rtol=1e-4)


def test_bad_input_end_to_end(work, tmp_path):
    args = [sys.executable, "-m", "graphrepair", "merge", *map(str, pair_args(work)), "--data",
            str(work / "narrow.npz"), "--out", str(tmp_path / "m.onnx")]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "cannot run on its examples of shape (10,)" in proc.stderr
    debug = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert list(tmp_path.iterdir()) == []


BAD_EXPORT = {
    "shape": (["--checkpoint", "{w}/a.safetensors", "--input-shape", "2,10"],
              ["--input-shape 2,10", "cannot run"]),
    "shape text": (["--checkpoint", "{w}/a.safetensors", "--input-shape", "2,a"], ["--input-shape"]),
    "checkpoint": (["--checkpoint", "{w}/nope.pt", "--input-shape", "2,64"], ["--checkpoint", "does not exist"]),
    "out dir": (["--checkpoint", "{w}/a.safetensors", "--input-shape", "2,64", "--out", "{t}/no/a.onnx"],
                ["--out", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD_EXPORT))
def test_export_bad_input(work, tmp_path, case):
    extra, phrases = BAD_EXPORT[case]
    extra = [e.format(w=work, t=tmp_path) for e in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "a.onnx")]
    assert_one_line_error(cli("export", "--model", "fixtures.zoo:mlp3", *extra), *phrases)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# demo


def test_demo_default_pair(wheel_demo):
    """The embedded default pair, trained and merged by the README's ``graphrepair demo``: the one
    run of it per session, from the built wheel (tests/conftest.py), which records its results."""
    assert wheel_demo.result.returncode == 0, wheel_demo.result.stderr
    r = wheel_demo.probe["demo"]
    curves = {c["label"]: c for c in r["curves"]}
    at = curves["REPAIR"]["alphas"].index(0.5)
    acc = {k: c["accuracy"][at] for k, c in curves.items()}
    assert acc["REPAIR"] >= acc["aligned"] > acc["naive"]
    assert acc["REPAIR"] > 0.85 and curves["REPAIR"]["accuracy_barrier"] < curves["aligned"]["accuracy_barrier"]
    assert r["merged"]["folded"] == r["merged"]["resets"] == 8
    assert "REPAIR: 8 of 8 resets folded into the weights" in wheel_demo.result.stdout
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert r["seconds"]["total"] < 120
    # the ONNX file is the REPAIRed midpoint: its accuracy is the REPAIR curve's at alpha 0.5
    from graphrepair.demo.data import digits
    x, y = digits("test", flatten=True)
    got = onnx_outputs(wheel_demo.cwd / "graphrepair-demo" / "merged.onnx", x.numpy())
    assert abs(float((got.argmax(1) == y.numpy()).mean()) - acc["REPAIR"]) < 1e-9


def mlp3_pair(work: Path):
    """The two mlp3 networks the module trained, as a DemoPair on the digits (no training)."""
    from fixtures.zoo import mlp3
    from graphrepair.demo import DemoPair
    from graphrepair.demo.data import digits
    from graphrepair.io.data import ArrayDataset

    models = []
    for name in ("a", "b"):
        m = mlp3()
        m.load_state_dict(load_file(str(work / f"{name}.safetensors")))
        models.append(m.eval())
    x, y = digits("train", flatten=True)
    xt, yt = digits("test", flatten=True)
    return DemoPair("mlp3", "mlp3 on digits", models[0], models[1], ArrayDataset(x), ArrayDataset(xt, yt))


def test_demo_command_json(work, tmp_path, monkeypatch):
    """``demo --json`` through the CLI: files, report and ONNX agree (on the module's mlp3 pair; the
    default pair's run is test_demo_default_pair's)."""
    from graphrepair import demo

    pair = mlp3_pair(work)
    for module in (demo, demo.run):  # the CLI checks --pair, run_demo builds it
        monkeypatch.setattr(module, "available_pairs", lambda: {"mlp3": lambda **options: pair})
    out = tmp_path / "demo"
    result = cli("-q", "demo", "--pair", "mlp3", "--out", out, "--alphas", "3", "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["pair"] == "mlp3" and r["paths"] == {k: str(out / n) for k, n in demo.OUTPUT_NAMES.items()}
    assert sorted(p.name for p in out.iterdir()) == ["barrier.png", "layers.png", "merged.onnx"]
    curves = {c["label"]: c for c in r["curves"]}
    assert list(curves) == ["naive", "aligned", "REPAIR"] and curves["REPAIR"]["alphas"] == [0, 0.5, 1]
    assert r["merged"]["folded"] == r["merged"]["resets"] == 3 and r["onnx"]["max_abs_diff"] < 1e-4
    assert len(r["layers"]) == 3 and r["layer_alpha"] == 0.5
    x, y = pair.eval.x.numpy(), pair.eval.y.numpy()
    got = onnx_outputs(out / "merged.onnx", x)
    assert abs(float((got.argmax(1) == y).mean()) - curves["REPAIR"]["accuracy"][1]) < 1e-9


def test_run_demo_returns_figures_without_writing(work, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from graphrepair.demo import run_demo

    pair = mlp3_pair(work)
    monkeypatch.chdir(tmp_path)
    result = run_demo(None, pair=pair, alphas=3)
    assert set(result.figures) == {"barrier", "layers"}
    assert all(isinstance(f, Figure) for f in result.figures.values())
    assert len(result.figures["barrier"].axes) == 2 and len(result.figures["layers"].axes) == 2
    assert result.paths == {} and list(tmp_path.iterdir()) == []
    text = result.text()
    assert "naive (no alignment)" in text and "aligned + REPAIR (exact)" in text and "per layer" in text
    assert [c.label for c in result.study.curves] == ["naive", "aligned", "REPAIR"]


def test_demo_bad_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(cli("demo", "--out", f), "--out", "is a file")
    assert_one_line_error(cli("demo", "--out", f / "sub"), "--out", "cannot create")
    assert_one_line_error(cli("demo", "--pair", "nope", "--out", tmp_path / "d"), "--pair", "digits-mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_inspect_still_works():
    result = cli("inspect", "--model", "fixtures.zoo:mlp3", "--input-shape", "2,64", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["free_channels"] == 96


def test_demo_hook_lists_shipped_pairs_only_when_present(tmp_path, monkeypatch):
    from graphrepair import demo

    pairs = pytest.importorskip("fixtures.pairs")
    if not hasattr(pairs, "CHECKPOINTS") or not pairs.PAIRS:
        pytest.skip("fixtures.pairs has another shape")
    monkeypatch.setattr(pairs, "CHECKPOINTS", tmp_path)
    assert demo.shipped_pairs() == {} and list(demo.available_pairs()) == ["digits-mlp"]
    name, pair = next(iter(pairs.PAIRS.items()))
    for path in pair.paths():
        path.write_bytes(b"")
    assert list(demo.shipped_pairs()) == [name]
    assert set(demo.available_pairs()) == {name, "digits-mlp"}
