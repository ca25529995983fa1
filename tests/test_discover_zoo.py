"""The zoo battery: every model's spec keeps the function under random permutations, and the
number of freed channels equals the count of a complete discovery, worked out by hand below."""

from __future__ import annotations

import pytest
import torch

import graphrepair as gr
from fixtures.zoo import HF_MODELS, ZOO
from tests.helpers import randomize_

# Freed channels (sum of group sizes) by hand. Conventions of a complete discovery:
# - every hidden conv/linear output is a group; a residual stream is one group per stage;
# - depthwise convs follow their input; a grouped conv (g groups) permutes inside each input group
#   and inside each output group, every group on its own (whole groups stay in place);
# - attention: heads may be permuted and, inside a head, q/k dims share one permutation and v dims
#   another. nn.MultiheadAttention (module form): per-head q/k and v permutations, E + E channels.
#   ATen form (reshape to heads): H heads + D (q/k) + D (v).
HAND_COUNTS = {
    "mlp3": 3 * 32,
    "mlp10": 10 * 128,
    "mlp20": 20 * 128,
    "vgg11": 16 + 32 + 64 + 64 + 128 + 128 + 128 + 128,
    "vgg11_bn": 16 + 32 + 64 + 64 + 128 + 128 + 128 + 128,
    # streams 16, 32, 64 + the first conv of each of the 9 blocks
    "resnet20_bn": (16 + 32 + 64) + 3 * (16 + 32 + 64),
    "resnet20_ln": (16 + 32 + 64) + 3 * (16 + 32 + 64),
    "resnet20_nonorm": (16 + 32 + 64) + 3 * (16 + 32 + 64),
    "resnet20_bn_w2": 2 * ((16 + 32 + 64) + 3 * (16 + 32 + 64)),
    # stem 8; streams 32, 64, 128, 256; two inner convs per bottleneck (8, 16, 32, 64)
    "resnet50_style": 8 + (32 + 64 + 128 + 256) + 2 * (8 + 16 + 32 + 64),
    # stem 4; streams 16..128; blocks (3, 8, 36, 3) with inner widths 4, 8, 16, 32
    "resnet152_scale": 4 + (16 + 32 + 64 + 128) + 2 * (3 * 4 + 8 * 8 + 36 * 16 + 3 * 32),
    # stem 16 + three growth-8 convs, transition 20 + three growth-8 convs
    "densenet_tiny": 16 + 3 * 8 + 20 + 3 * 8,
    "unet_tiny": 8 + 8 + 16 + 16 + 32 + 32 + 16 + 16 + 16 + 8 + 8 + 8,
    "mobilenetv2_tiny": 16 + 8 + 32 + 12 + 48 + 48 + 16 + 64 + 64,
    # streams 32, 64; block 1: reduce 32 (4 groups of 8), grouped conv 32; block 2: 64 and 64;
    # each grouped conv's 4 groups move as wholes (one order of 4 per block)
    "grouped_conv_net": (32 + 64) + (32 + 32 + 4) + (64 + 64 + 4),
    # the stream feeds a grouped 1x1 (g=4) and takes the second grouped 1x1's output: 4 groups of 8;
    # the shuffle views the first grouped conv's output as (4, 8), which asks one permutation of 8
    # in every group, and transposes it to (8, 4): the second grouped conv cuts that permutation
    # into its 4 input groups of 2 pairs of positions each (4 groups of 2)
    "shufflenet_block": 32 + 4 * 2,
    "se_net": 16 + 16 + 4 + 32 + 32 + 8,
    # four convs (32, 64, 64, 64), each GroupNorm's 8 groups permuted inside and moving as wholes
    "groupnorm_cnn": 32 + 3 * 64 + 4 * 8,
    "convnext_tiny": 16 + 2 * 64 + 32 + 2 * 128,
    # stream 32; per block: per-head q/k 32, v 32, MLP 128
    "transformer_tiny": 32 + 2 * (32 + 32 + 128),
    "vit_tiny_custom": 32 + 2 * (32 + 32 + 128),
    "flatten_cnn": 8 + 16 + 32,
    "shape_branch_cnn": 16 + 32,
    # ATen attention: per layer heads 4 + q/k dim 8 + v dim 8, then the MLP
    "bert_tiny": 32 + 2 * (4 + 8 + 8 + 64) + 32,
    "gpt2_tiny": 32 + 2 * (4 + 8 + 8 + 128),
    "vit_tiny": 32 + 2 * (4 + 8 + 8 + 64),
}


def test_every_zoo_model_has_a_hand_count():
    assert set(HAND_COUNTS) == set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_spec_keeps_function_and_frees_all_channels(name):
    if name in HF_MODELS:
        pytest.importorskip("transformers")
    entry = ZOO[name]
    torch.manual_seed(0)
    model = randomize_(entry.factory().eval(), seed=1)
    x = entry.example_inputs()
    spec = gr.discover(model, x)
    assert spec.num_free == HAND_COUNTS[name]
    for seed in (0, 1):
        spec.check(model, x, seed=seed)
    # the permuted model really differs (the check is not vacuous)
    perms = spec.random_permutations(seed=3)
    moved = gr.permute(model, spec, perms)
    changed = {k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, moved.state_dict()[k])}
    touched = {m.name for g in spec.groups if not torch.equal(perms[g.name], torch.arange(g.size))
               for m in g.params if m.name in model.state_dict()}
    assert touched and changed == {k for k in touched if model.state_dict()[k].is_floating_point()}
    # every parameter axis is either in a group or fixed with a reason
    grouped = {(m.name, m.axis) for g in spec.groups for m in g.params}
    fixed = {(f.name, f.axis) for f in spec.fixed if f.kind == "param"}
    for key, t in model.state_dict().items():
        for d in range(t.ndim):
            if t.shape[d] > 1:
                assert (key, d) in grouped or (key, d) in fixed, (key, d)
    assert all(f.reason for f in spec.fixed)


def test_wrong_permutation_is_caught():
    """spec.check must fail when the spec is wrong: corrupt one expression and check."""
    entry = ZOO["mlp3"]
    torch.manual_seed(0)
    model = entry.factory().eval()
    x = entry.example_inputs()
    spec = gr.discover(model, x)
    broken = dict(spec.param_axes)
    key = next(k for k in broken if k.endswith("bias"))
    from graphrepair.discovery.axes import Fixed
    broken[key] = (Fixed(broken[key][0].size),)
    import dataclasses
    bad = dataclasses.replace(spec, param_axes=broken)
    with pytest.raises(gr.CheckError, match="group"):
        bad.check(model, x)
