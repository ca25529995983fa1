"""graphrepair.models.forward_hooks: a module's inputs and outputs inside a block, hooks gone after it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphrepair.models import forward_hooks


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_forward_hooks_give_each_call_its_name_inputs_and_output():
    net, x = _net(), torch.randn(3, 4)
    seen = []
    with forward_hooks({"first": net[0], "last": net[2]}, lambda name, inp, out: seen.append((name, inp, out))):
        y = net(x)
    assert [name for name, *_ in seen] == ["first", "last"]
    (name, inp, out), (_, inp_last, out_last) = seen
    torch.testing.assert_close(inp[0], x)
    torch.testing.assert_close(out, net[0](x))
    torch.testing.assert_close(inp_last[0], torch.relu(net[0](x)))
    torch.testing.assert_close(out_last, y)
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_forward_hooks_are_removed_when_the_block_raises():
    net = _net()

    def stop(*_):
        raise KeyError("stop")

    with pytest.raises(KeyError), forward_hooks({"first": net[0]}, stop):
        net(torch.randn(3, 4))
    assert not net[0]._forward_hooks
    net(torch.randn(3, 4))  # runs without the hook
