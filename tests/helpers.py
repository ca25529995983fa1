"""Shared test helpers."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every floating parameter and buffer random values (norm weights, running statistics,
    layer scales included), so that a wrong permutation of any of them changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif t.ndim == 1:
                t.add_(0.3 * noise)
            else:
                t.add_(0.1 * noise * (t.std() if t.numel() > 1 and t.std() > 0 else 1.0))
    return model


def random_bn(c: int, cls: type = nn.BatchNorm2d) -> nn.Module:
    """A BatchNorm with random running statistics and affine parameters (not the identity)."""
    bn = cls(c)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    return bn


def graph_of(model: nn.Module, x: torch.Tensor, how: str) -> torch.fx.GraphModule:
    """``model`` as a GraphModule of the kind ``how`` names: "fx" (symbolic_trace, module calls),
    "aten" (torch.export) or "aten_decomposed" (torch.export after core decompositions)."""
    model.eval()
    if how == "fx":
        return torch.fx.symbolic_trace(model)
    ep = torch.export.export(model, (x,))
    if how == "aten_decomposed":
        ep = ep.run_decompositions()
    return ep.module()


class Head(nn.Module):
    """The layers under test followed by a nonlinearity (so their output is not the graph output)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return torch.tanh(self.body(x))


class ConvBNNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> global mean -> linear: the smallest net with a conv map, a
    norm and a classifier head."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def discover_checked(model, *inputs):
    """Discover ``model`` (in eval mode, with random weights from ``randomize_``) and prove the spec."""
    import graphrepair as gr

    torch.manual_seed(0)
    randomize_(model.eval(), seed=2)
    spec = gr.discover(model, inputs)
    spec.check(model, inputs)
    return spec


def group_of(spec, param, axis=0):
    """The group that moves axis ``axis`` of parameter ``param`` (None when it is fixed)."""
    for g in spec.groups:
        if any(m.name == param and m.axis == axis for m in g.params):
            return g
    return None


def inverse_perms(spec, perms: dict) -> dict:
    """``spec.inverse(perms)``, checked: permuting by ``perms`` and then by it is the identity
    on every parameter axis (``gr.permute(gr.permute(m, spec, perms), spec, inverse)`` is m)."""
    from graphrepair.discovery import axes as ax

    inv = spec.inverse(perms)
    vp, vi = spec.checked(perms).var_perms, spec.checked(inv).var_perms
    for key, exprs in spec.param_axes.items():
        for e in exprs:
            if not isinstance(e, ax.PerBlock) and not ax.is_fixed(e):
                assert torch.equal(ax.index(e, vp)[ax.index(e, vi)], torch.arange(e.size)), key
    return inv


def outputs(model, x):
    """``model(x)`` without gradients."""
    with torch.no_grad():
        return model(x)


def permuted_copy(name: str, model_seed: int = 1, perm_seed: int = 4):
    """(zoo entry, randomised model A, its spec, a random permutation, A permuted by it)."""
    import graphrepair as gr
    from fixtures.zoo import ZOO

    entry = ZOO[name]
    torch.manual_seed(0)
    a = randomize_(entry.factory().eval(), seed=model_seed)
    spec = gr.discover(a, entry.example_inputs())
    truth = spec.random_permutations(seed=perm_seed)
    return entry, a, spec, truth, gr.permute(a, spec, truth)


class ZeroHead(nn.Module):
    """fc1 -> tanh -> fc2 with fc2 all zeros: the output is exactly 0 whatever the input."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def finish_ranks(procs: list[subprocess.Popen], timeout: float, what: str = "") -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of every process of a multi-process run, all within ``timeout``
    seconds together; a run that does not end fails the test (``what`` names it), and no process is
    left behind."""
    out, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a two-process run did not end within {timeout} s{what}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out
