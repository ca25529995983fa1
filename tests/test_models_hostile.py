"""The user's models (``graphrepair.models``): given back as they came (buffers a forward
changes, spectral norm's power iteration in training mode, modes), unwrapped when wrapped
(torch.compile, DataParallel), refused with one clear error when they cannot be merged (two
dtypes, no weights on the meta device)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphrepair as gr
from graphrepair.errors import GraphRepairError, GraphRepairWarning


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


class Counting(MLP):
    """A forward that changes persistent buffers in place: a call counter, an EMA of the first
    layer's mean."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.a(x))
        self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.h(torch.relu(self.b(h)))


class Reassigning(Counting):
    """A forward that assigns a new tensor to a buffer on every call (a running maximum).
    (Merging it fails in the joint pass: the traced graph reads the assigned value as a constant
    model A does not have; not part of this file's promise.)"""

    def __init__(self):
        super().__init__()
        self.register_buffer("peak", torch.zeros(()))

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.peak = torch.maximum(self.peak, h.detach().max())
        return super().forward(x)


def pair(cls=MLP, seed=0):
    torch.manual_seed(seed)
    return cls(), cls()


X = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (96,), generator=torch.Generator().manual_seed(2))


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "tensors": {k: v for k, v in model.named_buffers()},
            "modes": {n: m.training for n, m in model.named_modules()}}


def assert_given_back(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    changed = [k for k, v in before["state"].items() if not torch.equal(after[k], v)]
    assert changed == []
    assert all(b is before["tensors"][k] for k, b in model.named_buffers())  # the caller's own tensors
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]


