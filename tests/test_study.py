"""study: the runner (naive, aligned and REPAIRed curves side by side, the per-layer table), the
Study result and its views, and the plain-text tables."""

from __future__ import annotations

import sys

import pytest
from torch.utils.data import TensorDataset

import graphrepair as gr
from graphrepair.merging.merge import merge_prepared


def test_study_layers_reuse_the_curves_merges(digits_pair, monkeypatch):
    """With --layers the per-layer measurement at alpha 0.5 uses the merges the curves made there
    (no second REPAIR pass), and its figures equal a measurement of a fresh merge."""
    import graphrepair.study.runner as study_mod

    (a, b), x, y = digits_pair
    calls = []
    real = merge_prepared

    def counted(prep, weights, repair, *args, **kwargs):
        calls.append((tuple(weights), repair))
        return real(prep, weights, repair, *args, **kwargs)

    monkeypatch.setattr(study_mod, "merge_prepared", counted)
    monkeypatch.setattr(sys.modules["graphrepair.study.metrics"], "merge_prepared", counted)
    st = study_mod.run_study(a, b, fit_data=x[:300], eval_data=TensorDataset(x[300:500], y[300:500]), alphas=3,
                             num_examples=300, layers=True)
    # the naive curve merges at 0.5 and 1; the aligned and REPAIR curves at 0.5 only (their
    # endpoints come from the naive curve); the layer measurement adds none
    assert sorted(calls, key=str) == sorted([((0.5, 0.5), None), ((0.0, 1.0), None),
                                             ((0.5, 0.5), None), ((0.5, 0.5), "exact")], key=str)
    fresh = gr.layer_report(st.prep, real(st.prep, [0.5, 0.5], "exact").model, 0.5)
    label = study_mod.repair_label("exact")
    for row, want in zip(st.layers, fresh):
        assert row["variance_ratio"][label] == pytest.approx(want["variance_ratio"], rel=1e-6)
        assert row["llfc_cosine"][label] == pytest.approx(want["llfc_cosine"], rel=1e-6)
