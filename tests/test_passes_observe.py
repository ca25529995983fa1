"""passes.observe: observers and insert_observers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from passes import (
    ChannelObserver,
    ObserverSpec,
    PassError,
    channel_matrix,
    insert_observers,
    observers,
    producer_kind,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_observer_matches_torch_over_all_batches(dtype, rtol):
    """Batch moments are reduced in the activation's dtype and merged across batches in float64:
    float64 activations give float64 accuracy, float32 ones float32 accuracy per batch with no
    cancellation (mean 100, std 3: a sum-of-squares formula in float32 would lose the variance)."""
    torch.manual_seed(0)
    batches = [(torch.randn(7, 4, 3, 3, dtype=torch.float64) * 3 + 100.0).to(dtype) for _ in range(4)]
    obs = ChannelObserver(dim=1)
    for b in batches:
        assert obs(b) is b  # identity
    data = torch.cat(batches).double().transpose(0, 1).reshape(4, -1)
    assert obs.count == data.shape[1]
    torch.testing.assert_close(obs.mean, data.mean(1), rtol=rtol, atol=0)
    torch.testing.assert_close(obs.var, data.var(1, correction=0), rtol=10 * rtol, atol=0)
    torch.testing.assert_close(obs.std, data.std(1, correction=0), rtol=10 * rtol, atol=0)
    assert obs.mean.dtype == torch.float64


def test_observer_disabled_keep_and_reset():
    obs = ChannelObserver(dim=-1, keep=True)
    x = torch.randn(5, 3)
    obs(x)
    torch.testing.assert_close(obs.last, x.T)  # in the activation's dtype
    obs.enabled = False
    obs(torch.randn(5, 3))
    assert obs.count == 5
    obs.reset_stats()
    assert obs.count == 0 and obs.last is None
    with pytest.raises(PassError, match="no data"):
        obs.mean
    obs.enabled = True
    obs(x)
    with pytest.raises(PassError, match="channels"):
        obs(torch.randn(5, 4))


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_insert_observers_structure_and_statistics(how):
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(4, 3, 6, 6)
    gm = torch.fx.symbolic_trace(model) if how == "fx" else torch.export.export(model, (x,)).module()
    conv, fc = [n.name for n in gm.graph.nodes if producer_kind(gm, n) is not None]
    result = insert_observers(gm, {conv: ObserverSpec(1), fc: ObserverSpec(-1, keep=True)})
    out = result.graph_module
    # structural
    assert result.modified and result.counts == {"observers": 2}
    obs = observers(out)
    assert set(obs) == {conv, fc}
    assert not any(isinstance(m, ChannelObserver) for m in gm.modules())  # input untouched
    # numeric: identity, and statistics equal torch's
    torch.testing.assert_close(out(x), model(x))
    conv_out = model.conv(x).double()
    torch.testing.assert_close(obs[conv].mean, conv_out.mean((0, 2, 3)))
    torch.testing.assert_close(obs[conv].var, conv_out.var((0, 2, 3), correction=0))
    torch.testing.assert_close(obs[fc].last, model(x).T)


def test_insert_observers_unknown_node_names_it():
    gm = torch.fx.symbolic_trace(Small())
    with pytest.raises(PassError, match="'nonexistent'"):
        insert_observers(gm, {"nonexistent": ObserverSpec(1)})


@pytest.mark.parametrize("index", [None, torch.tensor([[0, 3], [1, 4], [2, 5]])])
def test_observer_keep_gives_the_same_statistics_and_the_gathered_matrix(index):
    """With ``keep`` the channel matrix is gathered once and the sums are taken over it: the same
    mean and variance as without, and ``.last`` is that matrix (replicas as extra samples)."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 6, 3, 3) * 2 + 7 for _ in range(3)]
    kept, plain = ChannelObserver(1, index=index, keep=True), ChannelObserver(1, index=index)
    for b in batches:
        kept(b), plain(b)
    torch.testing.assert_close(kept.mean, plain.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(kept.var, plain.var, rtol=1e-5, atol=0)
    assert kept.count == plain.count
    torch.testing.assert_close(kept.last, channel_matrix(batches[-1], 1, index))
    assert kept.last.untyped_storage().data_ptr() != batches[-1].untyped_storage().data_ptr()
