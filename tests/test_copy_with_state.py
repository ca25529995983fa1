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


class Tables(nn.Module):
    """Empty containers as attributes: one shared by two modules, and hooks only on the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.a.seen = self.b.seen = []  # not a dict: deep-copied as usual
        self.a.names = self.b.names = {}  # one empty dict, two holders
        self.a.kinds = set()

    def forward(self, x):
        return self.b(self.a(x))


def test_the_copys_empty_tables_are_its_own_as_deepcopy_makes_them():
    """``copy_with_state`` hands deepcopy new empty dicts, OrderedDicts and sets for the module's
    empty ones (its hook tables, mostly; ``models._empty_containers``): a hook, entry or member
    added to the copy is not the original's, one table held twice stays one table, and every
    attribute matches what ``copy.deepcopy`` gives."""
    import copy

    model = Tables()
    clone = copy_with_state(model, model.state_dict())
    reference = copy.deepcopy(model)
    for (name, m), (_, c), (_, r) in zip(model.named_modules(), clone.named_modules(), reference.named_modules()):
        assert vars(c).keys() == vars(r).keys(), name
        for key, v in vars(m).items():
            if isinstance(v, (dict, set)) and not v:
                assert type(vars(c)[key]) is type(v) and not vars(c)[key], (name, key)
                assert vars(c)[key] is not v, (name, key)  # the copy's own
    assert clone.a.names is clone.b.names and clone.a.names is not model.a.names
    assert clone.a.seen is clone.b.seen and clone.a.seen is not model.a.seen
    calls = []
    clone.a.register_forward_hook(lambda *args: calls.append("copy"))
    clone.a.names["k"] = 1
    clone.a.kinds.add("k")
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), clone(x))
    assert calls == ["copy"]  # the original has no hook: its table was not shared
    assert not model.a._forward_hooks and model.a.names == {} and model.a.kinds == set()
    assert clone.b.names == {"k": 1}


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
    # read where they lie (the pass only reads them), through the copy's own parameter objects
    assert rb.fc.weight.data_ptr() == other.fc.weight.data_ptr() and rb.fc.weight is not other.fc.weight


class _Versioned(nn.Module):
    """Reads its version from the state dict's metadata, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.seen = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self.seen.append((prefix, local_metadata.get("version"), local_metadata.get("assign_to_params_buffers")))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


@pytest.mark.parametrize("hooked", [False, True])
def test_assign_state_loads_as_load_state_dict_does(hooked):
    """``models.assign_state`` gives each module its own entries (not load_state_dict's filtering
    of every descendant at every level): the same tensors assigned, BatchNorm's counter, a module
    reading its version from the metadata, a module shared under two names; a module with a load
    hook goes through load_state_dict itself, and its hook runs."""
    from graphrepair.models import assign_state

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(_Versioned(), nn.BatchNorm1d(3), shared, nn.Sequential(shared, nn.ReLU()))
    model[2].register_buffer("table", torch.arange(3.0), persistent=False)  # in no state dict
    table = model[2].table
    calls = []
    if hooked:
        model[1].register_load_state_dict_post_hook(lambda module, keys: calls.append(module))
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 5
             for k, v in model.state_dict().items()}
    state["3.0.weight"] = state["2.weight"]  # the tied module: one tensor under both names
    state["3.0.bias"] = state["2.bias"]
    assign_state(model, state, own=True)
    for k, v in model.state_dict().items():
        assert v.data_ptr() == state[k].data_ptr()  # assigned, not copied
    assert int(model[1].num_batches_tracked) == int(state["1.num_batches_tracked"])
    assert model[2] is model[3][0] and model[2].weight is model[3][0].weight
    assert model[2].table is table and "2.table" not in model.state_dict()
    assert model[0].seen == [("0.", 2, True)]
    assert calls == ([model[1]] if hooked else [])
    assert isinstance(model[0].lin.weight, nn.Parameter) and model[0].lin.weight.requires_grad
