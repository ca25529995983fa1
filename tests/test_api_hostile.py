"""Hostile input against the Python API: every error it raises for bad input is a GraphRepairError
subclass with a message that says what is wrong, and nothing is accepted that only pretends to work
(a "proof" over a model of another architecture, NaN weights that "verify", complex weights that
lose their imaginary part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.errors import CheckpointError, DataError, GraphRepairError, MismatchError, NumericError
from tests import hostile_models


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    a = hostile_models.MLP().eval()
    torch.manual_seed(1)
    b = hostile_models.MLP().eval()
    x = torch.randn(120, 64, generator=torch.Generator().manual_seed(0))
    return a, b, x


class Other(nn.Module):
    """Another architecture with the same input and output sizes and no parameter in common."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


def test_spec_check_refuses_another_architecture(pair):
    a, _, x = pair
    spec = gr.discover(a, x[:2])
    assert spec.check(a, x[:2]) < 1e-4
    with pytest.raises(MismatchError, match="has no 'a.weight'.*another architecture"):
        spec.check(Other(), x[:2])
    wider = nn.Module()
    wider.a, wider.b, wider.head = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 10)
    with pytest.raises(MismatchError, match="'a.weight' .* shape \\(48, 64\\)"):
        spec.check(wider, x[:2])


@pytest.mark.parametrize("alpha", [np.float32(0.25), torch.tensor(0.25), np.array(0.25), 0.25, 1])
def test_merge_takes_any_real_alpha(pair, alpha):
    a, b, x = pair
    merged = gr.merge(a, b, x, alpha=alpha, method="weight", repair=None, num_examples=len(x))
    w = float(alpha)
    expected = (1 - w) * a.head.bias + w * b.head.bias  # the head's outputs are fixed: no permutation
    torch.testing.assert_close(merged.head.bias, expected)


@pytest.mark.parametrize("alpha,message", [
    (torch.tensor([0.5, 0.5]), "alpha must be a real number, got a Tensor of shape \\(2,\\)"),
    (True, "alpha must be a real number, got a bool"),
    ("0.5", "alpha must be a real number, got a str"),
    (float("nan"), "alpha must be in \\[0, 1\\].*got nan"),
    (np.float64(1.5), "alpha must be in \\[0, 1\\].*got 1.5"),
])
def test_merge_refuses_bad_alpha(pair, alpha, message):
    a, b, x = pair
    with pytest.raises(GraphRepairError, match=message):
        gr.merge(a, b, x, alpha=alpha)


@pytest.mark.parametrize("weights", [[float("nan")] * 2, [float("inf"), -float("inf")], [0.5], [2.0, -1.0],
                                     "ab", [torch.tensor([0.5]), 0.5]])
def test_merge_models_refuses_bad_weights(pair, weights):
    a, b, x = pair
    with pytest.raises(GraphRepairError, match="weight"):
        gr.merge_models([a, b], x, weights=weights)



@pytest.mark.parametrize("call, message", [
    (lambda a, b, x, tmp: gr.merge(a, b, x, points="some"), "points must be 'all' or 'conv', got 'some'"),
    (lambda a, b, x, tmp: __import__("graphrepair.io.fileio", fromlist=["save_safetensors"]).save_safetensors(
        {1: torch.zeros(2)}, tmp / "s.safetensors"), "state dict keys must be str, found 1"),
    (lambda a, b, x, tmp: __import__("graphrepair.io.fileio", fromlist=["save_safetensors"]).save_safetensors(
        {"w": 3}, tmp / "s.safetensors"), "state dict entry 'w' is a int, not a tensor"),
])
def test_arguments_refused_elsewhere_are_graphrepair_errors_too(pair, tmp_path, call, message):
    """Before: a ValueError (``points``) and TypeErrors (a state dict to save), not the
    GraphRepairError every bad input gets; nothing is written."""
    a, b, x = pair
    with pytest.raises(GraphRepairError, match=message):
        call(a, b, x, tmp_path)
    assert list(tmp_path.iterdir()) == []

def test_exact_repair_without_groups_says_so():
    torch.manual_seed(0)
    a, b = hostile_models.InPlace(), hostile_models.InPlace()
    with pytest.raises(GraphRepairError, match="no permutation groups"):
        gr.merge(a, b, torch.randn(50, 64), repair="exact", num_examples=50)


@pytest.mark.parametrize("repair", ["exact", None])
def test_activations_whose_squares_overflow_are_named_not_called_nan(repair):
    """Finite activations of 1e20 have squares beyond float32: the error says so (it said "NaN/Inf
    activations?") and names the way out, which works: the same merge in float64."""
    torch.manual_seed(0)
    a, b = hostile_models.MLP(), hostile_models.MLP()
    x = torch.randn(200, 64) * 1e20
    with pytest.raises(NumericError, match=r"model A's activations at node '\w+' are finite but large "
                                           r"\(means up to \d\.\de\+\d+\): their squares overflow.*float64"):
        gr.merge(a, b, x, repair=repair, num_examples=200)
    merged = gr.merge(a.double(), b.double(), x.double(), repair=repair, num_examples=200)
    assert next(merged.parameters()).dtype == torch.float64
    assert bool(torch.isfinite(merged(x.double())).all())
    with pytest.raises(NumericError, match=r"not finite, as at every observed point \(NaN/Inf activations"):
        gr.merge(a.float(), b.float(), torch.full((200, 64), float("inf")), repair=repair, num_examples=200)


