"""The graphs a merge keeps per spec (graphrepair/merging/kept.py): the next merge of the same spec
takes the paired graph and the REPAIR plan instead of making them again, merges exactly as a first
merge does, and nothing kept holds a model or its weights."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import graphrepair as gr
from fixtures.zoo import resnet20
from graphrepair.discovery import reuse
from graphrepair.merging import kept

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


@pytest.fixture(autouse=True)
def fresh():
    kept.clear()
    reuse.clear()
    yield
    kept.clear()
    reuse.clear()


def _pair():
    torch.manual_seed(0)  # LayerNorm residual streams: some resets scale only, some are left out
    a, b = resnet20("ln", width=1).eval(), resnet20("ln", width=1).eval()
    return a, b, torch.randn(48, 3, 16, 16)


@pytest.mark.parametrize("repair", ["exact", "approx"])
def test_the_next_merge_of_a_spec_takes_what_the_first_made_and_merges_the_same(repair):
    a, b, x = _pair()
    first = gr.merge_models([a, b], x, num_examples=48, batch_size=16, repair=repair)
    made = kept.info()
    assert made["entries"] == 2  # the paired graph, the plan of the class's resets
    first.treated.clear()  # what the caller does with its result is not what the next merge plans
    again = gr.merge_models([a, b], x, num_examples=48, batch_size=16, repair=repair)
    assert kept.info()["hits"] - made["hits"] == 2 and kept.info()["misses"] == made["misses"]
    kept.clear()
    reuse.clear()
    fresh_ = gr.merge_models([a, b], x, num_examples=48, batch_size=16, repair=repair)
    assert again.treated == fresh_.treated and any(v.startswith("scale only") for v in again.treated.values())
    assert any(v.startswith("left out") for v in again.treated.values())
    sd, ref = again.model.state_dict(), fresh_.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_what_is_kept_holds_no_model_and_a_changed_model_makes_its_own():
    a, b, x = _pair()
    gr.merge_models([a, b], x, num_examples=48, batch_size=16)
    gone = weakref.ref(b)
    del b
    gc.collect()
    assert gone() is None  # the kept pair holds neither model (nor its taps' sums)
    for entries in kept._kept.values():
        for module in entries.values():
            if isinstance(module, torch.nn.Module):
                assert list(module.parameters()) == [] and list(module.buffers()) == []
    before = kept.info()
    wider = resnet20("ln", width=2).eval()
    gr.merge_models([wider, resnet20("ln", width=2).eval()], x, num_examples=48, batch_size=16)
    assert kept.info()["hits"] == before["hits"]  # another spec: its own graphs
    assert kept.info()["entries"] == before["entries"] + 2
