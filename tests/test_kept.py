"""What a merge keeps per spec (graphrepair/merging/kept.py): the next merge of the same spec takes
the paired graph, the REPAIR plan and the merged graph instead of making them again, merges exactly
as a first merge does, and nothing kept holds a model or a merge's weights."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import graphrepair as gr
from fixtures.zoo import ZOO, resnet20
from graphrepair.discovery import reuse
from graphrepair.merging import kept
from passes.reset import Reset

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
    (traced,) = list(kept._kept)
    own = {t.data_ptr() for t in traced.state_dict().values()}
    for key, made in kept._kept[traced].items():
        if key[0] == "pair":  # unbound: no model, no tap
            assert list(made.parameters()) == [] and list(made.buffers()) == []
        else:  # the merged graph: the traced graph's tensors, not the merge's weights
            plan, graph, steps = made
            assert graph is not None and plan
            # the fold's steps, played again by the next merge: every reset of the graph, in order
            folded = [path for path, _ in steps]
            assert folded == [name for name, m in graph.named_modules() if isinstance(m, Reset)]
            weights = [t for name, t in graph.state_dict().items() if "_gr_reset" not in name]
            assert weights and all(t.data_ptr() in own for t in weights)
    before = kept.info()
    wider = resnet20("ln", width=2).eval()
    gr.merge_models([wider, resnet20("ln", width=2).eval()], x, num_examples=48, batch_size=16)
    assert kept.info()["hits"] == before["hits"]  # another spec: its own graphs
    assert kept.info()["entries"] == before["entries"] + 2


CASES = [(name, "exact") for name in ["mlp10", "resnet20_bn", "transformer_tiny", "convnext_tiny", "densenet_tiny",
                                      "gpt2_tiny", "vit_tiny", "bert_tiny"]] + [("resnet20_bn", "approx"), ("gpt2_tiny", "approx")]


@pytest.mark.parametrize("name,repair", CASES)
def test_merges_that_take_what_was_kept_are_the_first_merge_bit_for_bit(name, repair):
    """symbolic_trace and torch.export graphs (the Hugging Face models), every reset folding or
    some left out, exact and closed-form REPAIR: a second and a third merge of the spec equal a
    merge that made everything."""
    if name in ("gpt2_tiny", "vit_tiny", "bert_tiny"):
        pytest.importorskip("transformers")
    entry = ZOO[name]
    torch.manual_seed(0)
    a, b = entry.factory().eval(), entry.factory().eval()
    (x,) = entry.example_inputs(batch=24, seed=1)
    merges = [gr.merge_models([a, b], x, num_examples=24, batch_size=8, repair=repair) for _ in range(3)]
    assert kept.info()["hits"] >= 4
    kept.clear()
    fresh_ = gr.merge_models([a, b], x, num_examples=24, batch_size=8, repair=repair)
    ref = fresh_.model.state_dict()
    for m in merges:
        assert type(m.model) is type(a) and m.treated == fresh_.treated
        sd = m.model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), name
