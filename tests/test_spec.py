"""discovery.spec: the frozen PermutationSpec: permutations (random, identity, inverse, checked),
permuted state dicts, and the proof (``check``) that random permutations keep the function."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.discovery.axes import Fixed
from tests.helpers import ZeroHead


# A check on outputs that cannot show a wrong permutation (regression)

def test_check_sees_through_a_zero_output():
    """A spec that is wrong (fc2's columns left out of fc1's group) passes on a model whose output
    is exactly zero unless the check perturbs the parameters."""
    m = ZeroHead().eval()
    x = torch.randn(4, 6)
    spec = gr.discover(m, x)
    assert spec.check(m, x) < 1e-5  # checked on a perturbed copy: the output is no longer zero
    broken = dataclasses.replace(spec, param_axes={**spec.param_axes, "fc2.weight": (
        spec.param_axes["fc2.weight"][0], Fixed(8, "broken on purpose"))})
    with pytest.raises(gr.CheckError, match="fc1"):
        broken.check(m, x)


def test_check_refuses_an_output_that_is_one_constant():
    class Constant(ZeroHead):
        def forward(self, x):
            return super().forward(x) * 0.0

    m = Constant().eval()
    x = torch.randn(4, 6)
    spec = gr.discover(m, x)
    assert spec.groups
    with pytest.raises(gr.CheckError, match="constant"):
        spec.check(m, x)


# State dicts rebuilt by permute / merge keep their module versions (_metadata) (regression)

class Versioned(nn.Module):
    """Like torchvision's MNASNet: refuses a state dict without its version in the metadata."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_permute_check_and_merge_keep_the_state_dict_metadata(tmp_path):
    torch.manual_seed(0)
    a = Versioned().eval()
    x = torch.randn(16, 4)
    spec = gr.discover(a, x)
    spec.check(a, x)
    b = gr.permute(a, spec, spec.random_permutations(seed=1))
    for repair in (None, "exact"):
        merged = gr.merge(a, b, x, repair=repair, num_examples=16)
        assert type(merged) is Versioned
        torch.testing.assert_close(merged(x), a(x), rtol=1e-4, atol=1e-5)
    from safetensors.torch import save_file

    from graphrepair.io.loading import load_checkpoint

    torch.save(b.state_dict(), tmp_path / "b.pt")  # a pickled state dict keeps its _metadata
    save_file(b.state_dict(), tmp_path / "b.safetensors")  # none: the model's own versions are used
    for name in ("b.pt", "b.safetensors"):
        loaded = load_checkpoint(Versioned(), tmp_path / name).eval()
        torch.testing.assert_close(loaded(x), b(x))


# -- permutations on a small MLP: 4 -> 6 -> 5 -> 3 ---------------------------------------------------

def _mlp_and_spec():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    return m, gr.discover(m, torch.randn(2, 4))


def test_groups_and_fixed_axes_of_a_small_mlp():
    _, spec = _mlp_and_spec()
    assert [(g.name, g.size) for g in spec.groups] == [("0", 6), ("2", 5)]
    assert [(p.name, p.axis) for p in spec.group("0").params] == [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]
    assert spec.group("2").layers == ("2", "4")
    assert spec.num_free == 11 == sum(g.size for g in spec.groups)
    fixed = {(f.name, f.axis): f.reason for f in spec.fixed}
    assert fixed[("0.weight", 1)] == "model input 'input_1'" and fixed[("4.weight", 0)] == "model output"
    with pytest.raises(KeyError, match="no permutation group named 'nope'"):
        spec.group("nope")


def test_random_identity_and_inverse_permutations():
    _, spec = _mlp_and_spec()
    p = spec.random_permutations(seed=3)
    assert {g: len(v) for g, v in p.items()} == {"0": 6, "2": 5}
    assert all(torch.equal(v.sort().values, torch.arange(len(v))) for v in p.values())
    assert all(torch.equal(p[g], v) for g, v in spec.random_permutations(seed=3).items())  # seeded
    assert any(not torch.equal(p[g], v) for g, v in spec.random_permutations(seed=4).items())
    assert {g: v.tolist() for g, v in spec.identity_permutations().items()} == {"0": list(range(6)),
                                                                             "2": list(range(5))}
    inv = spec.inverse(p)
    for g, v in p.items():  # plain groups: each group's own inverse
        assert torch.equal(v[inv[g]], torch.arange(len(v))) and torch.equal(inv[g][v], torch.arange(len(v)))


def test_permuted_state_dict_reorders_every_axis_of_a_group():
    m, spec = _mlp_and_spec()
    p = spec.random_permutations(seed=1)
    state = m.state_dict()
    out = spec.permute_state_dict(state, p)
    p0, p2 = p["0"], p["2"]
    assert torch.equal(out["0.weight"], state["0.weight"][p0]) and torch.equal(out["0.bias"], state["0.bias"][p0])
    assert torch.equal(out["2.weight"], state["2.weight"][p2][:, p0]) and torch.equal(out["2.bias"], state["2.bias"][p2])
    assert torch.equal(out["4.weight"], state["4.weight"][:, p2]) and torch.equal(out["4.bias"], state["4.bias"])
    checked = spec.checked(p)
    assert spec.checked(checked) is checked  # validated once
    assert torch.equal(spec.param_index("2.weight", 1, checked), p0)
    assert torch.equal(spec.param_index("2.weight", 0, p), p2)


