"""Merged models leave as verified ONNX with no more nodes than endpoint A's ONNX, except one
per-channel affine (Mul + Add) per reset that could not be folded."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphrepair as gr
from fixtures.zoo import ZOO
from tests.helpers import randomize_

MODELS = ["resnet20_bn", "mobilenetv2_tiny", "convnext_tiny", "transformer_tiny", "grouped_conv_net"]


def fit_data(entry, n=64):
    gen = torch.Generator().manual_seed(0)
    if entry.input_kind == "tokens":
        return torch.randint(0, entry.vocab, (n, *entry.input_shape[1:]), generator=gen)
    return torch.randn(n, *entry.input_shape[1:], generator=gen)


def merged_and_counts(name, tmp_path):
    entry = ZOO[name]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(randomize_(entry.factory().eval(), seed=seed))
    x = fit_data(entry)
    res = gr.merge_models(models, x, num_examples=64, batch_size=32, repair="exact", output="graph")
    example = x[:2]
    rep_a = gr.export_onnx(models[0], (example,), tmp_path / "a.onnx")
    rep_m = gr.export_onnx(res.model, (example,), tmp_path / "merged.onnx")
    return res, rep_a, rep_m, example


@pytest.mark.parametrize("name", MODELS)
def test_merged_onnx_verifies_and_adds_only_unfoldable_affines(name, tmp_path):
    res, rep_a, rep_m, example = merged_and_counts(name, tmp_path)
    kept = res.resets - res.folded
    assert len(res.kept) >= kept  # every reset left unfolded comes with its reason
    assert rep_m.node_count <= rep_a.node_count + 2 * kept, (rep_a.op_counts, rep_m.op_counts)
    print(f"\n{name}: endpoint A {rep_a.node_count} ONNX nodes, merged {rep_m.node_count}; "
          f"resets {res.resets}: {res.folded} folded, {res.resets - res.folded} kept")
    # the file on disk runs in a fresh onnxruntime session at another batch size
    model = onnx.load(str(tmp_path / "merged.onnx"))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    big = torch.cat([example] * 3)
    got = sess.run(None, {sess.get_inputs()[0].name: big.numpy()})[0]
    with torch.no_grad():
        want = res.model(big)
    want = want[0] if isinstance(want, (tuple, list)) else want
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


def test_export_names_a_non_finite_buffer_as_a_buffer(tmp_path):
    """The export's finiteness check says which kind of tensor holds the NaN (a BatchNorm's running
    variance is a buffer, not a parameter), non-persistent buffers included, and writes nothing."""
    import pytest
    import torch
    from torch import nn

    import graphrepair as gr
    from graphrepair.errors import NumericError

    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    m[1].running_var[2] = float("nan")
    with pytest.raises(NumericError, match=r"buffer '1\.running_var' contains NaN or Inf; the exported model"):
        gr.export_onnx(m, torch.randn(2, 3), tmp_path / "m.onnx")
    m[1].running_var.fill_(1.0)
    m.register_buffer("scratch", torch.tensor([float("inf")]), persistent=False)
    with pytest.raises(NumericError, match=r"buffer 'scratch' contains NaN or Inf"):
        gr.export_onnx(m, torch.randn(2, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
