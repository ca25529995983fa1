"""passes.export_onnx: verified, atomic ONNX export with a dynamic batch axis."""

from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from fixtures.zoo import ZOO
from passes import ExportFailedError, ExportVerificationError, export_onnx, flatten_outputs

# the package re-exports the function export_onnx under the module's own name
export_module = importlib.import_module("passes.export_onnx")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"logits": self.fc(features), "features": features}


def test_export_small_cnn_with_dynamic_batch(tmp_path, capfd):
    torch.manual_seed(0)
    model = SmallCNN().train()  # export must switch to eval and switch back
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "cnn.onnx"

    report = export_onnx(model, (x,), path)

    # structural: one file, valid ONNX, a symbolic batch axis, the report describes it
    assert sorted(os.listdir(tmp_path)) == ["cnn.onnx"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert report.path == str(path)
    assert report.node_count == len(proto.graph.node) > 0
    assert report.op_counts.get("Conv") == 1 and sum(report.op_counts.values()) == report.node_count
    assert report.providers_checked[0] == "CPUExecutionProvider"
    assert 0 <= report.max_abs_diff < 1e-4
    assert model.training and model.bn.training
    # numeric: an independent onnxruntime session on a batch size never seen, outputs in order
    model.eval()
    x5 = torch.randn(5, 3, 8, 8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, features = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    with torch.no_grad():
        expected = model(x5)
    np.testing.assert_allclose(logits, expected["logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features, expected["features"].numpy(), rtol=1e-4, atol=1e-5)
    # quiet: no exporter progress chatter
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err and len(out + err) < 2000, out + err


class Liar(nn.Module):
    """Computes something else while being exported: the ONNX file differs from eager torch."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            return x * 2
        return x + 0


def test_verification_failure_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "liar.onnx"
    path.write_bytes(b"previous")
    x = torch.tensor([[1.0, -3.0, 0.5]])
    with pytest.raises(ExportVerificationError) as info:
        export_onnx(Liar(), (x,), path)
    err = info.value
    assert err.max_abs_diff == pytest.approx(3.0)
    assert err.where == (0, 1) and err.output_index == 0
    assert "differ" in str(err) and "not written" in str(err)
    assert os.listdir(tmp_path) == ["liar.onnx"] and path.read_bytes() == b"previous"


def test_export_verified_writes_nothing_and_returns_the_model(tmp_path, monkeypatch):
    """The verified model comes back as bytes (the caller writes them, atomically in graphrepair):
    nothing reaches the disk, and the bytes are the model onnxruntime checked."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3)
    verified = export_module.export_verified(model, (x,), target="m.onnx")
    assert os.listdir(tmp_path) == []
    proto = onnx.load_from_string(verified.data)
    assert verified.node_count == len(proto.graph.node) and verified.op_counts.get("Gemm", 0) + \
        verified.op_counts.get("MatMul", 0) >= 2
    session = ort.InferenceSession(verified.data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-5)
    assert verified.report("m.onnx").path == "m.onnx" and verified.max_abs_diff < 1e-4


def test_tiny_reference_noise_is_caught_at_its_location(tmp_path, monkeypatch):
    real = export_module._run_torch

    def noisy(model, args):
        outputs = real(model, args)
        name, first = outputs[0]
        first = first.clone()
        first[1, 2] += 1e-3  # beyond atol + rtol * |ref| for these values
        return [(name, first)] + outputs[1:]

    monkeypatch.setattr(export_module, "_run_torch", noisy)
    model = nn.Sequential(nn.Linear(3, 4)).eval()
    with pytest.raises(ExportVerificationError) as info:
        export_onnx(model, (torch.randn(2, 3),), tmp_path / "m.onnx", rtol=1e-5, atol=1e-5)
    assert info.value.where == (1, 2)
    assert info.value.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert os.listdir(tmp_path) == []


def test_unwritable_or_missing_directory_names_the_path(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    missing = tmp_path / "nope" / "m.onnx"
    with pytest.raises(ExportFailedError, match="nope"):
        export_onnx(model, (torch.randn(1, 2),), missing)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export_module, "open", denied, raising=False)  # the write of the verified file
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportFailedError, match=r"m\.onnx.*Permission denied.*writable"):
        export_onnx(model, (torch.randn(1, 2),), target)
    assert os.listdir(tmp_path) == []


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x
        return -x


def test_export_failure_is_reported_and_leaves_no_file(tmp_path):
    with pytest.raises(ExportFailedError, match="DataDependent"):
        export_onnx(DataDependent(), (torch.randn(2, 3),), tmp_path / "d.onnx")
    assert os.listdir(tmp_path) == []


@dataclasses.dataclass
class Pair:
    first: torch.Tensor
    second: tuple


def test_flatten_outputs_defined_order():
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    flat = flatten_outputs({"z": a, "y": (b, [c, None]), "p": Pair(d, (a,))})
    assert [name for name, _ in flat] == ["['z']", "['y'][0]", "['y'][1][0]", "['p'].first", "['p'].second[0]"]
    assert [float(t) for _, t in flat] == [0.0, 1.0, 2.0, 3.0, 0.0]
    assert flatten_outputs(a) == [("", a)]


def test_flatten_outputs_hf_model_output():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    out = modeling_outputs.SequenceClassifierOutput(logits=torch.ones(2), hidden_states=(torch.zeros(1),))
    names = [name for name, _ in flatten_outputs(out)]
    assert len(names) == 2 and "logits" in names[0] and "hidden_states" in names[1]


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1) * 3


def test_model_with_a_fixed_batch_needs_dynamic_batch_false(tmp_path):
    x = torch.randn(2, 3)
    with pytest.raises(ExportFailedError, match="dynamic_batch=False"):
        export_onnx(FixedBatch(), (x,), tmp_path / "f.onnx")
    assert os.listdir(tmp_path) == []
    report = export_onnx(FixedBatch(), (x,), tmp_path / "f.onnx", dynamic_batch=False, check_inputs=[(torch.randn(2, 3),)])
    assert "Reshape" in report.op_counts and report.max_abs_diff < 1e-6
    assert os.listdir(tmp_path) == ["f.onnx"]


# ONNX export from a batch of one with a dynamic batch axis (regression)


class ChannelsLastNorm(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm, permute back, then a (depthwise) conv
    reads the permuted tensor: exported from batch 1, the strides guard on the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.dwconv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.dwconv(h).mean((2, 3)))


@pytest.mark.parametrize("name", ["channels_last", "convnext_tiny", "vit_tiny_custom"])
def test_onnx_export_from_a_batch_of_one_runs_any_batch(tmp_path, name):
    torch.manual_seed(0)
    if name == "channels_last":
        model, shape = ChannelsLastNorm(), (1, 3, 8, 8)
    else:
        model, shape = ZOO[name].factory(), (1, *ZOO[name].input_shape[1:])
    model.eval()
    x = torch.randn(shape)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (x,), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 5):
        xb = torch.randn(batch, *shape[1:])
        (got,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(xb), rtol=1e-4, atol=1e-4)
    assert os.listdir(tmp_path) == [f"{name}.onnx"]


class _Centring(nn.Module):
    """A forward that writes into its input (preprocessing in place)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, *, scale):
        x.sub_(0.5)
        scale.mul_(2)
        return self.fc(x) * scale


def test_a_forward_writing_into_its_inputs_exports_and_verifies_on_the_example_as_given(tmp_path):
    # before: the probe, the exporter's trace and torch's reference each ran on the example the
    # run before had written into, and onnxruntime, fed the example at last, disagreed
    torch.manual_seed(0)
    model = _Centring().eval()
    x, scale = torch.randn(4, 6), torch.full((4, 1), 1.5)
    given = (x.clone(), scale.clone())
    path = tmp_path / "centring.onnx"
    report = export_onnx(model, (x,), path, kwargs={"scale": scale})
    assert torch.equal(x, given[0]) and torch.equal(scale, given[1])
    assert report.max_abs_diff < 1e-5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy(), scale.numpy()))))[0]
    want = model(x.clone(), scale=scale.clone()).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
