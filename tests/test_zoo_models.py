"""The zoo battery's ground floor: every model builds, runs, and traces the way the tracer expects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.fx

from fixtures import zoo
from fixtures.zoo import HF_MODELS, ZOO

NATIVE = sorted(set(ZOO) - HF_MODELS)
FX_TRACEABLE = [name for name in NATIVE if name != "shape_branch_cnn"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models are tiny: intra-op threads only add overhead, and on a busy machine their
    # spin-waiting slows a forward pass of resnet152_scale from milliseconds to seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    entry = ZOO[name]
    return entry.factory().eval(), entry.example_inputs()


def logits(output) -> torch.Tensor:
    """The tensor a model returns, or the ``logits`` of a Hugging Face ``ModelOutput``."""
    return output if isinstance(output, torch.Tensor) else output["logits"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_entry_is_a_named_factory(name):
    # `fixtures.zoo:NAME` on the command line must resolve to the registered factory.
    assert ZOO[name].name == name
    assert getattr(zoo, name) is ZOO[name].factory


@pytest.mark.parametrize("name", NATIVE)
def test_forward(name):
    model, inputs = build(name)
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape[0] == inputs[0].shape[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FX_TRACEABLE)
def test_symbolic_trace_matches_eager(name):
    model, inputs = build(name)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(*inputs), model(*inputs))


@pytest.mark.parametrize("name", NATIVE)
def test_torch_export_matches_eager(name):
    # torch.export is the tracer's fallback; every zoo model must take that path too.
    model, inputs = build(name)
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


def test_shape_branch_cnn_needs_torch_export():
    model, inputs = build("shape_branch_cnn")
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


def test_example_inputs():
    tokens = ZOO["transformer_tiny"].example_inputs(batch=5, seed=3)[0]
    assert tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < ZOO["transformer_tiny"].vocab
    images = ZOO["vgg11"].example_inputs()[0]
    assert images.shape == ZOO["vgg11"].input_shape and images.dtype == torch.float32
    torch.testing.assert_close(ZOO["vgg11"].example_inputs(seed=1)[0], ZOO["vgg11"].example_inputs(seed=1)[0])


def test_factories_draw_fresh_weights():
    a, b = zoo.mlp3(), zoo.mlp3()
    assert not torch.equal(a[1].weight, b[1].weight)


def test_transformer_tiny_is_causal_with_tied_head():
    model, (tokens,) = build("transformer_tiny")
    assert model.head.weight is model.embed.weight
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % ZOO["transformer_tiny"].vocab
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :8], model(tokens)[:, :8])


def test_zoo_imports_without_transformers():
    code = "import sys, fixtures.zoo; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model_forward_and_export(name):
    pytest.importorskip("transformers")
    model, inputs = build(name)
    with torch.no_grad():
        expected = logits(model(*inputs))
    assert torch.isfinite(expected).all()
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(logits(exported.module()(*inputs)), expected)
    nodes = len(exported.graph.nodes)
    print(f"{name}: {type(model).__name__} exported, {nodes} nodes, logits {tuple(expected.shape)}")
