"""Regressions: non-persistent buffers, constant outputs in the check, stochastic depth, op
arguments by name, rules that fail, exact REPAIR on identical endpoints, state-dict metadata and
ONNX export from a batch of one."""

from __future__ import annotations

import dataclasses
import inspect
import os

import onnxruntime as ort
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import graphrepair as gr
from fixtures.zoo import ZOO
from graphrepair.discovery import rules
from graphrepair.discovery.axes import AxisError as LayoutError, AxisSolver, Fixed
from graphrepair.merging.merge import merge_prepared, prepare
from passes import export_onnx
from tests.helpers import discover_checked, group_of, randomize_



# --------------------------------------------------------------------------------------------
# 1. tensors outside the state dict; outputs that cannot show a wrong permutation


class RelativePositionBias(nn.Module):
    """maxvit-style: a non-persistent buffer of coordinates read by an MLP whose output is added to
    the attention-like logits."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.randn(49, 5), persistent=False)
        self.fc1 = nn.Linear(5, 16)
        self.fc2 = nn.Linear(16, 4)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):  # (B, 49, 8)
        return self.proj(x) + self.fc2(F.relu(self.fc1(self.coords)))


def test_non_persistent_buffer_axes_are_fixed_and_the_spec_holds():
    m = RelativePositionBias()
    spec = discover_checked(m, torch.randn(2, 49, 8))
    assert group_of(spec, "fc1.weight", 1) is None  # the buffer's columns cannot move
    assert group_of(spec, "fc1.weight", 0).size == 16  # the hidden units still can
    assert any(f.name == "coords" and "not in the state dict" in f.reason for f in spec.fixed)
    for seed in range(4):
        spec.check(m, torch.randn(2, 49, 8), seed=seed)


class ZeroHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


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


# --------------------------------------------------------------------------------------------
# 2. stochastic depth / drop path: identity in eval, a per-sample scale in training


class ResidualMLP(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
                                    for _ in range(2))
        self.drops = nn.ModuleList(drop(0.1) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for block, drop in zip(self.blocks, self.drops):
            x = x + drop(block(x))
        return self.head(x)


def _residual_stream(spec):
    g = group_of(spec, "stem.weight")
    assert g is not None and "residual" in g.joins
    assert {("head.weight", 1), ("blocks.1.3.weight", 0)} <= {(m.name, m.axis) for m in g.params}
    return g


def test_torchvision_stochastic_depth_if_installed():
    try:
        from torchvision.ops import StochasticDepth as TVStochasticDepth
    except Exception:  # noqa: BLE001 - not installed, or its operators do not load with this torch
        pytest.skip("torchvision is not importable")
    spec = discover_checked(ResidualMLP(lambda p: TVStochasticDepth(p, "row")), torch.randn(3, 6))
    _residual_stream(spec)


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin_attention_and_patch_merging_keep_the_stream_free(version):
    """torchvision's Swin calls fx-wrapped functions (``shifted_window_attention``,
    ``_patch_merging_pad``) that the trace keeps whole; their rules free the residual stream
    (swin_t: 17,664 -> 27,936 free channels), the head dims and the MLPs, and the check holds with
    random weights, stochastic depth and the v2 cosine attention included."""
    try:
        from fixtures.torchvision_compat import import_torchvision
        import_torchvision()
    except Exception:  # noqa: BLE001 - not installed, or its operators do not load with this torch
        pytest.skip("torchvision is not importable")
    from torchvision.models import swin_transformer as st

    extra = {} if version == 1 else {"block": st.SwinTransformerBlockV2, "downsample_layer": st.PatchMergingV2}
    torch.manual_seed(0)
    model = st.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                               window_size=[2, 2], stochastic_depth_prob=0.2, num_classes=5, **extra)
    spec = discover_checked(model, torch.randn(2, 3, 32, 32))
    stream = group_of(spec, "features.0.0.weight")  # the patch embedding's channels: stage 1's stream
    assert stream is not None and stream.size == 16
    assert ("features.1.1.attn.proj.weight", 0) in {(m.name, m.axis) for m in stream.params}
    assert ("features.2.reduction.weight", 1) in {(m.name, m.axis) for m in stream.params}  # kron(4, C)
    assert group_of(spec, "features.1.0.mlp.0.weight") is not None  # the MLP's hidden channels
    qkv = [g for g in spec.groups if any(m.name == "features.1.0.attn.qkv.weight" and m.axis == 0
                                         for m in g.params)]
    assert sorted(g.size for g in qkv) == [8] * 4  # per head: q/k dims and v dims, 2 heads


class EinsumAttention(nn.Module):
    def __init__(self, eq_scores: str, eq_mix: str):
        super().__init__()
        self.eqs = eq_scores, eq_mix
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):  # (B, T, 6)
        s = torch.einsum(self.eqs[0], self.q(x), self.k(x)).softmax(-1)
        return self.out(torch.einsum(self.eqs[1], s, self.v(x)).swapaxes(1, 2).swapaxes(1, 2))


@pytest.mark.parametrize("eqs, free", [
    (("bid,bjd->bij", "bij,bjd->bid"), True),
    (("B I D, B J D -> B I J", "B I J, B J D -> B I D"), True),  # spaces, capitals (torchvision's MaxViT)
    (("...id,...jd->...ij", "...ij,...jd->...id"), False),  # ellipsis: not read, fixed
], ids=["explicit", "spaced", "ellipsis"])
def test_einsum_attention_and_swapaxes(eqs, free):
    """einsum: every axis of one letter shares a permutation (q and k's features cancel in the
    contraction, v's pass to the output); swapaxes reads axis0/axis1 (torchvision's MaxViT
    lost its stream to both)."""
    spec = discover_checked(EinsumAttention(*eqs), torch.randn(2, 5, 6))
    qk, v = group_of(spec, "q.weight"), group_of(spec, "v.weight")
    if free:
        assert qk is not None and qk is group_of(spec, "k.weight") and qk.size == 8
        assert v is not None and ("out.weight", 1) in {(m.name, m.axis) for m in v.params}
    else:
        assert qk is None and v is None
        assert any("einsum" in f.reason for f in spec.fixed)


class EinsumLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # implicit output: the letters that occur once, alphabetical: "ik"
        return self.fc(torch.relu(torch.einsum("ij,kj", x, self.w)))


def test_einsum_with_an_implicit_output():
    spec = discover_checked(EinsumLinear(), torch.randn(4, 6))
    g = group_of(spec, "w")
    assert g is not None and g.size == 8 and ("fc.weight", 1) in {(m.name, m.axis) for m in g.params}


# --------------------------------------------------------------------------------------------
# 3. op arguments by name: positional and keyword calls mean the same


class Reduce(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):  # x (B, 5, 4): reduce the 5 positions, keep the 8 channels
        h = torch.tanh(self.fc1(x))
        return self.fc2(self.how(h))


@pytest.mark.parametrize("how", [
    lambda h: h.norm(2, 1),  # argument 1 is p, not dim
    lambda h: torch.norm(h, 2, 1),
    lambda h: h.norm(p=2, dim=1),
    lambda h: torch.linalg.vector_norm(h, 2, 1),  # argument 1 is ord
    lambda h: torch.linalg.vector_norm(h, ord=2, dim=1),
    lambda h: h.sum(1),
    lambda h: torch.sum(h, dim=1),
    lambda h: h.std(1),
    lambda h: torch.transpose(h, dim0=1, dim1=2).mean(-1),  # keyword dims
    lambda h: torch.roll(h, 2, 1).mean(1),  # argument 1 is the shift
    lambda h: torch.topk(h, 2, 1).values.mean(1),  # argument 1 is k
], ids=["method_norm", "torch_norm", "norm_kw", "vector_norm", "vector_norm_kw", "sum", "sum_kw", "std",
        "transpose_kw", "roll", "topk"])
def test_reductions_read_dim_by_name(how):
    spec = discover_checked(Reduce(how), torch.randn(3, 5, 4))
    g = group_of(spec, "fc1.weight")
    assert g is not None and g.size == 8 and ("fc2.weight", 1) in {(m.name, m.axis) for m in g.params}


def test_roll_over_channels_fixes_them():
    spec = discover_checked(Reduce(lambda h: torch.roll(h, 1, 2).mean(1)), torch.randn(3, 5, 4))
    assert group_of(spec, "fc1.weight") is None


def test_std_with_a_bool_reduces_everything():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h / h.std(True))  # std(unbiased: bool) has no dim

    spec = discover_checked(M(), torch.randn(3, 4))
    assert group_of(spec, "fc.weight").size == 8


def _schema_names(target) -> list[list[str]]:
    """Parameter names, by position, of every signature ``target`` may be called with."""
    from torch.fx.operator_schemas import get_signature_for_torch_op

    if isinstance(target, torch._ops.OpOverload):
        return [[a.name for a in target._schema.arguments]]
    sigs = get_signature_for_torch_op(target) if not inspect.isfunction(target) else None
    if sigs:
        return [list(s.parameters) for s in sigs]
    return [list(inspect.signature(target).parameters)]


def test_positional_tables_of_the_passes_match_the_op_schemas():
    """passes.modules and passes.fold_batchnorm find arguments by (position, name) per op: the
    position must be where the op's schema puts that name."""
    from passes import fold_batchnorm, modules

    rows = [(t, r) for targets, r in modules._FUNCTION_TABLE for t in targets]
    rows += [(modules._CONVOLUTION, r) for r in modules._CONVOLUTION_RULES.values()]
    checked = 0
    for target, rule in rows:
        slots = [s for s in (rule.weight, rule.bias, rule.groups) if s is not None]
        for slot in slots:
            assert any(len(n) > slot.index and n[slot.index] == slot.name for n in _schema_names(target)), \
                (target, slot)
            checked += 1
    for target, slots in fold_batchnorm._BN_SLOTS.items():
        for slot in (s for s in slots if s is not None):
            assert any(len(n) > slot.index and n[slot.index] == slot.name for n in _schema_names(target)), \
                (target, slot)
            checked += 1
    assert checked > 30


