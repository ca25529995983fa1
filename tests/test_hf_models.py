"""Hugging Face and diffusers models as their users hold them (``fixtures/hf_natural.py``): their
own class, their default config (``use_cache=True`` for decoders), their natural dict inputs,
float32 / bfloat16 / float16. Discovery, the proof and the ONNX export take the dict as it is;
tracing turns caching off and gives the config back; a half-precision model is proved without
being refused for its rounding, and a wrong permutation of it is still refused."""

from __future__ import annotations

import copy
import types
import warnings

import onnx
import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.errors import CheckError, DataError, ExportError, TraceError

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from fixtures.hf_natural import build  # noqa: E402

FAMILIES = ["llama", "gpt2", "bert", "vit", "unet2d"]


def discover(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gr.discover(model, inputs)


@pytest.fixture(scope="module")
def specs():
    """name -> (family, spec): one discovery per family for the whole module."""
    out = {}
    for name in FAMILIES:
        fam = build(name)
        out[name] = (fam, discover(fam.model, fam.inputs))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_discovers_with_natural_dict_inputs(specs, name):
    fam, spec = specs[name]
    assert spec.groups and spec.num_free > 0
    placeholders = [n.name for n in spec.traced.gm.graph.nodes if n.op == "placeholder"]
    for key in fam.inputs:  # every keyword input reached the trace (none dropped)
        assert any(p == key or p.endswith(key) for p in placeholders), (key, placeholders)
    assert spec.check(fam.model, fam.inputs) < 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoders_trace_with_caching_off_and_get_their_config_back(specs, name):
    fam, spec = specs[name]
    assert fam.model.config.use_cache is True  # the default config, given back after tracing
    assert any("use_cache=False" in note for note in spec.notes)
    assert not [f for f in spec.fixed if "no rule" in f.reason]


def test_config_is_restored_when_tracing_fails():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(use_cache=True)
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            assert not self.config.use_cache  # caching is off while tracing
            raise RuntimeError("no")

    model = Broken()
    with pytest.raises(TraceError):
        gr.discover(model, {"x": torch.randn(2, 3)})
    assert model.config.use_cache is True


@pytest.mark.parametrize("bad", ["text", {"input_ids": "text"}, {1: torch.zeros(2)}, [], {"labels": torch.zeros(2)}])
def test_bad_example_inputs_are_data_errors(bad):
    with pytest.raises(DataError):
        gr.discover(nn.Linear(2, 2), bad)


def test_a_keyword_the_forward_does_not_take_is_named():
    with pytest.raises(DataError, match="'inputs_ids' is not an argument of Linear.forward"):
        gr.discover(nn.Linear(2, 2), {"inputs_ids": torch.zeros(2, 2)})


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_proved_not_refused(specs, name, dtype):
    fam, spec = specs[name]
    model = copy.deepcopy(fam.model).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec.check(model, fam.inputs)
    # the caller's model is untouched: same dtype, same values
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    permuted = gr.permute(model, spec, spec.random_permutations(3))
    assert next(permuted.parameters()).dtype == dtype
    spec.prove(model, permuted, fam.inputs, spec.random_permutations(3))


@pytest.mark.parametrize("dtype", [torch.float16])
def test_a_wrong_permutation_in_half_precision_is_refused(specs, dtype):
    fam, spec = specs["llama"]
    model = copy.deepcopy(fam.model).to(dtype)
    perms = spec.random_permutations(1)
    permuted = gr.permute(model, spec, perms)
    g = max(spec.groups, key=lambda g: g.size)
    key = next(m.name for m in g.params if m.axis == 0 and m.name.endswith("weight"))
    with torch.no_grad():  # one layer's rows moved once more: its readers no longer agree
        w = permuted.get_parameter(key)
        w.copy_(w.roll(1, 0))
    with pytest.raises(CheckError):
        spec.prove(model, permuted, fam.inputs, perms)


def test_export_takes_keyword_inputs(tmp_path):
    fam = build("gpt2")
    path = tmp_path / "gpt2.onnx"
    report = gr.export_onnx(fam.model, fam.inputs, path)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert report.max_abs_diff < 1e-3
    assert fam.model.config.use_cache is True


def test_diffusers_output_class_exports(tmp_path):
    fam = build("unet2d_plain")  # returns a UNet2DOutput, which pytree flattens without key paths
    path = tmp_path / "unet.onnx"
    report = gr.export_onnx(fam.model, fam.inputs, path)
    proto = onnx.load(str(path))
    assert len(proto.graph.input) == 2 and len(proto.graph.output) == 1
    assert report.max_abs_diff < 1e-3


def test_exporter_limits_are_named(tmp_path):
    fam = build("swin")
    with pytest.raises(ExportError, match="limit of torch.onnx's exporter"):
        gr.export_onnx(fam.model, fam.inputs, tmp_path / "swin.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_float32_inputs_fit_a_model_of_another_dtype(dtype):
    """The example's floating tensors take the model's dtype (token ids stay integers): a bfloat16
    or float64 model given float32 images is traced, not refused with a shape error."""
    fam = build("vit")
    model = fam.model.to(dtype)
    assert fam.inputs["pixel_values"].dtype == torch.float32
    spec = discover(model, fam.inputs)
    assert spec.traced.signature[0][1] == str(dtype)
    assert spec.num_free > 0
    spec.check(model, fam.inputs)
