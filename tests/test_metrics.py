"""study.metrics: evaluation, barriers (REPAIR's Eq. 1 on a grid), curves along the path and the
per-layer report (variance collapse, LLFC, commutativity)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import graphrepair as gr
from fixtures.datasets import digits
from graphrepair.merging.merge import merge_prepared, prepare
from tests.helpers import ConvBNNet


def test_layer_report_on_a_model_and_its_permuted_copy(digits_pair, digits_spec):
    """B = A reordered: after alignment the path is flat, so no collapse (ratio 1), features are
    linearly connected (cosine 1) and the layers commute (distance 0); the naive path is not."""
    (a, _), x, _ = digits_pair
    spec = digits_spec
    b = gr.permute(a, spec, spec.random_permutations(seed=5))
    # weight matching recovers the permutation exactly (activation matching cannot tell dead units
    # apart, and averaging two different dead units can wake one up)
    prep = prepare([a, b], x, num_examples=500, method="weight", spec=spec)
    rows = gr.layer_report(prep, merge_prepared(prep, [0.5, 0.5], None).model, 0.5)
    assert len(rows) == 3
    for row in rows:
        assert row["variance_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert row["llfc_cosine"] == pytest.approx(1.0, abs=1e-4)
        assert row["commutativity"] == pytest.approx(0.0, abs=1e-4)
    naive = prepare([a, b], x, num_examples=500, align=False, spec=spec)
    rows = gr.layer_report(naive, merge_prepared(naive, [0.5, 0.5], None).model, 0.5)
    assert all(r["commutativity"] > 0.1 for r in rows[1:])
    assert rows[-1]["variance_ratio"] < 0.9


def test_curve_reuses_known_endpoints_exactly(digits_pair, digits_spec, digits_prepared):
    """B and the aligned B' compute the same function, so a curve given another curve's endpoint
    figures equals one that evaluates them again."""
    from graphrepair.study.metrics import curve

    (a, b), x, _ = digits_pair
    xt, yt = digits("test")
    ev = TensorDataset(xt, yt)
    prep = digits_prepared  # 800 examples
    full = curve(prep, ev, 3, None, "aligned")
    naive = curve(prepare([a, b], x, num_examples=800, statistics=False, align=False, spec=digits_spec), ev, 3,
                  None, "naive")
    ends = ((naive.accuracy[0], naive.loss[0]), (naive.accuracy[-1], naive.loss[-1]))
    reused = curve(prep, ev, 3, None, "aligned", endpoints=ends)
    assert reused.accuracy == full.accuracy
    assert reused.loss == pytest.approx(full.loss, rel=1e-5)


def test_data_arguments_that_can_be_swapped_are_keyword_only():
    from graphrepair.study.runner import run_study

    x = torch.randn(8, 3, 8, 8)
    ev = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    a, b = ConvBNNet(), ConvBNNet()
    with pytest.raises(TypeError, match="positional"):
        gr.barrier(a, b, ev, x)
    with pytest.raises(TypeError, match="positional"):
        run_study(a, b, x, ev)
