"""passes.modules: node <-> module access and producer recognition, on fx and torch.export graphs."""

from __future__ import annotations

import copy
import inspect
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from passes import PassError, get_module, insert_module_after, parent_and_attr, producer_kind, replace_module
from passes.modules import describe_producer, trace_tensor_source
from tests.helpers import graph_of

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 6, 3, groups=2)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        y = self.up(self.bn(self.conv(x))).relu().mean((2, 3))
        return self.head(self.fc(y))


class Functional(nn.Module):
    """Weights as plain parameters used through torch.nn.functional (get_attr nodes under fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 1))
        self.w2 = nn.Parameter(torch.randn(5, 4))
        self.b2 = nn.Parameter(torch.randn(5))
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x):
        y = F.conv1d(x, self.w1)
        y = F.batch_norm(y, self.rm, self.rv, self.gamma, None, False)
        return F.linear(y.mean(-1), self.w2, self.b2)


def _kinds(gm) -> list[str]:
    return [k for k in (producer_kind(gm, n) for n in gm.graph.nodes) if k is not None]


@pytest.mark.parametrize("how", ["fx", "aten", "aten_decomposed"])
def test_producer_kind_recognises_modules_and_aten_ops(how):
    gm = graph_of(Net(), torch.randn(2, 3, 8, 8), how)
    assert _kinds(gm) == ["conv", "batchnorm", "conv_transpose", "linear", "linear"]


@pytest.mark.parametrize("how", ["fx", "aten", "aten_decomposed"])
def test_producer_kind_recognises_functional_forms(how):
    gm = graph_of(Functional(), torch.randn(2, 3, 7), how)
    assert _kinds(gm) == ["conv", "batchnorm", "linear"]
    for node in gm.graph.nodes:
        p = describe_producer(gm, node)
        if p is not None and p.kind == "linear":
            src = trace_tensor_source(p.arg(p.rule.weight))
            assert src.qualname == "w2"
            # aten's decomposition reads the (out, in) weight through a transpose
            assert src.transposed == (how == "aten_decomposed")


def test_tuple_batchnorm_output_is_the_getitem():
    gm = graph_of(Net(), torch.randn(2, 3, 8, 8), "aten_decomposed")
    bn = next(n for n in gm.graph.nodes if "batch_norm" in str(n.target))
    getitem = next(u for u in bn.users if u.target is operator.getitem)
    assert producer_kind(gm, bn) is None  # the tuple itself is not a channel tensor
    assert producer_kind(gm, getitem) == "batchnorm"


def test_producer_kind_none_for_other_ops():
    gm = graph_of(Net(), torch.randn(2, 3, 8, 8), "fx")
    others = [n for n in gm.graph.nodes if n.op != "call_module"]
    assert all(producer_kind(gm, n) is None for n in others)


def test_get_module_and_parent_and_replace():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2))))
    node = next(n for n in gm.graph.nodes if n.target == "1.1")
    assert get_module(gm, node) is gm.get_submodule("1.1")
    parent, attr = parent_and_attr(gm, "1.1")
    assert parent is gm.get_submodule("1") and attr == "1"
    new = nn.Linear(3, 2)
    old = replace_module(gm, "1.1", new)
    assert isinstance(old, nn.Linear) and gm.get_submodule("1.1") is new


def test_access_errors_name_the_culprit():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    placeholder = next(iter(gm.graph.nodes))
    with pytest.raises(PassError, match="placeholder"):
        get_module(gm, placeholder)
    with pytest.raises(PassError, match="nope"):
        replace_module(gm, "nope", nn.ReLU())
    with pytest.raises(PassError, match="output node"):
        insert_module_after(gm, list(gm.graph.nodes)[-1], nn.Identity(), "_t")


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("how", ["fx", "aten"])
def test_insert_module_after_rewires_every_user(how):
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    gm = graph_of(model, x, how)
    target = next(n for n in gm.graph.nodes if producer_kind(gm, n) == "conv")
    users_before = set(target.users)
    new = insert_module_after(gm, target, Scale(), "_gr_test")
    insert_module_after(gm, target, nn.Identity(), "_gr_test")
    gm.graph.lint()
    gm.recompile()
    # structural: fresh unique names; the old users now read the new node
    assert new.target == "_gr_test_0" and hasattr(gm, "_gr_test_1")
    assert all(new in u.all_input_nodes or any(new in v.all_input_nodes for v in new.users) for u in users_before)
    assert not any(u for u in target.users if u.op != "call_module")
    # numeric: conv output doubled -> bn input doubled; compare with the model doing the same
    reference = copy.deepcopy(model)  # symbolic_trace shares submodules with `model`
    reference.conv.register_forward_hook(lambda m, i, o: 2 * o)
    torch.testing.assert_close(gm(x), reference(x))


def test_insert_after_placeholder_keeps_placeholders_first():
    class Two(nn.Module):
        def forward(self, a, b):
            return a - b

    gm = torch.fx.symbolic_trace(Two())
    a = next(iter(gm.graph.nodes))
    insert_module_after(gm, a, Scale(), "_gr_test")
    gm.graph.lint()
    gm.recompile()
    ops = [n.op for n in gm.graph.nodes]
    assert ops[:2] == ["placeholder", "placeholder"]
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(x, y), 2 * x - y)


def _precisions() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_full_precision_turns_tf32_off_and_restores_the_settings():
    from passes.modules import full_precision

    before = _precisions()
    with full_precision():
        assert _precisions() == ("ieee", "ieee")
    assert _precisions() == before
    with pytest.raises(ZeroDivisionError), full_precision():
        1 / 0  # noqa: B018
    assert _precisions() == before


def test_full_precision_blocks_of_two_threads_leave_the_settings_as_they_were():
    """Blocks of two threads overlapping (merges in a thread pool), the first one out before the
    second: the settings are IEEE while either block is open and as before once both ended.
    When each block restored what it had found, the second left IEEE behind (and with torch's
    new API every later read of the legacy cuDNN flag raised)."""
    import threading

    from passes.modules import full_precision

    before = _precisions()
    second_in, first_out = threading.Event(), threading.Event()
    seen = []

    def first():
        with full_precision():
            second_in.wait(5)
            seen.append(("first, both in", _precisions()))
        first_out.set()

    def second():
        with full_precision():
            second_in.set()
            first_out.wait(5)
            seen.append(("second, first out", _precisions()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    while not threads[0].is_alive():
        pass
    threads[1].start()
    for t in threads:
        t.join(10)
    assert sorted(seen) == [("first, both in", ("ieee", "ieee")), ("second, first out", ("ieee", "ieee"))]
    assert _precisions() == before
    torch.backends.cudnn.allow_tf32  # noqa: B018 (the legacy flag reads: conv and RNN agree again)


def test_proofs_and_the_onnx_reference_run_without_tf32(tmp_path):
    """cuDNN convolutions run in TF32 by default on recent GPUs: a permuted ResNet-50 then differs
    from itself by 1e-2 (seen on an H200), failing its proof. The proof's and the ONNX check's
    forward passes must see IEEE float32 (the setting is read inside forward, on any device)."""
    import graphrepair as gr
    from passes.export_onnx import export_onnx

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            seen.append(_precisions())
            return self.b(torch.relu(self.a(x)))

    model, x, before = Probe(), torch.randn(5, 4), _precisions()
    spec = gr.discover(model, x[:2])
    seen.clear()
    assert spec.check(model, x) < 1e-5
    assert seen and all(s == ("ieee", "ieee") for s in seen)
    seen.clear()
    export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    assert ("ieee", "ieee") in seen  # the torch reference the ONNX outputs are compared with
    assert _precisions() == before


# Positional tables and transposes read by name, as the op schemas define them (regression)


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


class _CountsTrain(torch.nn.Sequential):
    """A model whose own ``train`` counts its calls (classes override it, e.g. to freeze norms)."""

    calls = 0

    def train(self, mode: bool = True):
        type(self).calls += 1
        return super().train(mode)


def test_eval_mode_puts_every_module_in_eval_and_restores_each_flag():
    from passes.modules import eval_mode

    model = _CountsTrain(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # mixed flags: each comes back as it was
    before = [m.training for m in model.modules()]
    _CountsTrain.calls = 0
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    assert _CountsTrain.calls == 1  # the model's own train(False) decided eval mode
    # a model already in eval mode throughout: nothing to switch, its train() is not called
    model.eval()
    _CountsTrain.calls = 0
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert _CountsTrain.calls == 0 and not any(m.training for m in model.modules())
    # restored after an exception too, and after the block changed a flag itself
    model.train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            model[0].train()
            raise RuntimeError("inside")
    assert all(m.training for m in model.modules())


class MatmulLayers(nn.Module):
    """Linear layers written as matrix products of stored (in, out) tensors, beside products
    that are no layer: two activations, a 3-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 4))
        self.w2 = nn.Parameter(torch.randn(5, 4))  # (out, in), read transposed
        self.cube = nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x):
        h1 = torch.relu(x @ self.w1)
        h = torch.matmul(h1, self.w2.t())
        gram = h @ h.t()  # activations only
        return (self.cube @ h.t()).sum() + gram.sum() + torch.mm(h1, self.w1.t()).sum()


def test_a_matrix_product_with_a_stored_matrix_is_a_linear_producer():
    """``x @ self.weight`` is a linear layer whose weight is (in, out): its output is a producer
    (REPAIR resets it and folds into the weight's columns). Before: no producer, and a merge of
    such a model had no reset point."""
    gm = torch.fx.symbolic_trace(MatmulLayers())
    found = {n.name: describe_producer(gm, n) for n in gm.graph.nodes}
    linear = {name: p for name, p in found.items() if p is not None}
    assert sorted(linear) == ["matmul", "matmul_1", "mm"], sorted(linear)
    for name, p in linear.items():
        assert p.kind == "linear" and p.channel_axis == -1 and p.rule.bias is None
        src = trace_tensor_source(p.arg(p.rule.weight))
        assert (src.qualname, src.transposed) == {"matmul": ("w1", False), "matmul_1": ("w2", True),
                                                 "mm": ("w1", True)}[name]
    assert torch.isfinite(gm(torch.randn(2, 3)))  # (a model that runs)