def test_permute_then_inverse_round_trip():
    m, spec = _mlp_and_spec()
    p = spec.random_permutations(seed=2)
    x = torch.randn(7, 4)
    moved = gr.permute(m, spec, p)
    assert type(moved) is type(m) and moved is not m
    assert not torch.equal(moved.state_dict()["0.weight"], m.state_dict()["0.weight"])
    torch.testing.assert_close(moved(x), m(x), rtol=1e-6, atol=1e-6)
    back = gr.permute(moved, spec, spec.inverse(p))
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_bad_permutations_and_models_are_named():
    m, spec = _mlp_and_spec()
    with pytest.raises(KeyError, match="no permutation group named 'nope' in this spec"):
        spec.checked({"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="permutation for group '0' is not a permutation of 6 items"):
        spec.checked({"0": torch.tensor([0, 0, 1, 2, 3, 4])})
    with pytest.raises(ValueError, match="group '2' is not a permutation of 5 items"):
        spec.checked({"2": torch.arange(6)})
    wide = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(gr.MismatchError, match=r"parameter '0\.weight' axis 0 has size 7 but the spec expects 6"):
        spec.permute_state_dict(wide.state_dict(), spec.random_permutations())
    with pytest.raises(gr.MismatchError, match=r"'0\.weight' of the model has shape \(7, 4\)"):
        spec.check_model(wide)
    with pytest.raises(gr.MismatchError, match=r"has no '0\.weight'.*another architecture \(Sequential\)"):
        spec.check_model(nn.Sequential(nn.Identity()))


def test_prove_refuses_a_permuted_model_that_computes_something_else():
    """``prove`` compares the model with its permuted copy; a copy whose group moved in one layer
    and not in the next (what a wrong spec would make) is refused. Each group of this (correct)
    spec keeps the function alone, so the error says the permutations together change it."""
    import copy

    m, spec = _mlp_and_spec()
    x = torch.randn(5, 4)
    p = spec.random_permutations(seed=1)
    assert spec.prove(m, gr.permute(m, spec, p), x, p) < 1e-5
    broken = copy.deepcopy(m)
    with torch.no_grad():
        broken[2].weight.copy_(broken[2].weight[p["2"]])  # rows of group '2' moved, 4.weight's columns not
        broken[2].bias.copy_(broken[2].bias[p["2"]])
    with pytest.raises(gr.CheckError, match=r"the permutations found of all groups together change the output of "
                                            r"Sequential \(max abs diff .*\), although each group alone does not"):
        spec.prove(m, broken, x, p)


def test_permute_refuses_bad_permutations_with_graphrepair_errors(tmp_path):
    """Before: a bare KeyError or ValueError from ``gr.permute`` (the API's bad input is a
    GraphRepairError; these stay a KeyError and a ValueError for code that caught those)."""
    m, spec = _mlp_and_spec()
    with pytest.raises(gr.UnknownGroupError, match=r"^no permutation group named 'nope' in this spec \(its groups: 0, 2\)$"):
        gr.permute(m, spec, {"nope": torch.arange(3)})
    assert issubclass(gr.UnknownGroupError, (gr.GraphRepairError)) and issubclass(gr.UnknownGroupError, KeyError)
    with pytest.raises(gr.PermutationError, match=r"group '0' is not a permutation of 6 items \(each of 0 \.\. 5 once\)"):
        gr.permute(m, spec, {"0": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(gr.PermutationError, match="group '0' is not a tensor of indices"):
        gr.permute(m, spec, {"0": ["a"] * 6})
    with pytest.raises(gr.UnknownGroupError, match=r"^no permutation group named 'nope' in this spec \(its groups: 0, 2\)$"):
        spec.group("nope")


def test_permutations_given_as_users_hold_them_are_taken_or_refused_by_name():
    """Before: ``None`` for the permutations was an AttributeError; a reversed numpy array (negative
    strides) was refused with torch's own words; a float tensor with fractions was truncated into
    a permutation (1.2, 0.7 -> 1, 0) and bools into indices."""
    m, spec = _mlp_and_spec()
    x = torch.randn(4, 4)
    flipped = gr.permute(m, spec, {"0": np.arange(6)[::-1]})
    assert torch.equal(flipped[0].weight, m[0].weight.flip(0))
    torch.testing.assert_close(flipped(x), m(x))
    assert torch.equal(gr.permute(m, spec, {"0": torch.arange(6.0).flip(0)})[0].weight, flipped[0].weight)
    with pytest.raises(gr.PermutationError, match=r"^permutations must be a dict \{group name: permutation\}, got NoneType$"):
        gr.permute(m, spec, None)
    fractions = torch.tensor([1.2, 0.7, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(gr.PermutationError, match=r"group '0' is not a tensor of indices: it holds non-integer values"):
        gr.permute(m, spec, {"0": fractions})
    with pytest.raises(gr.PermutationError, match=r"group '0' is not a tensor of indices: it holds bool values"):
        gr.permute(m, spec, {"0": torch.ones(6, dtype=torch.bool)})


@pytest.mark.parametrize("rtol, atol", [(-1, 1e-5), (1e-4, float("nan")), ("1e-4", 1e-5)])
def test_negative_or_non_finite_tolerances_are_refused(rtol, atol, tmp_path):
    """Before: a negative rtol failed every comparison, and the proof reported a discovery bug."""
    m, spec = _mlp_and_spec()
    x = torch.randn(4, m[0].in_features)
    bad = "rtol" if rtol != 1e-4 else "atol"
    with pytest.raises(gr.GraphRepairError, match=f"{bad} must be a finite number >= 0, got"):
        spec.check(m, x, rtol=rtol, atol=atol)
    with pytest.raises(gr.GraphRepairError, match=f"{bad} must be a finite number >= 0, got"):
        gr.export_onnx(m, x, tmp_path / "m.onnx", rtol=rtol, atol=atol)
    assert not (tmp_path / "m.onnx").exists()
