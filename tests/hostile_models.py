"""Models and data functions a hostile user hands to the command line (``--model
tests.hostile_models:NAME``, ``--data tests.hostile_models:NAME``). Small: 64 inputs (the 8x8
digits), 10 classes. ``GRAPHREPAIR_TEST_DATA`` names the .npz file the data functions read (a
test's temporary directory); the ``slow_*`` ones print a marker on stderr and sleep, for the signal
tests."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch import nn


def _x() -> torch.Tensor:
    return torch.from_numpy(np.load(os.environ["GRAPHREPAIR_TEST_DATA"])["x"])


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(os.environ["GRAPHREPAIR_TEST_DATA"])
    return torch.from_numpy(d["x"]), torch.from_numpy(d["y"])


def _marker(text: str, seconds: float) -> None:
    print(text, file=sys.__stderr__, flush=True)
    time.sleep(seconds)


# ------------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class DataDependent(MLP):
    """Python control flow on a tensor's value: symbolic tracing and torch.export both fail (and
    torch prints warnings and graph dumps while they do)."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.head(torch.relu(self.b(h)))


class FixedBatch(MLP):
    def forward(self, x):
        return super().forward(x.view(2, 64))


class InPlace(nn.Module):
    """An in-place op discovery has no rule for (a running sum over the hidden units, which no
    permutation would keep anyway): every axis it touches is fixed (here: all)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = self.a(x)
        h.cumsum_(1)
        return self.head(torch.relu(h))


class HiddenOut(nn.Module):
    """The hidden features are an output too: model outputs are fixed, so nothing may move."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(h), h


class BuffersOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(64, 10))

    def forward(self, x):
        return x @ self.w


class DictOut(MLP):
    def forward(self, x):
        return {"scores": super().forward(x)}


class TiedSquare(MLP):
    """b and c share one weight: REPAIR resets after them cannot be folded, whatever the points."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(32, 32)
        self.c.weight = self.b.weight

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(h)))


class SlowExport(MLP):
    """Sleeps inside the ONNX export (after a marker on stderr): a signal lands in the exporter."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            _marker("EXPORTING", 30)
        return super().forward(x)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8)))).mean((2, 3)))


class Einsum(nn.Module):
    """Layers written with einsum: their channels move, but REPAIR has no layer output to reset."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(64, 32) / 8)
        self.w2 = nn.Parameter(torch.randn(32, 10) / 6)

    def forward(self, x):
        return torch.einsum("nh,ho->no", torch.relu(torch.einsum("ni,ih->nh", x, self.w1)), self.w2)


MODELS = {"mlp": MLP, "data_dependent": DataDependent, "fixed_batch": FixedBatch, "in_place": InPlace,
          "hidden_out": HiddenOut, "buffers_only": BuffersOnly, "dict_out": DictOut, "tied_square": TiedSquare,
          "slow_export": SlowExport, "conv_bn": ConvBN, "einsum": Einsum}


def mlp():
    return MLP()


def data_dependent():
    return DataDependent()


def fixed_batch():
    return FixedBatch()


def in_place():
    return InPlace()


def hidden_out():
    return HiddenOut()


def buffers_only():
    return BuffersOnly()


def dict_out():
    return DictOut()


def tied_square():
    return TiedSquare()


def slow_export():
    return SlowExport()


def conv_bn():
    return ConvBN()


def einsum():
    return Einsum()


def scripted():
    return torch.jit.script(MLP())


# ------------------------------------------------------------------------------------------------
# Data functions


def meta_data():
    """Examples with a shape and no values."""
    return torch.empty(300, 64, device="meta")


def batches():
    """A one-shot generator of input batches."""
    x = _x()
    return (x[i:i + 50] for i in range(0, len(x), 50))


def raising_midway():
    x = _x()

    def gen():
        for i in range(0, len(x), 50):
            if i == 150:
                raise ValueError("the data server went away")
            yield x[i:i + 50]
    return gen()


class Stop(BaseException):
    """Not an Exception: ``except Exception`` lets it through."""


def base_exception():
    raise Stop("no data today")


def base_exception_midway():
    x = _x()

    def gen():
        yield x[:50]
        raise Stop("no more data")
    return gen()


def later_shape():
    x = _x()
    return [x[:50], x[50:100], x[100:150, :32]]


def later_dtype():
    x = _x()
    return [x[:50], x[50:100].double()]


def later_nan():
    x = _x().clone()
    x[120, 3] = float("nan")
    return [x[i:i + 50] for i in range(0, len(x), 50)]


def labeled_batches():
    x, y = _xy()
    return [(x[i:i + 50], y[i:i + 50]) for i in range(0, len(x), 50)]


def later_label_out_of_range():
    x, y = _xy()
    y = y.clone()
    y[130] = 10
    return [(x[i:i + 50], y[i:i + 50]) for i in range(0, len(x), 50)]


def later_label_float():
    b = labeled_batches()
    b[2] = (b[2][0], b[2][1].float())
    return b


def xy_lengths():
    x, y = _xy()
    return x, y[:-5]


class SlowBatches:
    """Re-iterable batches that print a marker on stderr and sleep in the middle of every full pass
    (the first full pass is the statistics pass of a merge)."""

    def __iter__(self):
        x = _x()
        for i in range(0, len(x), 50):
            if i == 100:
                _marker("PASSING", 30)
            yield x[i:i + 50]


def slow_batches():
    return SlowBatches()


def write_inputs(d) -> None:
    """The inputs the hostile tests use, into the folder ``d``: ``fit.npz`` (300 digits),
    ``test.npz`` (100, with labels), ``functions.npz`` (what the data functions read: point
    ``GRAPHREPAIR_TEST_DATA`` at it) and checkpoints ``NAME_a``/``NAME_b.safetensors`` of every
    model above (seeds 0 and 1)."""
    from pathlib import Path

    from fixtures.datasets import digits
    from graphrepair.io.fileio import save_safetensors

    d = Path(d)
    x, y = digits("train", flatten=True)
    xt, yt = digits("test", flatten=True)
    np.savez(d / "fit.npz", x=x[:300].numpy())
    np.savez(d / "functions.npz", x=x[:300].numpy(), y=y[:300].numpy())
    np.savez(d / "test.npz", x=xt[:100].numpy(), y=yt[:100].numpy())
    for name, cls in MODELS.items():
        for side, seed in (("a", 0), ("b", 1)):
            torch.manual_seed(seed)
            save_safetensors(cls().state_dict(), d / f"{name}_{side}.safetensors")