def test_weight_transposes_are_recognised_with_keyword_arguments():
    from passes.modules import _is_transpose

    aten = torch.ops.aten
    g = torch.fx.Graph()
    w = g.get_attr("w")
    forms = [g.call_function(aten.permute.default, (w, [1, 0])),
             g.call_function(aten.permute.default, (w,), {"dims": [1, 0]}),
             g.call_function(aten.transpose.int, (w, 0, 1)),
             g.call_function(aten.transpose.int, (w,), {"dim0": 1, "dim1": 0})]
    assert all(_is_transpose(n) for n in forms)
    assert not _is_transpose(g.call_function(aten.permute.default, (w,), {"dims": [0, 1]}))


# --------------------------------------------------------------------------------------------
# 4. an op its rule cannot handle fixes its axes with the reason; discovery goes on


class SharedMemoryAttention(nn.Module):
    """Attention over one memory shared by the batch: key and value broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x, mem):  # x (B, T, 8), mem (1, S, 8)
        q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
        k, v = self.kv(mem).unflatten(-1, (2, 8)).transpose(1, 2).chunk(2, -1)
        h = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return self.head(torch.relu(self.fc(h)))


def test_a_rule_that_cannot_handle_an_op_fixes_its_axes():
    m = SharedMemoryAttention()
    spec = discover_checked(m, torch.randn(3, 5, 8), torch.randn(1, 6, 8))
    reasons = [f.reason for f in spec.fixed if f.name == "o.weight" and f.axis == 1]
    assert reasons and "cannot handle" in reasons[0] and "scaled_dot_product_attention" in reasons[0]
    assert group_of(spec, "fc.weight").size == 6  # the rest of the graph is still understood


def test_a_failing_rule_is_recorded_not_raised(monkeypatch):
    def broken(ctx):
        raise ValueError("boom")

    monkeypatch.setitem(rules.RULES, "tanh", broken)
    spec = discover_checked(ZeroHead(), torch.randn(4, 6))
    assert not spec.groups
    assert any("boom" in f.reason and "tanh" in f.reason for f in spec.fixed)


def test_solver_mismatches_raise_layout_errors():
    s = AxisSolver()
    with pytest.raises(LayoutError):
        s.unify(s.fresh(3), s.fresh(4), "test")
    with pytest.raises(LayoutError):
        s.factor(s.fresh(6), 4, "test")


# --------------------------------------------------------------------------------------------
# 5. exact REPAIR of a model with a permuted copy of itself gives the model back


def _shrink_rows_(model: nn.Module, factor: float = 0.01, share: float = 0.3, seed: int = 7) -> nn.Module:
    """Scale a share of every weight matrix's output rows down: channels of variance far below
    the resets' eps (1e-5), as trained networks have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p[torch.rand(p.shape[0], generator=g) < share] *= factor
    return model


