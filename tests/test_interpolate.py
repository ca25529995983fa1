"""merging.merge.interpolate_states: the float64 convex combination of the models' weights, in
blocks for large tensors, bit for bit the plain sum."""

from __future__ import annotations

import pytest
import torch

from graphrepair.merging import merge
from graphrepair.merging.merge import interpolate_states


def plain(states, weights):
    """Each floating tensor summed whole: a float64 zero, plus each model's weight times its
    float64 copy, in order, cast back."""
    out = {}
    for k, t0 in states[0].items():
        if t0.is_floating_point():
            acc = torch.zeros_like(t0, dtype=torch.float64)
            for s, w in zip(states, weights):
                acc += w * s[k].double()
            out[k] = acc.to(t0.dtype)
        else:
            out[k] = t0.clone()
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (signed zeros and NaN payloads told apart), in its logical order."""
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def state(gen: torch.Generator, dtype: torch.dtype) -> dict:
    big = merge._BLOCK * 2 + 123  # whole blocks and a remainder
    return {
        "small": torch.randn(30, 20, generator=gen).to(dtype),
        "big": torch.randn(big, generator=gen).to(dtype).view(-1, 1) * 3,
        "big_t": torch.randn(7, big // 7, generator=gen).to(dtype).T,  # not contiguous
        "zeros": torch.tensor([0.0, -0.0, 5e-39, -5e-39]).to(dtype),
        "count": torch.tensor(7),
        "empty": torch.empty(0, 4, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.25, 0.75], [0.2, 0.3, 0.5]])
def test_interpolation_is_the_plain_float64_sum_bit_for_bit(dtype, weights):
    gen = torch.Generator().manual_seed(0)
    states = [state(gen, dtype) for _ in weights]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    got, want = interpolate_states(states, weights), plain(states, weights)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].stride() == want[k].stride(), k  # laid out as model 0's tensor
        assert torch.equal(bits(got[k]), bits(want[k])), k
        # fresh tensors: writing to the result changes no model
        assert all(got[k].data_ptr() != s[k].data_ptr() for s in states if got[k].numel()), k
    for s, b in zip(states, before):
        assert all(torch.equal(bits(s[k]), bits(b[k])) for k in s)
    # the large tensor went through the blocks, and its values are the interpolation
    expected = sum(w * s["big"].double() for s, w in zip(states, weights)).to(dtype)
    assert torch.equal(got["big"], expected)
    assert not torch.signbit(got["zeros"][1])  # -0.0 in every model: +0.0, as the plain sum gives
