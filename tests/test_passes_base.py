"""passes.base: every pass returns a PassResult and does what its ``in_place`` declaration says;
what a pass inserts is recorded on the inserted node (``node.meta["graphrepair"]``)."""

from __future__ import annotations

import copy

import pytest
import torch

import passes
from passes import (
    ObserverSpec,
    PassResult,
    ResetSpec,
    fold_affines,
    fold_batchnorms,
    insert_observers,
    insert_resets,
    observers,
    pair_graph,
    resets,
    set_mode,
)
from passes.base import META_KEY, PASSES
from tests.helpers import ConvBNNet, randomize_

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _graph():
    model = randomize_(ConvBNNet().eval(), 0)
    return model, torch.fx.symbolic_trace(model)


def _reset_spec(c=6):
    return {"bn": ResetSpec(1, torch.zeros(c), torch.ones(c))}


def _collected():
    """A graph with one reset that has seen a batch (ready for apply mode)."""
    _, gm = _graph()
    gm = insert_resets(gm, _reset_spec()).graph_module
    with torch.no_grad():
        gm(X)
    return gm


def _applied():
    gm = _collected()
    set_mode(gm, "apply")
    return gm


# pass name -> (the GraphModule it is given, the call)
CASES = {
    "insert_observers": (lambda: _graph()[1], lambda gm: insert_observers(gm, {"conv": ObserverSpec(1)})),
    "insert_resets": (lambda: _graph()[1], lambda gm: insert_resets(gm, _reset_spec())),
    "set_mode": (_collected, lambda gm: set_mode(gm, "apply")),
    "fold_affines": (_applied, lambda gm: fold_affines(gm)),
    "fold_batchnorms": (lambda: _graph()[1], lambda gm: fold_batchnorms(gm)),
    "pair_graph": (lambda: _graph()[1], lambda gm: pair_graph(gm, gm, copy.deepcopy(gm), {"conv": _Nothing()})),
}


class _Nothing(torch.nn.Module):
    def forward(self, a, b):
        return None


def test_every_pass_is_declared_and_covered():
    """Every function of ``passes`` that returns a PassResult is a declared pass, and every
    declared pass has a case below."""
    returning = {name for name in passes.__all__
                 if getattr(getattr(passes, name), "__annotations__", {}).get("return") == "PassResult"}
    declared = {fn.__name__ for fn in PASSES}
    assert returning == declared
    assert declared == set(CASES)
    for fn in PASSES:
        assert isinstance(fn.in_place, bool), fn.__name__


def _snapshot(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, dict(gm.named_modules())


@pytest.mark.parametrize("fn", PASSES, ids=lambda fn: fn.__name__)
def test_pass_returns_a_result_and_keeps_its_in_place_declaration(fn):
    make, call = CASES[fn.__name__]
    gm = make()
    code, state, modules = _snapshot(gm)
    result = call(gm)
    assert isinstance(result, PassResult)
    assert result.modified
    assert all(isinstance(v, int) for v in result.counts.values())
    if fn.in_place:
        assert result.graph_module is gm
        return
    assert result.graph_module is not gm
    assert gm.code == code and dict(gm.named_modules()) == modules
    after = gm.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_inserted_nodes_carry_what_inserted_them_and_lookups_read_it():
    _, gm = _graph()
    gm = insert_observers(gm, {"conv": ObserverSpec(1)}).graph_module
    gm = insert_resets(gm, _reset_spec(), inplace=True).graph_module
    marks = {n.name: n.meta[META_KEY] for n in gm.graph.nodes if META_KEY in n.meta}
    assert sorted(m["inserted_by"] for m in marks.values()) == ["insert_observers", "insert_resets"]
    assert sorted(m["after"] for m in marks.values()) == ["bn", "conv"]
    # the lookups go by the node's record, not by what a module says about itself
    for m in gm.modules():
        if hasattr(m, "source"):
            m.source = "renamed"
    assert set(observers(gm)) == {"conv"} and set(resets(gm)) == {"bn"}


def test_pair_graph_nodes_say_which_copy_and_which_node_they_are():
    _, gm = _graph()
    pair = pair_graph(gm, gm, copy.deepcopy(gm), {"conv": _Nothing()}).graph_module
    sides = {n.name: n.meta[META_KEY] for n in pair.graph.nodes if META_KEY in n.meta}
    assert sides["a_conv"] == {"side": "a", "of": "conv"} and sides["b_fc"] == {"side": "b", "of": "fc"}
    taps = [m for m in sides.values() if m.get("inserted_by") == "pair_graph"]
    assert taps == [{"inserted_by": "pair_graph", "after": "conv"}]
    assert all(META_KEY not in n.meta for n in gm.graph.nodes)  # the input graph is not annotated


def test_set_mode_counts_what_it_switched():
    gm = _collected()
    assert set_mode(gm, "collect").counts == {"resets": 0}
    result = set_mode(gm, "apply")
    assert result.modified and result.counts == {"resets": 1}
    assert not set_mode(gm, "apply").modified


class _Refusing:
    """An object deepcopy refuses."""

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle '_Refusing' object")


def test_deepcopy_quietly_shares_what_it_cannot_copy_and_copies_the_rest_once():
    from passes.base import deepcopy_quietly
    from passes.errors import CopyWarning

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    bad, kept = _Refusing(), torch.ones(2, requires_grad=True) * 3  # (a tensor with a grad_fn)
    model[0].bad = bad
    model.items = [torch.zeros(1), bad]
    model[1].kept = kept
    given = torch.full((1,), 7.0)
    with pytest.warns(CopyWarning) as caught:
        clone = deepcopy_quietly(model, {id(model[1].weight): given})
    assert {str(w.message) for w in caught} == {
        "an item of attribute 'items' of the Sequential and attribute 'bad' of module '0' (a "
        "tests.test_passes_base._Refusing) cannot be copied: the copy shares this object with the original",
        "attribute 'kept' of module '1' is a tensor computed with autograd (it has a grad_fn), which deepcopy "
        "refuses: the copy holds its values, detached from the graph"}
    assert clone[0].bad is bad and clone.items[1] is bad  # one object, shared wherever it is held
    assert clone.items is not model.items and clone.items[0] is not model.items[0]
    assert clone[1].weight is given  # the caller's memo holds
    assert clone[0].weight is not model[0].weight and torch.equal(clone[0].weight, model[0].weight)
    assert clone[1].kept.grad_fn is None and clone[1].kept.requires_grad and torch.equal(clone[1].kept, kept)
    assert clone[0] is not model[0] and clone[0].bad is bad


def test_deepcopy_quietly_names_what_cannot_be_copied_itself():
    from passes.base import deepcopy_quietly
    from passes.errors import CopyError

    with pytest.raises(CopyError, match=r"_Refusing cannot be copied \(TypeError: cannot pickle '_Refusing' object\)"):
        deepcopy_quietly(_Refusing())


def test_deepcopy_quietly_never_shares_a_module():
    # a copy sharing a submodule would give the original's layer the copy's weights
    from passes.base import deepcopy_quietly
    from passes.errors import CopyError

    class Stubborn(torch.nn.Linear):
        def __deepcopy__(self, memo):
            raise TypeError("no")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Stubborn(2, 2))
    with pytest.raises(CopyError, match=r"^Stubborn \(module '1'\) cannot be copied \(TypeError: no\)"):
        deepcopy_quietly(model)
