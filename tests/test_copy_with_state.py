"""graphrepair.models.copy_with_state: copies that carry new weights without copying the old ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphrepair.errors import MismatchError
from graphrepair.models import copy_with_state


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied
        self.register_buffer("table", torch.arange(10.0), persistent=False)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


def _state(model, value):
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("own", [False, True])
def test_copy_carries_the_state_keeps_ties_and_leaves_the_original_alone(own):
    torch.manual_seed(0)
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _state(model, 0.5)
    clone = copy_with_state(model, state, own=own)
    assert type(clone) is Tied
    assert clone.out.weight is clone.emb.weight  # still one parameter
    assert isinstance(clone.emb.weight, nn.Parameter) and clone.emb.weight.requires_grad
    for k, v in clone.state_dict().items():
        torch.testing.assert_close(v, state[k])
    with torch.no_grad():
        clone.emb.weight.add_(1.0)
        clone.table.add_(1.0)  # a non-persistent buffer is the copy's own too
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    torch.testing.assert_close(model.table, torch.arange(10.0))
    shares = clone.emb.weight.data_ptr() == state["emb.weight"].data_ptr()
    assert shares == own  # own=True takes the caller's tensors as they are


def test_copy_casts_to_the_model_dtype_and_names_a_missing_or_misshapen_key():
    model = nn.Linear(3, 2)
    state = {k: v.double() for k, v in model.state_dict().items()}
    assert copy_with_state(model, state, own=True).weight.dtype == torch.float32
    with pytest.raises(MismatchError, match="'bias'"):
        copy_with_state(model, {"weight": model.weight})
    with pytest.raises(MismatchError, match="'weight' has shape"):
        copy_with_state(model, {"weight": torch.zeros(3, 3), "bias": model.bias})


class Small(nn.Module):
    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.fc(x)).relu()


def test_pair_reads_the_models_themselves_only_when_b_is_configured_like_a():
    from graphrepair.discovery.discover import discover
    from graphrepair.merging.stats import pair_roots

    a, b = Small().eval(), Small().eval()
    spec = discover(a, (torch.randn(2, 4),))
    ra, rb = pair_roots(spec, a, b, torch.device("cpu"))
    assert ra is a and rb is b  # no copies
    other = Small(p=0.5).eval()  # same weights' shapes, another module configuration
    ra, rb = pair_roots(spec, a, other, torch.device("cpu"))
    assert ra is not a and rb is not other
    torch.testing.assert_close(rb.fc.weight, other.fc.weight)  # B's weights in A's graph
    assert rb.fc.weight.data_ptr() != other.fc.weight.data_ptr()
