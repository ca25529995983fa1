"""Models and calls under ``torch.inference_mode``, as users hold them: an evaluation script wraps
its work in inference mode, and a model built or loaded under it holds inference tensors (no
version counter; out of inference mode they can neither require grad nor change in place).

Every entry point works in both cases; what it returns holds ordinary tensors (a merged model
can be run with autograd and trained afterwards, like the models given), and the given models
come back unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch

import graphrepair as gr
from graphrepair.merging.merge import merge_prepared
from tests.helpers import ConvBNNet, randomize_


def _models(built_in_inference: bool):
    with torch.inference_mode() if built_in_inference else contextlib.nullcontext():
        a = randomize_(ConvBNNet().eval(), seed=1)
        b = randomize_(ConvBNNet().eval(), seed=2)
        x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 4, (48,), generator=torch.Generator().manual_seed(1))
    assert all(t.is_inference() == built_in_inference for t in [*a.state_dict().values(), x])
    return a, b, x, y


def _snapshot(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    with torch.inference_mode(False):
        return [(k, t, t.detach().clone()) for k, t in model.state_dict(keep_vars=True).items()]


def _given_back(model: torch.nn.Module, snapshot) -> None:
    now = model.state_dict(keep_vars=True)
    for k, t, values in snapshot:
        assert now[k] is t, k  # the caller's own tensors
        assert torch.equal(t, values), k
    assert not model.training


def _ordinary(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Ordinary tensors only, and the model trains: one step of autograd and SGD out of inference mode."""
    assert not any(t.is_inference() for t in model.state_dict().values())
    x = x.clone()  # (an inference tensor as input is fine, but not what this checks)
    model.train()
    loss = model(x[:8]).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


CALLS = {
    "merge_models activation exact": lambda a, b, x, y: gr.merge_models([a, b], x, num_examples=48, batch_size=16).model,
    "merge_models weight, no repair": lambda a, b, x, y: gr.merge_models([a, b], x, num_examples=48, batch_size=16,
                                                                         method="weight", repair=None).model,
    "merge approx": lambda a, b, x, y: gr.merge(a, b, x, num_examples=48, batch_size=16, repair="approx"),
    "merge_models graph output": lambda a, b, x, y: gr.merge_models([a, b], x, num_examples=48, batch_size=16,
                                                                    output="graph").model,
    "prepare, merge_prepared": lambda a, b, x, y: merge_prepared(
        gr.prepare([a, b], x, num_examples=48, batch_size=16), [0.5, 0.5], "exact").model,
    "align, permute": lambda a, b, x, y: gr.permute(b, gr.discover(a, (x[:2],)),
                                                    gr.align(a, b, x, num_examples=48, batch_size=16)),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("where", ["called in inference mode", "models built in inference mode"])
def test_an_entry_point_under_inference_mode_returns_ordinary_models_and_gives_the_models_back(call, where):
    a, b, x, y = _models(built_in_inference=where == "models built in inference mode")
    before = [_snapshot(m) for m in (a, b)]
    with torch.inference_mode() if where == "called in inference mode" else contextlib.nullcontext():
        out = CALLS[call](a, b, x, y)
    for m, snap in zip((a, b), before):
        _given_back(m, snap)
    with torch.no_grad():
        assert torch.isfinite(out(x[:4])).all()
    _ordinary(out, x)
    for m, snap in zip((a, b), before):  # (training the result changed nothing of the models given)
        _given_back(m, snap)


@pytest.mark.parametrize("where", ["called in inference mode", "models built in inference mode"])
def test_barrier_evaluate_and_export_under_inference_mode(tmp_path, where):
    a, b, x, y = _models(built_in_inference=where == "models built in inference mode")
    before = [_snapshot(m) for m in (a, b)]
    with torch.inference_mode() if where == "called in inference mode" else contextlib.nullcontext():
        curve = gr.barrier(a, b, eval_data=(x, y), fit_data=x, alphas=3, num_examples=48, batch_size=16)
        accuracy, loss = gr.evaluate(a, (x, y))
        report = gr.export_onnx(a, x[:2], tmp_path / "a.onnx")
    assert len(curve.alphas) == 3 and all(0.0 <= v <= 1.0 for v in curve.accuracy)
    assert 0.0 <= accuracy <= 1.0 and loss > 0
    assert (tmp_path / "a.onnx").stat().st_size > 0 and report.max_abs_diff < 1e-4
    for m, snap in zip((a, b), before):
        _given_back(m, snap)
