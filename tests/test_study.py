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


# -- a study made by hand ----------------------------------------------------------------------------

def _hand_study():
    from graphrepair.study.metrics import Curve
    from graphrepair.study.runner import Study

    alphas = [0.0, 0.5, 1.0]
    curves = [Curve("naive", alphas, [0.9, 0.1, 0.8], [0.2, 2.3, 0.3]),
              Curve("aligned", alphas, [0.9, 0.6, 0.8], [0.2, 0.9, 0.3]),
              Curve("REPAIR", alphas, [0.9, 0.85, 0.8], [0.2, 0.35, 0.3])]
    layers = [{"node": "_1", "layer": "1", "kind": "conv/linear", "channels": 32,
               "variance_ratio": {"aligned": 0.5, "REPAIR": 0.99}, "llfc_cosine": {"aligned": 0.8, "REPAIR": 0.9}}]
    return Study(curves=curves, method="activation", repair="exact", examples=100, groups=2, free_channels=64,
                 mean_corr={"1": 0.5, "3": 0.7}, layers=layers, layer_labels=["aligned", "REPAIR"])


def test_a_study_renders_its_dict():
    st = _hand_study()
    assert st.endpoints == {"A": (0.9, 0.2), "B": (0.8, 0.3)}
    assert st.curve("aligned") is st.curves[1]
    with pytest.raises(KeyError):
        st.curve("refit")
    d = st.as_dict()
    assert d["mean_corr_summary"] == {"min": 0.5, "mean": pytest.approx(0.6, abs=1e-12)}
    assert d["endpoints"] == {"A": {"accuracy": 0.9, "loss": 0.2}, "B": {"accuracy": 0.8, "loss": 0.3}}
    assert [c["label"] for c in d["curves"]] == ["naive", "aligned", "REPAIR"]
    # the naive midpoint is 0.75 below the line at 0.85 (accuracy) and 2.05 above 0.25 (loss)
    assert d["curves"][0]["accuracy_barrier"] == pytest.approx(0.75, abs=1e-12)
    assert d["curves"][0]["loss_barrier"] == pytest.approx(2.05, abs=1e-12)
    assert d["curves"][2]["accuracy_barrier"] == pytest.approx(0.0, abs=1e-12)
    assert (d["layer_alpha"], d["layers"], d["notes"]) == (0.5, st.layers, [])
    assert {k: d[k] for k in ("method", "repair", "examples", "groups", "free_channels")} == {
        "method": "activation", "repair": "exact", "examples": 100, "groups": 2, "free_channels": 64}
    st.layers = []
    assert st.as_dict()["layer_alpha"] is None


def test_a_study_renders_its_tables():
    st = _hand_study()
    rows = [line.split() for line in st.curve_table().splitlines()]
    assert rows[0] == ["alpha", "acc", "naive", "acc", "aligned", "acc", "REPAIR", "loss", "naive", "loss", "aligned",
                       "loss", "REPAIR"]
    assert rows[2] == ["0.00", "90.00", "90.00", "90.00", "0.2000", "0.2000", "0.2000"]
    assert rows[3] == ["0.50", "10.00", "60.00", "85.00", "2.3000", "0.9000", "0.3500"]
    assert rows[5] == ["barrier", "75.00", "25.00", "0.00", "2.0500", "0.6500", "0.1000"]
    summary = st.summary_table().splitlines()
    assert summary[0].split() == ["model", "acc", "%", "@0.5", "loss", "@0.5", "acc", "barrier", "(pts)", "loss",
                                  "barrier"]
    assert summary[2].split() == ["model", "A", "90.00", "0.2000"]
    assert summary[4].split() == ["naive", "(no", "alignment)", "10.00", "2.3000", "75.00", "2.0500"]
    assert summary[6].split() == ["aligned", "+", "REPAIR", "(exact)", "85.00", "0.3500", "0.00", "0.1000"]
    layer = st.layer_table().splitlines()
    assert layer[2].split() == ["1", "conv/linear", "32", "0.500", "0.990", "0.800", "0.900"]
    st.layers = []
    assert st.layer_table() == ""


def test_text_tables_and_numbers():
    from graphrepair.study.tables import number, percent, plural, text_table, wrapped_table

    assert text_table(["name", "n"], [["a", 1], ["bbb", 22]]) == "name   n\n----  --\na      1\nbbb   22"
    assert (percent(0.12345), percent(None), number(1 / 3), number(2.0, 1)) == ("12.35", "-", "0.3333", "2.0")
    assert (plural(1, "group"), plural(3, "group"), plural(2, "axis", "axes")) == ("1 group", "3 groups", "2 axes")
    rows = [[f"g{i}", i] for i in range(30)]
    wrapped = wrapped_table(["group", "size"], rows, max_rows=12).splitlines()
    assert len(wrapped) == 2 + 10  # 30 rows in 3 blocks of 10, side by side
    assert wrapped[2].split() == ["g0", "0", "|", "g10", "10", "|", "g20", "20"]
    assert wrapped_table(["group", "size"], rows[:5]) == text_table(["group", "size"], rows[:5])


def test_example_counts_and_labels():
    """What a study counts as the examples of its data (``Examples.count``): known for arrays,
    unknown (None) for a loader before a pass has read it."""
    import torch
    from torch.utils.data import DataLoader

    from graphrepair.io.examples import Examples
    from graphrepair.study.runner import repair_label

    x = torch.zeros(7, 3)
    assert Examples(x).count == 7 and Examples(TensorDataset(x, x)).count == 7
    assert Examples(x, 5).count == 5
    assert Examples(DataLoader(TensorDataset(x), batch_size=2)).count is None  # counts batches
    assert [repair_label(r) for r in ("exact", "approx", "reset", None)] == ["REPAIR", "REPAIR-approx", "BN-reset", None]


def test_plots_of_a_hand_made_study(tmp_path):
    """The figures carry one line per curve (per label for the layers) with the curve's own
    numbers and barrier in the legend, and are written atomically as the suffix names."""
    from graphrepair.errors import OutputError
    from graphrepair.study.plots import barrier_figure, check_plot_path, layers_figure, layers_path, save_figure

    st = _hand_study()
    fig = barrier_figure(st.curves, "hand")
    ax_acc, ax_loss = fig.axes
    assert [list(line.get_ydata()) for line in ax_acc.get_lines()] == [[90.0, 10.0, 80.0], [90.0, 60.0, 80.0],
                                                                       [90.0, 85.0, 80.0]]
    assert [t.get_text() for t in ax_acc.get_legend().get_texts()] == [
        "naive (barrier 75.0 pts)", "aligned (barrier 25.0 pts)", "REPAIR (barrier 0.0 pts)"]
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()][0] == "naive (barrier 2.050)"
    layers = layers_figure(st.layers, st.layer_labels)
    assert [list(line.get_ydata()) for line in layers.axes[0].get_lines()][:2] == [[0.5], [0.99]]
    assert layers_path(tmp_path / "path.png") == tmp_path / "path_layers.png"
    written = save_figure(fig, tmp_path / "path.png")
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["path.png"]
    with pytest.raises(OutputError, match=r"--plot '.*p\.xyz': cannot write a figure as '\.xyz'"):
        check_plot_path(tmp_path / "p.xyz")
