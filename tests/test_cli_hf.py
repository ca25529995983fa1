"""The command line with models named as their libraries name them: ``--model hf:DIR`` (a local
save_pretrained folder, built from its config offline), ``torchvision:NAME``, ``timm:NAME``, and
``merge --out-hf DIR`` writing the merge with ``save_pretrained`` (proved by ``from_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from graphrepair.cli import main
from graphrepair.errors import LoadError
from graphrepair.io.zoo_refs import model_from_reference

pytest.importorskip("transformers")

from fixtures.hf_natural import build  # noqa: E402


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    """Two random inits of a tiny ViT saved with save_pretrained, and fitting images."""
    d = tmp_path_factory.mktemp("vit")
    for seed, name in ((0, "a"), (1, "b")):
        build("vit", seed=seed).model.save_pretrained(d / name)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5)).numpy()
    np.savez(d / "fit.npz", x=x)
    return d


def merge_args(d: Path, *extra):
    return ["merge", "--model", f"hf:{d / 'a'}", "--a", d / "a" / "model.safetensors",
            "--b", d / "b" / "model.safetensors", "--data", d / "fit.npz", "--num-examples", 64, *extra]


def test_hf_dir_builds_the_saved_class(vit_pair):
    from transformers import ViTForImageClassification

    model = model_from_reference(f"hf:{vit_pair / 'a'}")
    assert type(model) is ViTForImageClassification
    assert model.config.hidden_size == 32


def test_merge_writes_save_pretrained_that_loads_back(vit_pair, tmp_path):
    from transformers import ViTForImageClassification

    out = tmp_path / "merged"
    r = cli(*merge_args(vit_pair, "--repair", "none", "--no-onnx", "--weights", tmp_path / "m.safetensors",
                        "--out-hf", out))
    assert r.exit_code == 0, r.output
    assert "save_pretrained" in r.output
    loaded = ViTForImageClassification.from_pretrained(out).eval()
    # the folder holds the merge: the same weights as --weights, the same outputs
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "m.safetensors")
    reference = ViTForImageClassification(loaded.config).eval()
    reference.load_state_dict(weights)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        diff = (loaded(pixel_values=x).logits - reference(pixel_values=x).logits).abs().max()
    assert float(diff) < 1e-5
    a = ViTForImageClassification.from_pretrained(vit_pair / "a").eval()
    with torch.no_grad():  # and it is not model A
        assert float((loaded(pixel_values=x).logits - a(pixel_values=x).logits).abs().max()) > 1e-4


def test_out_hf_is_refused_when_the_merge_is_a_graph_module(vit_pair, tmp_path):
    out = tmp_path / "merged"
    r = cli(*merge_args(vit_pair, "--repair", "exact", "--no-onnx", "--out-hf", out, "--output", "graph"))
    assert r.exit_code == 2
    if "GraphModule" not in r.output:  # every correction folded: the class came back
        pytest.skip("this merge kept its class")
    assert "--out" in r.output and "--weights" in r.output and "--repair reset or none" in r.output
    assert not out.exists()


def test_out_hf_needs_a_model_with_save_pretrained(tmp_path):
    w = tmp_path
    from safetensors.torch import save_file

    from fixtures import zoo

    for name in ("a", "b"):
        save_file(zoo.mlp3().state_dict(), w / f"{name}.safetensors")
    np.savez(w / "fit.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    r = cli("merge", "--model", "fixtures.zoo:mlp3", "--a", w / "a.safetensors", "--b", w / "b.safetensors",
            "--data", w / "fit.npz", "--no-onnx", "--out-hf", w / "out")
    assert r.exit_code == 2
    assert "has no save_pretrained" in r.output and "--out" in r.output and "--weights" in r.output
    assert not (w / "out").exists()


@pytest.mark.parametrize("ref,cls", [("torchvision:resnet18", "ResNet"), ("timm:resnet18d", "ResNet")])
def test_library_names(ref, cls):
    pytest.importorskip(ref.split(":")[0])
    assert type(model_from_reference(ref)).__name__ == cls


@pytest.mark.parametrize("ref,words", [("torchvision:resnet181", "no model 'resnet181'"), ("hf:/nonexistent/x", "not a folder"),
                                       ("timm:", "give the model name")])
def test_bad_library_names_are_load_errors(ref, words):
    pytest.importorskip("torchvision")
    with pytest.raises(LoadError, match=words):
        model_from_reference(ref)


def test_other_references_pass_through():
    assert model_from_reference("fixtures.zoo:mlp3") is None


def test_out_hf_is_not_left_behind_when_another_output_fails(vit_pair, tmp_path, monkeypatch):
    """The folder is proved first and placed only after the other outputs are committed: files that
    fail to commit leave neither the folder nor its temporary copy."""
    import graphrepair.io.fileio as fileio
    from graphrepair.errors import OutputError

    def failing(staged):
        raise OutputError("the files failed to commit here on purpose")

    monkeypatch.setattr(fileio, "_commit_all", failing)
    out = tmp_path / "merged"
    r = cli(*merge_args(vit_pair, "--repair", "none", "--no-onnx", "--weights", tmp_path / "m.safetensors",
                        "--out-hf", out))
    assert r.exit_code == 2, r.output
    assert "failed to commit here on purpose" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """Two random inits of a tiny BERT saved with save_pretrained, and a tokenised data file whose
    arrays are named after the forward's keyword inputs."""
    d = tmp_path_factory.mktemp("bert")
    for seed, name in ((0, "a"), (1, "b")):
        build("bert", seed=seed).model.save_pretrained(d / name)
    g = np.random.default_rng(3)
    ids = g.integers(1, 50, (48, 8))
    mask = np.ones_like(ids)
    mask[::2, 6:] = 0  # padding on every other sequence
    np.savez(d / "fit.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    np.savez(d / "typo.npz", input_ids=ids, attention_masks=mask)
    return d


def test_a_data_file_of_keyword_arrays_feeds_a_text_model(bert_pair, tmp_path):
    from transformers import BertForSequenceClassification

    out = tmp_path / "merged"
    r = cli("merge", "--model", f"hf:{bert_pair / 'a'}", "--a", bert_pair / "a" / "model.safetensors",
            "--b", bert_pair / "b" / "model.safetensors", "--data", bert_pair / "fit.npz", "--num-examples", 48,
            "--no-onnx", "--out-hf", out)
    assert r.exit_code == 0, r.output
    merged = BertForSequenceClassification.from_pretrained(out).eval()
    a = BertForSequenceClassification.from_pretrained(bert_pair / "a").eval()
    batch = {k: torch.as_tensor(v[:4]) for k, v in np.load(bert_pair / "fit.npz").items()}
    with torch.no_grad():  # the merge ran on every keyword input and is not model A
        assert torch.isfinite(merged(**batch).logits).all()
        assert float((merged(**batch).logits - a(**batch).logits).abs().max()) > 1e-5


def test_a_key_the_forward_does_not_take_is_named(bert_pair, tmp_path):
    r = cli("merge", "--model", f"hf:{bert_pair / 'a'}", "--a", bert_pair / "a" / "model.safetensors",
            "--b", bert_pair / "b" / "model.safetensors", "--data", bert_pair / "typo.npz", "--no-onnx",
            "--weights", tmp_path / "m.safetensors")
    assert r.exit_code == 2, r.output
    assert "'attention_masks' is not an argument of BertForSequenceClassification.forward" in r.output
    assert list(tmp_path.iterdir()) == []
