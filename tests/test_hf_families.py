"""The families of issue 22 that tests/test_hf_models.py does not cover (``fixtures/hf_natural.py``:
tiny configs, random weights, default configs, natural dict inputs): each is discovered from its
dict batch, proved (``spec.check``), and frees the channels its hand count (``HAND``) says, or the
documented number fewer (``GAPS``, the reasons in scripts/hf_families.py's ``WHY``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import graphrepair as gr

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from fixtures.hf_natural import FAMILIES, HAND, TABLE, build  # noqa: E402
from graphrepair.merging.points import observation_points, reset_points  # noqa: E402

NEW = ["qwen3", "phi3", "gpt_neox", "gemma", "gemma2", "opt", "bloom", "gptj", "mixtral", "olmo", "mamba",
       "roberta", "distilbert", "albert", "deberta_v2", "electra", "convnext_v2", "dinov2", "wav2vec2", "whisper",
       "bart", "unet2d_condition", "dit"]

# discovered - hand, where a restriction of discovery stays (see scripts/hf_families.py's WHY)
GAPS = {"bloom": -16, "falcon": -16, "mixtral": -392, "wav2vec2": -24, "t5": -4}


def discover(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gr.discover(model, inputs)


def test_the_table_holds_the_35_families_with_a_hand_count():
    assert len(TABLE) == len(set(TABLE)) == 35
    assert set(TABLE) <= set(FAMILIES) and set(NEW) <= set(TABLE)
    assert set(HAND) == set(TABLE)
    assert all(count > 0 and what for count, what in HAND.values())


@pytest.mark.parametrize("name", NEW)
def test_discovers_proves_and_frees_the_hand_count(name):
    fam = build(name)
    assert fam.hand == HAND[name][0]
    spec = discover(fam.model, fam.inputs)
    placeholders = [n.name for n in spec.traced.gm.graph.nodes if n.op == "placeholder"]
    for key in fam.inputs:  # every keyword input reached the trace
        assert any(p == key or p.endswith(key) for p in placeholders), (key, placeholders)
    assert spec.num_free == fam.hand + GAPS.get(name, 0)
    assert not [f for f in spec.fixed if "no rule" in f.reason or "cannot handle" in f.reason]
    assert spec.check(fam.model, fam.inputs) < 1e-4


def test_an_axis_that_follows_the_batch_is_neither_observed_nor_reset():
    """DeBERTa's relative-position scores are (batch x heads, q, k): the heads move (gather keeps
    them), but the axis's length follows the batch, so no statistics are taken over it."""
    fam = build("deberta_v2")
    spec = discover(fam.model, fam.inputs)
    merged = [(n, d) for n, axes in spec.node_axes.items() for d, e in enumerate(axes)
              if d == 0 and type(e).__name__ == "Kron" and "model input" in getattr(e.outer, "reason", "")
              and not type(e.inner).__name__ == "Fixed"]
    assert merged  # the heads are free on such an axis
    names = {n for n, _ in merged}
    assert not [r for r in reset_points(spec) if r.node in names and r.axis == 0]
    assert not [p for pts in observation_points(spec).values() for p in pts if p.node in names and p.axis == 0]
    heads = [g for g in spec.groups if g.name.endswith("query_proj[0].o")]
    assert len(heads) == 2 and all(g.size == 4 for g in heads)


def test_parameters_the_forward_never_reads_stay_fixed():
    fam = build("dinov2")
    spec = discover(fam.model, fam.inputs)
    assert all(not any(m.name.endswith("mask_token") for m in g.params) for g in spec.groups)
    assert spec.param_axes["dinov2.embeddings.mask_token"][-1].reason == "not used by the traced graph"
    permuted = gr.permute(fam.model, spec, spec.random_permutations(1))
    torch.testing.assert_close(permuted.dinov2.embeddings.mask_token, fam.model.dinov2.embeddings.mask_token,
                               rtol=0, atol=0)