@pytest.mark.parametrize("repair", ["exact", None])
@pytest.mark.parametrize("row", [5, 150])
def test_one_nan_in_the_data_is_an_error_without_repair_too(repair, row):
    """One NaN input value makes every channel it reaches NaN in the sums; the correlations read
    NaN channels as units without signal, so alignment alone (repair=None) matched every unit by
    the weights, its note blaming dead or tied units. With every observed point NaN there is
    nothing to align on: both now say which statistics are not finite and where to look (a model
    that computes NaN at a few points merges with a note: test_public_models, t5_tiny)."""
    torch.manual_seed(0)
    a, b = hostile_models.MLP(), hostile_models.MLP()
    x = torch.randn(200, 64)
    x[row, 3] = float("nan")
    with pytest.raises(NumericError, match=r"statistics of model A at node '\w+' are not finite, as at every "
                                           r"observed point \(NaN/Inf activations: look for NaN or infinite "
                                           r"values in the data"):
        gr.merge(a, b, x, repair=repair, num_examples=200, batch_size=50)


def test_export_refuses_nan_weights_and_outputs(tmp_path, pair):
    a, _, x = pair
    broken = hostile_models.MLP()
    broken.load_state_dict(a.state_dict())
    with torch.no_grad():
        broken.b.weight[0, 0] = float("nan")
    with pytest.raises(NumericError, match="'b.weight' contains NaN"):
        gr.export_onnx(broken, x[:2], tmp_path / "m.onnx")
    with pytest.raises(NumericError, match="output .* NaN or infinite on the example"):
        gr.export_onnx(a, torch.full((2, 64), float("inf")), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_complex_refused_batchnorm_counter_optional(tmp_path):
    from graphrepair.io.fileio import save_safetensors
    from graphrepair.io.loading import load_checkpoint

    model = hostile_models.ConvBN()
    torch.save({k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in model.state_dict().items()},
               tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="complex values for real parameters.*imaginary"):
        load_checkpoint(hostile_models.ConvBN(), tmp_path / "c.pt")
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors(old, tmp_path / "old.safetensors")
    loaded = load_checkpoint(hostile_models.ConvBN(), tmp_path / "old.safetensors")
    torch.testing.assert_close(loaded.bn.running_var, model.bn.running_var)


def test_checked_data_names_the_batch():
    from graphrepair.io.checks import LabelRule
    from graphrepair.io.examples import Examples

    x = torch.randn(10, 4)

    def failing():
        yield x
        raise hostile_models.Stop("gone")

    with pytest.raises(DataError, match="src: reading batch 1 raised Stop: gone"):
        list(Examples(failing(), where="src", strict=True))
    with pytest.raises(DataError, match="src: batch 1 has inputs of dtype float64"):
        list(Examples([x, x.double()], where="src", strict=True))
    labeled = [(x, torch.zeros(10, dtype=torch.long)), (x, torch.full((10,), 7))]
    with pytest.raises(DataError, match="src: batch 1: labels range over \\[7, 7\\].*5 outputs"):
        list(Examples(labeled, where="src", labels=LabelRule(5), strict=True))
    assert len(list(Examples([x, x], where="src", strict=True))) == 2


def test_data_function_raising_base_exception(monkeypatch):
    from graphrepair.io.data import load_data

    with pytest.raises(DataError, match="raised Stop: no data today"):
        load_data("tests.hostile_models:base_exception")


def test_paths_the_os_cannot_take(tmp_path):
    from graphrepair.errors import OutputError
    from graphrepair.io.data import load_data_file
    from graphrepair.io.fileio import atomic_write

    for name in ("a\x00b.onnx", "\ud800.onnx", "n" * 300 + ".onnx"):
        with pytest.raises(OutputError):
            atomic_write(tmp_path / name, lambda p: p.write_bytes(b"x"))
    for name in ("a\x00b.npz", "\ud800.npz", "n" * 300 + ".npz"):
        with pytest.raises(DataError):
            load_data_file(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_later_batch_the_models_fail_on_is_a_data_error_naming_its_shape():
    """The API reads later batches unchecked (a model may take inputs of any size): a batch of 32
    features after batches of 64 reached the models and came back as torch's RuntimeError. Now
    the failure is a DataError naming the batch and both shapes; batches of other image sizes that
    the models take still merge, and a later batch of another float dtype is converted."""
    torch.manual_seed(0)
    a, b = hostile_models.MLP(), hostile_models.MLP()
    x = torch.randn(150, 64)
    with pytest.raises(DataError, match=r"batch 2 of the data holds examples of shape \(32,\), the first batch "
                                        r"\(64,\), and the model failed on it \(RuntimeError: mat1 and mat2"):
        gr.merge(a, b, [x[:50], x[50:100], x[100:150, :32]], num_examples=150)
    y = torch.randint(0, 10, (50,))
    with pytest.raises(DataError, match=r"batch 1 of .* holds examples of shape \(32,\), the first batch \(64,\), "
                                        r"and the model failed on it"):
        gr.evaluate(a, [(x[:50], y), (x[50:100, :32], y)])
    merged = gr.merge(a, b, [x[:50], x[50:100].double(), x[100:]], num_examples=150)
    assert next(merged.parameters()).dtype == torch.float32
    conv = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)) for _ in range(2)]
    images = [torch.randn(20, 3, 16, 16), torch.randn(20, 3, 24, 24), torch.randn(20, 3, 16, 16)]
    merged = gr.merge(*conv, images, num_examples=60)
    assert merged(images[1]).shape == (20, 3)