CALLS = {
    "merge": lambda a, b: gr.merge(a, b, X),
    "merge_refit": lambda a, b: gr.merge(a, b, X, refit=1, repair="exact"),
    "merge_approx": lambda a, b: gr.merge(a, b, X, repair="approx"),
    "align": lambda a, b: gr.align(a, b, X),
    "barrier": lambda a, b: gr.barrier(a, b, eval_data=(X, Y), fit_data=X, alphas=3),
    "evaluate": lambda a, b: gr.evaluate(a, (X, Y)),
    "discover": lambda a, b: gr.discover(a, X[:4]),
    "check": lambda a, b: gr.discover(a, X[:4]).check(a, X[:4]),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("training", [False, True])
def test_buffers_a_forward_changes_are_given_back(call, training):
    """Before: ``calls``, ``ema`` and ``peak`` came back changed from merge and evaluate."""
    a, b = pair(Counting)
    a.train(training)
    b.train(training)
    before_a, before_b = snapshot(a), snapshot(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CALLS[call](a, b)
    assert_given_back(a, before_a)
    assert_given_back(b, before_b)
    with torch.no_grad():  # and the caller's model still works on its own tensors
        a(X[:2])
    assert int(a.calls) == 1


@pytest.mark.parametrize("cls", [Counting, Reassigning])
def test_export_evaluate_discover_give_buffers_back(tmp_path, cls):
    a, _ = pair(cls)
    before = snapshot(a)
    gr.export_onnx(a, X[:2], tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").stat().st_size > 0
    assert_given_back(a, before)
    gr.evaluate(a, (X, Y))
    assert_given_back(a, before)
    gr.discover(a, X[:4]).check(a, X[:4])
    assert_given_back(a, before)


@pytest.mark.parametrize("legacy", [False, True])
def test_spectral_norm_in_training_mode_is_given_back(legacy):
    """Spectral norm's power iteration moves its u and v buffers on every training-mode forward;
    before, gr.merge handed the model back with other u, v."""
    a, b = pair()
    for m in (a, b):
        (torch.nn.utils.spectral_norm if legacy else torch.nn.utils.parametrizations.spectral_norm)(m.b)
        m.train()
    before_a, before_b = snapshot(a), snapshot(b)
    merged = gr.merge(a, b, X)
    assert_given_back(a, before_a)
    assert_given_back(b, before_b)
    assert a.training and b.training and not merged.training


def test_restored_when_the_call_fails():
    a, b = pair(Counting)
    before = snapshot(a)
    with pytest.raises(GraphRepairError):
        gr.merge(a, b, X, alpha=float("nan"))
    with pytest.raises(Exception):  # noqa: B017 (whatever fails inside: a label out of range here)
        gr.evaluate(a, (X, torch.full((96,), 7)))
    assert_given_back(a, before)


# -- wrapped models ---------------------------------------------------------------------------


def _wrapped(kind: str, m: nn.Module) -> nn.Module:
    return torch.compile(m) if kind == "compile" else nn.DataParallel(m)


@pytest.mark.parametrize("kind", ["compile", "dataparallel"])
def test_wrapped_models_are_unwrapped_with_a_warning(kind):
    """Before: ``AssertionError: Guard failed: args_0.size()[0] == 2``."""
    a, b = pair()
    wa, wb = _wrapped(kind, a), _wrapped(kind, b)
    with pytest.warns(GraphRepairWarning, match="module inside, MLP") as record:
        merged = gr.merge(wa, wb, X)
    assert any(("_orig_mod" if kind == "compile" else ".module") in str(w.message) for w in record)
    assert type(merged) is MLP
    plain = gr.merge(a, b, X)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), plain(X))
    with pytest.warns(GraphRepairWarning):
        spec = gr.discover(wa, X[:4])
    assert spec.num_free == 32
    with pytest.warns(GraphRepairWarning):
        acc, _ = gr.evaluate(wa, (X, Y))
    assert acc == gr.evaluate(a, (X, Y))[0]


def test_compiled_data_parallel_is_unwrapped_twice():
    a, b = pair()
    with pytest.warns(GraphRepairWarning, match="torch.compile'd module .* in a DataParallel"):
        merged = gr.merge(torch.compile(nn.DataParallel(a)), b, X)
    assert type(merged) is MLP


# -- models that cannot be merged -------------------------------------------------------------


def test_two_dtypes_are_refused_naming_both():
    """Before: ``RuntimeError: mat1 and mat2 must have the same dtype``."""
    a, b = pair()
    b = b.to(torch.bfloat16)
    for call in (lambda: gr.merge(a, b, X), lambda: gr.align(a, b, X),
                 lambda: gr.barrier(a, b, eval_data=(X, Y), fit_data=X, alphas=3)):
        with pytest.raises(GraphRepairError, match="model A is float32 and model B is bfloat16") as e:
            call()
        assert "model.to(torch.float32)" in str(e.value)
    with pytest.raises(GraphRepairError, match="model 0 is float32 and model 2 is bfloat16"):
        gr.merge_models([a, pair()[0], b], X)


@pytest.mark.parametrize("call", ["merge", "discover", "evaluate", "export"])
def test_meta_device_models_are_refused(call, tmp_path):
    """Before: ``RuntimeError: Tensor.item() cannot be called on meta tensors`` (merge), a
    ShapeError blaming the example input (discover)."""
    with torch.device("meta"):
        a = MLP()
    b = MLP()
    run = {"merge": lambda: gr.merge(a, b, X), "discover": lambda: gr.discover(a, X[:4]),
           "evaluate": lambda: gr.evaluate(a, (X, Y)),
           "export": lambda: gr.export_onnx(a, X[:2], tmp_path / "m.onnx")}[call]
    who = "model A" if call == "merge" else "the model"
    with pytest.raises(GraphRepairError, match=f"{who} is on the meta device \\(no weights.*load its weights first"):
        run()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_a_factory_returning_a_wrapped_model_gives_the_module_inside(wrap, tmp_path, monkeypatch):
    """The command line's --model MODULE:FACTORY: a wrapped model's checkpoint keys are the module's
    own (no "_orig_mod." / "module." prefix), so loading works on the module inside."""
    from graphrepair.io.loading import load_model
    from graphrepair.io.fileio import save_safetensors

    (tmp_path / "wrapped_factory.py").write_text(
        "import torch\nfrom torch import nn\nfrom tests.test_models_hostile import MLP\n\n"
        f"def make():\n    return {'torch.compile(MLP())' if wrap == 'compile' else 'nn.DataParallel(MLP())'}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(3)
    ref = MLP()
    save_safetensors(ref.state_dict(), tmp_path / "w.safetensors")
    with pytest.warns(GraphRepairWarning, match="wrapped_factory:make"):
        model = load_model("wrapped_factory:make", tmp_path / "w.safetensors")
    assert type(model) is MLP
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call", ["merge", "merge_models", "discover", "export", "trace", "permute"])
def test_what_is_not_a_model_is_refused_saying_what_to_do(call, tmp_path):
    """A state dict, a path or None where a model goes. Before: ``AttributeError: 'OrderedDict'
    object has no attribute 'state_dict'`` from deep inside the merge."""
    a, b = pair()
    state = a.state_dict()
    run = {"merge": lambda v: gr.merge(v, b, X), "merge_models": lambda v: gr.merge_models([a, v], X),
           "discover": lambda v: gr.discover(v, X[:4]),
           "export": lambda v: gr.export_onnx(v, X[:2], tmp_path / "m.onnx"),
           "trace": lambda v: gr.trace(v, X[:4]), "permute": lambda v: gr.permute(v, gr.discover(a, X[:4]), {})}[call]
    who = {"merge": "model A \\(model_a\\)", "merge_models": "model B \\(models\\[1\\]\\)"}.get(call, "the model \\(model\\)")
    with pytest.raises(GraphRepairError, match=f"{who} is a mapping \\(OrderedDict\\), not a torch.nn.Module: a state dict\\? "
                                               "Build the model, load the weights into it \\(model.load_state_dict"):
        run(state)
    with pytest.raises(GraphRepairError, match=f"{who} is a path, 'b.safetensors', not a torch.nn.Module: .*"
                                               "graphrepair merge --model MODULE:FACTORY"):
        run("b.safetensors")
    with pytest.raises(GraphRepairError, match=f"{who} must be a torch.nn.Module, got NoneType"):
        run(None)
    assert not (tmp_path / "m.onnx").exists()
    assert all(torch.equal(v, state[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("nested", [False, True])
def test_torchscript_models_are_refused_naming_the_module(nested, tmp_path):
    """A scripted model, or one holding a scripted submodule: neither torch.fx nor torch.export
    reads TorchScript, and a TorchScript module's tables are no Python dicts. Before: ``AttributeError:
    'OrderedDictWrapper' object has no attribute 'get'``, raised while giving the models back,
    which hid the trace's own error."""
    torch.manual_seed(0)

    def make():
        first = nn.Linear(8, 16)
        return nn.Sequential(torch.jit.script(first) if nested else first, nn.ReLU(), nn.Linear(16, 4))

    a, b = make(), make()
    if not nested:
        a, b = torch.jit.script(a), torch.jit.script(b)
    before = a.training
    where = "holds at '0' a TorchScript module" if nested else "is a TorchScript module"
    for who, call in (("model A", lambda: gr.merge(a, b, X)), ("the model", lambda: gr.discover(a, X[:4])),
                      ("the model", lambda: gr.export_onnx(a, X[:2], tmp_path / "m.onnx")),
                      ("the model", lambda: gr.trace(a, X[:4]))):
        with pytest.raises(GraphRepairError, match=f"{who} {where} \\(torch.jit.script or torch.jit.trace made it\\).*"
                                                   "use the nn.Module it was made from"):
            call()
    assert not (tmp_path / "m.onnx").exists()
    assert a.training == before


@pytest.mark.parametrize("how", ["dynamic", "static"])
def test_quantized_models_are_refused_naming_the_module(how):
    """Before (dynamic): ``AttributeError: 'torch.dtype' object has no attribute 'is_meta'`` (its
    state dict holds a dtype and packed parameters, no weights)."""
    from torch.ao import quantization as tq

    def make():
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        if how == "dynamic":
            return tq.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
        q = nn.Sequential(tq.QuantStub(), *m, tq.DeQuantStub()).eval()
        q.qconfig = tq.get_default_qconfig("fbgemm")
        tq.prepare(q, inplace=True)
        q(X)
        return tq.convert(q)

    a, b = make(), make()
    with pytest.raises(GraphRepairError, match=r"model A holds at '\d' a quantized module \(torch\.ao\.nn\.quantized\..*"
                                               r"merge the float models, then quantize the merged one"):
        gr.merge(a, b, X)
    with pytest.raises(GraphRepairError, match=r"the model holds at '\d' a quantized module"):
        gr.discover(a, X[:4])


class WithExtra(nn.Linear):
    """A module with extra state (``get_extra_state``): a dict in its state dict, as an fp8 layer's
    scaling metadata would be."""

    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state):
        self.extra = state


def test_extra_state_is_refused_where_a_state_dict_is_merged_and_let_be_elsewhere(tmp_path):
    """Before: ``AttributeError: 'dict' object has no attribute 'shape'`` from discovery and the
    merge. An export and an evaluation read no state dict: they run as before."""
    def make():
        return nn.Sequential(WithExtra(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    torch.manual_seed(0)
    a, b = make(), make()
    extra = r"state dict holds '0._extra_state', a dict, not a tensor \(a module's extra state, from its get_extra_state\)"
    with pytest.raises(GraphRepairError, match=f"model A's {extra}"):
        gr.merge(a, b, X)
    with pytest.raises(GraphRepairError, match=f"the model's {extra}"):
        gr.discover(a, X[:4])
    report = gr.export_onnx(a, X[:2], tmp_path / "m.onnx")
    assert report.max_abs_diff < 1e-4 and (tmp_path / "m.onnx").exists()
    accuracy, loss = gr.evaluate(a, (X, Y))
    assert 0 <= accuracy <= 1 and loss > 0


@pytest.mark.parametrize("call", ["merge", "discover", "evaluate", "export"])
def test_lazy_modules_not_yet_made_are_refused_and_left_unmade(call, tmp_path):
    """A ``nn.LazyLinear`` before its first forward has no weights: its forward would make them,
    with random values, in the caller's model. Before: ``RuntimeError: Can't access the shape of an
    uninitialized parameter`` from discovery. Once made (one forward), the model merges."""
    def make():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4)).eval()

    torch.manual_seed(0)
    a, b = make(), make()
    b(X[:1])
    run = {"merge": lambda: gr.merge(a, b, X), "discover": lambda: gr.discover(a, X[:4]),
           "evaluate": lambda: gr.evaluate(a, (X, Y)),
           "export": lambda: gr.export_onnx(a, X[:2], tmp_path / "m.onnx")}[call]
    who = "model A" if call == "merge" else "the model"
    with pytest.raises(GraphRepairError, match=f"{who} holds at '2' a lazy module \\(LazyLinear\\) whose parameters "
                                               "are not made yet.*run the model once"):
        run()
    assert a[2].has_uninitialized_params() and not (tmp_path / "m.onnx").exists()
    a(X[:1])
    assert isinstance(gr.merge(a, b, X), nn.Sequential)


class Caching(MLP):
    """A forward that keeps things on its module: a tensor made on the first call and reused
    (a positional table, a mask) and the latest hidden activation."""

    def __init__(self):
        super().__init__()
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.zeros(16)
        h = torch.relu(self.a(x)) + self.table
        self.last = h
        return self.h(torch.relu(self.b(h)))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("warm", [False, True])
def test_what_a_forward_keeps_on_its_module_is_given_back_and_no_proxy_is_left(call, warm):
    # symbolic tracing runs the forward on proxies: a cache made on the first call, or an
    # attribute set on every call, held a torch.fx.Proxy afterwards, and the caller's model
    # then returned a Proxy instead of a tensor (as did the merged model, copied from it)
    a, b = pair(Caching)
    if warm:
        with torch.no_grad():
            a(X), b(X)
    before = {m: dict(vars(m)) for m in (a, b)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphRepairWarning)
        out = CALLS[call](a, b)
    for m in (a, b):
        assert vars(m).keys() == before[m].keys()
        assert all(vars(m)[k] is v for k, v in before[m].items())
    assert isinstance(a(X), torch.Tensor) and isinstance(b(X), torch.Tensor)
    merged = out if isinstance(out, nn.Module) else getattr(out, "model", None)
    if call.startswith("merge"):
        assert isinstance(merged, Caching)
        assert not any(isinstance(v, torch.fx.Proxy) for m in merged.modules() for v in vars(m).values())
        assert isinstance(merged(X), torch.Tensor)



class Replacing(MLP):
    """A forward that replaces its own parameters, buffers and submodules with new objects (a
    gain re-wrapped as a new nn.Parameter, a buffer and a layer registered on the first call): a
    habit that leaves the caller's optimizer holding parameters the model no longer reads."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = torch.relu(self.a(x)) * self.gain
        self.gain = nn.Parameter(self.gain.detach().clone())
        if "extra" not in self._buffers:
            self.register_buffer("extra", torch.zeros(()))
            self.spare = nn.Linear(2, 2)
        return self.h(torch.relu(self.b(h)))


@pytest.mark.parametrize("call", list(CALLS))
def test_parameters_buffers_and_modules_a_forward_replaces_are_given_back(call):
    """Before, every call but merge left the caller's model holding the forward's new gain (not
    the caller's nn.Parameter, which an optimizer holds), a buffer and a submodule it never had."""
    a, b = pair(Replacing)
    if call != "evaluate":  # (tracing a model that builds itself on its first call: the next test)
        with torch.no_grad():
            a(X), b(X)
    before = {m: {k: dict(vars(m)[k]) for k in ("_parameters", "_buffers", "_modules")} for m in (a, b)}
    transient = {m: set(m._non_persistent_buffers_set) for m in (a, b)}
    params = {m: list(m.parameters()) for m in (a, b)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphRepairWarning)
        out = CALLS[call](a, b)
    for m in (a, b):
        for key, was in before[m].items():
            now = vars(m)[key]
            assert now.keys() == was.keys(), (key, now.keys(), was.keys())
            assert all(now[k] is v for k, v in was.items()), key
        assert all(p is q for p, q in zip(m.parameters(), params[m])) and len(list(m.parameters())) == len(params[m])
        assert m._non_persistent_buffers_set == transient[m]
    if call.startswith("merge"):
        merged = out if isinstance(out, nn.Module) else out.model
        # (the refit runs the merged model's own forward, which registers its extras as on any first call)
        assert isinstance(merged, Replacing) and set(a.state_dict()) <= set(merged.state_dict())
        assert torch.isfinite(merged(X)).all()


class Building(Replacing):
    """Registers a non-persistent buffer on its first call too."""

    def forward(self, x):
        if "scratch" not in self._buffers:
            self.register_buffer("scratch", torch.zeros(()), persistent=False)
        return super().forward(x)


@pytest.mark.parametrize("call", ["merge", "discover", "align"])
def test_a_model_that_registers_weights_on_its_first_call_is_refused_until_called_once(call):
    """Tracing runs the forward, and a forward that registers buffers or layers on its first call
    registered them on the caller's model as torch.export's fake tensors (a merge then failed on
    the missing weight, and model A kept FakeTensor buffers). Now a TraceError says to call the
    model once first; the model comes back without them; once called, it merges."""
    a, b = pair(Building)
    with pytest.raises(gr.TraceError, match=r"the forward of Building registers buffer 'extra', buffer 'scratch', "
                                            r"submodule 'spare' when called \(it builds itself on its first "
                                            r"call\): call the model once on an example before graphrepair traces it"):
        CALLS[call](a, b)
    assert dict(a.named_buffers()) == {} and not hasattr(a, "spare") and a._non_persistent_buffers_set == set()
    with torch.no_grad():
        a(X), b(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphRepairWarning)
        CALLS[call](a, b)

class Holding(MLP):
    """A model holding what deepcopy refuses: a lock, a dict with one, an open file."""

    def __init__(self, path):
        super().__init__()
        self.b.lock = __import__("threading").Lock()
        self.state = {"lock": __import__("threading").RLock(), "calls": 0}
        self.log = open(path, "w")


def test_a_model_holding_what_cannot_be_copied_is_merged_sharing_it_with_a_warning(tmp_path):
    torch.manual_seed(0)
    a, b = Holding(tmp_path / "a.log"), Holding(tmp_path / "b.log")
    try:
        with pytest.warns(UserWarning) as caught:
            merged = gr.merge(a, b, X, repair="exact")
        said = {str(w.message) for w in caught}
        for where in ("attribute 'lock' of module 'b' (a _thread.lock)",
                      "an item of attribute 'state' of the Holding (a _thread.RLock)",
                      "attribute 'log' of the Holding (a _io.TextIOWrapper)"):
            assert any(s.startswith(where) and s.endswith("the copy shares this object with the original")
                       for s in said), (where, said)
        assert type(merged) is Holding
        assert merged.b.lock is a.b.lock and merged.log is a.log and merged.state["lock"] is a.state["lock"]
        assert merged.state is not a.state and merged.b is not a.b  # the rest is copied as deepcopy copies it
        assert merged.b.weight.data_ptr() != a.b.weight.data_ptr()
        assert isinstance(merged(X), torch.Tensor)
    finally:
        a.log.close(), b.log.close()


def test_a_model_keeping_an_activation_with_its_graph_is_merged_with_its_values_detached():
    # a training step leaves self.last with a grad_fn: deepcopy refuses such a tensor
    a, b = pair(Caching)
    for m in (a, b):
        m(X).sum().backward()
    kept = a.last
    assert kept.grad_fn is not None
    with pytest.warns(UserWarning, match=r"attribute 'last' of the Caching is a tensor computed with autograd"):
        merged = gr.merge(a, b, X)
    assert a.last is kept and kept.grad_fn is not None
    assert isinstance(merged.last, torch.Tensor) and merged.last.grad_fn is None
    assert isinstance(merged(X), torch.Tensor)


class Uncopyable(MLP):
    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle 'Uncopyable' object")


def test_a_model_that_cannot_be_copied_itself_is_a_graphrepair_error_naming_it():
    a, b = pair(Uncopyable)
    with pytest.raises(GraphRepairError, match=r"^Uncopyable cannot be copied \(TypeError: cannot pickle "
                                               r"'Uncopyable' object\); give it a __deepcopy__"):
        gr.merge(a, b, X)


def _halve(x):
    x /= 2


WRITES = {  # a forward's first step, written into its input
    "x /= 2": _halve,
    "x.sub_(0.1).div_(2)": lambda x: x.sub_(0.1).div_(2),
    "relu(x, inplace=True)": lambda x: torch.nn.functional.relu(x, inplace=True),
    "x[:, :3] *= 2": lambda x: x[:, :3].mul_(2),
}


class Writing(MLP):
    """A forward that writes into its input (preprocessing in place); ``export``: one that
    symbolic tracing cannot trace (torch.export's graph then)."""

    def __init__(self, how, export=False, out_of_place=False):
        super().__init__()
        self.how, self.export, self.out_of_place = how, export, out_of_place

    def forward(self, x):
        if self.export and x.size(1) == 3:
            x = x * 0
        if self.out_of_place:
            x = x.clone()
        WRITES[self.how](x)
        return super().forward(x)


@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("how", list(WRITES))
def test_a_forward_writing_into_its_input_merges_as_its_out_of_place_twin(how, export):
    # before: the proof ran the model twice on one example (the second run saw it halved), the
    # joint pass fed B what A had written, and the caller's data came back changed
    torch.manual_seed(0)
    a, b = Writing(how, export), Writing(how, export)
    twins = []
    for m in (a, b):
        twins.append(Writing(how, export, out_of_place=True))
        twins[-1].load_state_dict(m.state_dict())
    x = X.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphRepairWarning)
        got = gr.merge_models([a, b], x, repair="exact")
        want = gr.merge_models(twins, X.clone(), repair="exact")
        graph = gr.merge_models([a, b], x, repair="exact", output="graph").model
        spec = gr.discover(a, x[:4])
        assert gr.evaluate(a, (x, Y))
    assert torch.equal(x, X)  # the caller's data as given
    assert all(torch.equal(got.perms[0][k], want.perms[0][k]) for k in want.perms[0])
    assert torch.equal(got.model(X.clone()), want.model(X.clone()))
    torch.testing.assert_close(graph(X.clone()), got.model(X.clone()), rtol=1e-5, atol=1e-6)
    # (symbolic tracing makes ``x /= 2`` out of place: that graph writes into nothing)
    assert any("writes into its inputs" in n for n in spec.traced.notes) == (how != "x /= 2" or export)


class Renormed(nn.Module):
    """An embedding with ``max_norm``: its forward renormalises the rows it looks up, in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16, max_norm=1.0)
        self.a, self.h = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, ids):
        return self.h(torch.relu(self.a(self.emb(ids).mean(1))))


IDS = torch.randint(0, 40, (96, 5), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("call", ["merge", "align", "barrier", "evaluate"])
def test_weights_a_forward_renormalises_are_given_back(call):
    torch.manual_seed(0)
    a, b = Renormed(), Renormed()
    before = [m.emb.weight.detach().clone() for m in (a, b)]
    assert before[0].norm(dim=1).max() > 1  # rows the forward will renormalise
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphRepairWarning)  # given back: nothing to say
        warnings.filterwarnings("ignore", message=".*fewer than")
        {"merge": lambda: gr.merge(a, b, IDS),
         "align": lambda: gr.align(a, b, IDS),
         "barrier": lambda: gr.barrier(a, b, eval_data=(IDS, Y), fit_data=IDS, alphas=3),
         "evaluate": lambda: gr.evaluate(a, (IDS, Y))}[call]()
    assert all(torch.equal(m.emb.weight, w) for m, w in zip((a, b), before))


class Clipping(MLP):
    """A forward that clips its own weight in place."""

    def forward(self, x):
        with torch.no_grad():
            self.b.weight.clamp_(-0.1, 0.1)
        return super().forward(x)


def test_a_weight_a_forward_changes_in_place_is_named():
    a, b = pair(Clipping)
    with pytest.warns(GraphRepairWarning, match=r"the model's forward changed parameter 'b.weight' in place during "
                                                r"the call \(graphrepair runs the forward, it does not write "
                                                r"weights\) and it could not be given back"):
        gr.evaluate(a, (X, Y))


class Sampling(MLP):
    """A forward that draws random numbers in eval mode: dropout always on, or added noise."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = F.dropout(h, 0.2, training=True) if self.how == "dropout" else h + 0.01 * torch.randn_like(h)
        return self.h(torch.relu(self.b(h)))


@pytest.mark.parametrize("how", ["dropout", "noise"])
def test_a_forward_drawing_random_numbers_is_refused_saying_so_not_called_a_discovery_bug(how):
    torch.manual_seed(0)
    a, b = Sampling(how), Sampling(how)
    said = (r"Sampling gives other outputs when run again on the same example in eval mode \(max abs diff "
            r"[0-9.e-]+\): its forward draws random numbers \(dropout called with training=True, added noise, "
            r"sampling\), so no permutation can be checked against it; make the forward deterministic in eval "
            r"mode \(e.g. F.dropout\(x, p, training=self.training\)\) to merge it$")
    with pytest.raises(GraphRepairError, match="^model B: " + said):
        gr.merge(a, b, X)
    with pytest.raises(GraphRepairError, match="^" + said):
        gr.discover(a, X[:4]).check(a, X[:4])


class Tied(nn.Module):
    """A small language model whose output layer may share the embedding's weight."""

    def __init__(self, tie):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(30, 16), nn.Linear(16, 16), nn.Linear(16, 30, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.parametrize("ties", [(True, False), (False, True)])
def test_models_tied_differently_are_refused_naming_the_weights(ties):
    # before: A tied, B not: the merged output layer silently lost B's; A not, B tied: B's one
    # tensor was permuted as two, and the proof blamed discovery
    torch.manual_seed(0)
    a, b = Tied(ties[0]), Tied(ties[1])
    said = ["ties 'head.weight' to 'emb.weight'", "does not tie 'head.weight'"]
    first, second = said if ties[0] else said[::-1]
    ids = torch.randint(0, 30, (32, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(GraphRepairError, match=rf"^models A and B differ: A {first} and B {second}; tie or untie "
                                               rf"them alike before merging$"):
        gr.merge(a, b, ids, repair=None)
    merged = gr.merge(a, Tied(ties[0]), ids, repair=None)  # tied alike: merged, tied as A is
    assert (merged.head.weight is merged.emb.weight) == ties[0]
