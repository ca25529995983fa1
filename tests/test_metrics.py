"""study.metrics: evaluation, barriers (REPAIR's Eq. 1 on a grid), curves along the path and the
per-layer report (variance collapse, LLFC, commutativity)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.data import TensorDataset

import graphrepair as gr
from fixtures.datasets import digits
from graphrepair.merging.merge import merge_prepared, prepare
from graphrepair.study.metrics import Curve, alpha_grid, barrier_of
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


# -- a curve made by hand ----------------------------------------------------------------------------

# alphas 0 .. 1 by 0.25; accuracy from 0.9 (A) to 0.8 (B), loss from 0.2 to 0.3: the straight lines
# are 0.9 - 0.1 a and 0.2 + 0.1 a, so the drops below / rises above them are
# accuracy 0, 0.175, 0.35, 0.025, 0 and loss 0, 0.275, 0.75, 0.125, 0.
HAND = Curve("hand", [0.0, 0.25, 0.5, 0.75, 1.0], accuracy=[0.9, 0.7, 0.5, 0.8, 0.8],
             loss=[0.2, 0.5, 1.0, 0.4, 0.3])


def test_barriers_of_a_hand_made_curve():
    assert HAND.accuracy_barrier == pytest.approx(0.35, abs=1e-12)
    assert HAND.loss_barrier == pytest.approx(0.75, abs=1e-12)
    assert barrier_of(HAND.alphas, HAND.loss) == HAND.loss_barrier
    # a path above the line (accuracy) or below it (loss) has no barrier: the endpoints give 0
    assert barrier_of([0.0, 0.5, 1.0], [0.8, 0.95, 0.9], higher_is_better=True) == 0.0
    assert barrier_of([0.0, 0.5, 1.0], [0.4, 0.1, 0.3]) == 0.0
    # on an uneven grid the line is taken at each alpha: at 0.1 it is 0.5 + 0.1 * 0.5 = 0.55
    assert barrier_of([0.0, 0.1, 1.0], [0.5, 0.15, 1.0], higher_is_better=True) == pytest.approx(0.4, abs=1e-12)


def test_a_curve_reads_the_nearest_alpha_and_renders_itself():
    assert HAND.at(0.5) == (0.5, 1.0)
    assert HAND.at(0.6) == (0.5, 1.0) and HAND.at(0.7) == (0.8, 0.4)
    assert HAND.as_dict() == {"label": "hand", "alphas": HAND.alphas, "accuracy": HAND.accuracy, "loss": HAND.loss,
                              "accuracy_barrier": HAND.accuracy_barrier, "loss_barrier": HAND.loss_barrier,
                              "notes": []}


def test_alpha_grids():
    assert alpha_grid(3) == [0.0, 0.5, 1.0]
    assert alpha_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert alpha_grid([1.0, 0.0, 0.3]) == [0.0, 0.3, 1.0]
    with pytest.raises(gr.DataError, match="at least 2 alphas"):
        alpha_grid(1)
    with pytest.raises(gr.DataError, match="at least two alphas"):
        alpha_grid([0.5])
    with pytest.raises(gr.GraphRepairError, match=r"alpha must be in \[0, 1\]"):
        alpha_grid([0.0, 1.5])


def test_evaluate_a_hand_made_classifier():
    """Logits equal to the inputs: 3 of the 4 examples are right, and the loss is the mean of
    logsumexp(logits) - logit of the label, written out."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [0.0, -1.0]])
    y = torch.tensor([0, 1, 0, 0])
    e = math.e
    want = (math.log(e**2 + 1) - 2 + math.log(1 + e) - 1 + math.log(e + e**3) - 1 + math.log(1 + 1 / e)) / 4
    for batch_size in (4, 3, 1):
        accuracy, loss = gr.evaluate(model, TensorDataset(x, y), batch_size=batch_size)
        assert accuracy == 0.75
        assert loss == pytest.approx(want, rel=1e-6)


def _scored(n=12, classes=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, classes)
    return model, torch.randn(n, 5)


@pytest.mark.parametrize("labels, words", [
    (lambda n: torch.full((n,), 4), "labels range over [4, 4] but the model has 4 outputs"),
    (lambda n: torch.full((n,), -3), "labels range over [-3, -3] but the model has 4 outputs"),
    (lambda n: torch.zeros(n, 4), "labels have dtype float32; give integer class indices; one-hot labels"),
    (lambda n: torch.zeros(n // 2, dtype=torch.long), "batch 0 has 12 inputs but labels of shape (6,)"),
])
def test_evaluate_refuses_labels_that_are_not_the_models_classes(labels, words):
    model, x = _scored()
    with pytest.raises(gr.DataError, match=re.escape(words)):
        gr.evaluate(model, [(x, labels(len(x)))])


def test_evaluate_skips_labels_marked_minus_100():
    model, x = _scored()
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y_skip = y.clone()
    y_skip[:4] = -100
    y_skip[4] = (y[4] + 1) % 4  # one wrong among the 8 scored
    acc, loss = gr.evaluate(model, [(x, y_skip)])
    assert acc == pytest.approx(7 / 8)
    ref = torch.nn.functional.cross_entropy(logits[4:], y_skip[4:])
    assert loss == pytest.approx(float(ref), rel=1e-6)