@pytest.mark.parametrize("batch_size", [48, 16])
@pytest.mark.parametrize("name", ["vit_tiny_custom", "convnext_tiny", "resnet20_bn"])
def test_exact_repair_of_identical_endpoints_is_the_identity(name, batch_size):
    """In one batch and over several: each batch of the REPAIR pass is normalised to the
    endpoints' moments of that batch (``repair.batch_goals``); with the global goal for every batch
    3 batches of 16 left 2% on a ViT."""
    entry = ZOO[name]
    torch.manual_seed(0)
    a = _shrink_rows_(randomize_(entry.factory().eval(), seed=1))
    x = entry.example_inputs(batch=48, seed=3)[0]
    spec = gr.discover(a, (x[:2],))
    b = gr.permute(a, spec, spec.random_permutations(seed=5))
    prep = prepare([a, b], x, num_examples=48, batch_size=batch_size, spec=spec)
    with torch.no_grad():
        ref = a(x)
        for repair in (None, "exact"):
            y = merge_prepared(prep, [0.5, 0.5], repair).model(x)
            rel = float((y - ref).norm() / ref.norm())
            # exact was 4e-4 (ViT), 1.6e-4 (ConvNeXt), 2e-5 (ResNet20): scaled by sqrt(v / (v + eps))
            assert rel < 1e-5, (repair, rel)


# --------------------------------------------------------------------------------------------
# 6. state dicts rebuilt by permute / merge keep their module versions (_metadata)


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


# --------------------------------------------------------------------------------------------
# 7. ONNX export from a batch of one with a dynamic batch axis


class ChannelsLastNorm(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm, permute back, then a (depthwise) conv
    reads the permuted tensor: exported from batch 1, the strides guard on the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.dwconv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.dwconv(h).mean((2, 3)))


@pytest.mark.parametrize("name", ["channels_last", "convnext_tiny", "vit_tiny_custom"])
def test_onnx_export_from_a_batch_of_one_runs_any_batch(tmp_path, name):
    torch.manual_seed(0)
    if name == "channels_last":
        model, shape = ChannelsLastNorm(), (1, 3, 8, 8)
    else:
        model, shape = ZOO[name].factory(), (1, *ZOO[name].input_shape[1:])
    model.eval()
    x = torch.randn(shape)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (x,), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 5):
        xb = torch.randn(batch, *shape[1:])
        (got,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(xb), rtol=1e-4, atol=1e-4)
    assert os.listdir(tmp_path) == [f"{name}.onnx"]
