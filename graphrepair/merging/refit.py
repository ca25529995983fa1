"""Layerwise least-squares refit of a merged model: a correction beyond REPAIR's per-channel mean and
standard deviation (``merge(..., refit=S)``).

REPAIR restores each channel's first two moments. The refit asks more of each layer: that on the
merged model's *own* inputs it reproduce, example by example, the interpolation of the aligned
endpoints' outputs of that layer,

    T_L = sum_i w_i L_i(x_i)            x_i: endpoint i's own input to layer L (B aligned to A)
    minimise over L's parameters theta:   sum over the fitting data ||L(x_M) - T_L||^2 + lam ||theta - theta_0||^2

with x_M the merged model's input to L, so that each layer also corrects what the layers before it
left, and theta_0 the parameters it has now (REPAIR's result). The ridge ``lam = RIDGE * mean of the
diagonal of X^T X`` keeps what the data cannot determine (inputs that never vary, dead units) where
it was. The statistics are sums (X^T X of the merged model's inputs with a column of ones for the
bias, X^T T), gathered in float64 over the fitting batches, reduced across the processes of a
distributed run like every other statistic, and solved in closed form. The result is written into
the layers' own parameters: nothing to fold, the merged model keeps its class.

Layers (modules called with the same parameters in the merged model and in every endpoint, found
by name; the spec's groups give the same channel order in all of them):

- ``nn.Linear``: full least squares of its weight and bias;
- ``nn.Conv1d`` / ``nn.Conv2d`` with zero padding: the same on the unfolded input patches; grouped
  convolutions fit each group's block of the weight on its own input channels;
- eval-mode ``BatchNorm1d/2d/3d`` with running statistics, and ``LayerNorm`` over the last axis:
  each channel's gamma and beta, the least-squares affine of its normalised input (a BatchNorm's
  running statistics stay as they are).

Anything else keeps its parameters (``Refit.kept`` says which and why). A conv (or a linear into
a ``BatchNorm1d``) whose output goes straight into an eval BatchNorm (the BatchNorm called on the
very tensor the layer returned, each once per forward, no gamma near 0) is fit through it, as one
affine map: its target is the BatchNorm's target mapped back, BN^-1(T) = (T - beta) / gamma *
sqrt(var + eps) + mean, with an intercept that goes into the layer's bias or, without one, into
the BatchNorm's running mean. Least squares fits each output channel on its own, so this is the
least-squares fit of the pair in the BatchNorm's output space; it costs one pass, not two.

The layers are refit one after another in the order the merged model calls them (Gauss-Seidel):
layer L is fit on inputs that the layers already refit before it produce. The endpoints' targets
do not change: one pass of the endpoints keeps them all (as the rows that enter the sums, at most
``MAX_ROWS`` per call of a layer on a batch, picked by a fixed seed) when they take at most
``CACHE_BYTES``; otherwise every layer's pass recomputes its own. Each layer then costs one pass
of the merged model over the fitting data, cut off once that layer has run (a layer called more
than once per forward runs the whole pass): a sweep costs about half a pass of the merged model
per layer. Refitting every layer from one shared pass (Jacobi) diverges: on
the MNIST MLP pair of 20 layers of width 128 its relative error to the targets went 0.17 -> 0.9
-> 3e10 over two sweeps (the test accuracy to 10%), whatever the ridge (1e-2 to 1), while the
sequential refit brought it to 0.014 in one sweep (96.00% -> 97.16%). ``Refit.before`` and
``Refit.after`` give each layer's relative squared error to its target in the pass before its
first solve and, with ``measure``, after the last sweep.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graphrepair import distributed
from graphrepair.errors import GraphRepairError
from graphrepair.io.inputs import Inputs
from graphrepair.models import eval_mode, forward_hooks

RIDGE = 1e-4  # lam over the mean diagonal of X^T X
EXAMPLES = 512  # the default number of fitting examples the refit reads (the first ones)
MAX_ROWS = 8192  # rows (examples x positions) of one call of a layer on one batch that enter its sums
CACHE_BYTES = 2 ** 30  # the endpoints' targets are kept from one pass when they take at most this
UNFOLD_BYTES = 2 ** 27  # a conv's input patches are unfolded this much at a time

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM = (*_BN, nn.LayerNorm)  # a per-channel affine of a normalised input: gamma and beta are refit


@dataclass
class Refit:
    layers: list[str] = field(default_factory=list)  # the refit modules, in call order
    kept: dict[str, str] = field(default_factory=dict)  # module -> why its parameters were kept
    before: dict[str, float] = field(default_factory=dict)  # layer -> relative squared error to its
    after: dict[str, float] = field(default_factory=dict)  # target before its first solve / after the last
    cached: bool = False  # the targets were kept from one pass of the endpoints
    through: dict[str, str] = field(default_factory=dict)  # conv/linear -> the BatchNorm it was fit through
    sweeps: int = 0  # as asked
    examples: int | None = None  # the fitting examples asked for (None: all), over every process


def check_refit(sweeps, examples=None) -> None:
    """The error for a number of refit sweeps or of refit examples that is not one (checked
    before a merge's passes, not after them)."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise GraphRepairError(f"refit must be a whole number of sweeps >= 0, got {sweeps!r}")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise GraphRepairError(f"refit_examples must be a whole number >= 1 or None, got {examples!r}")


def _why_not(module: nn.Module) -> str | None:
    """Why ``module`` cannot be refit (None: it can)."""
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} (only zero padding is unfolded)"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding {module.padding!r}"
        return None
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return f"LayerNorm over {len(module.normalized_shape)} axes (only the last axis is refit)"
        if not module.elementwise_affine or module.bias is None:
            return "LayerNorm without a weight and a bias"
        return None
    if isinstance(module, _BN):
        if module.training:
            return "BatchNorm in training mode (batch statistics)"
        if module.running_mean is None or module.running_var is None:
            return "BatchNorm without running statistics"
        if not module.affine:
            return "BatchNorm without affine parameters"
        return None
    return None


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows of a least-squares problem (one row per output position)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.LayerNorm):  # the normalised input (channels last already)
        return F.layer_norm(x, module.normalized_shape, eps=module.eps).reshape(-1, x.shape[-1])
    if isinstance(module, _BN):  # the normalised input, channel last
        shape = [1, -1] + [1] * (x.dim() - 2)
        z = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        return z.movedim(1, -1).reshape(-1, x.shape[1])
    k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    if isinstance(p, str):
        p = (0,) * len(k)
    if isinstance(module, nn.Conv1d):  # as a conv2d of height 1
        x, k, s, p, d = x.unsqueeze(2), (1, *k), (1, *s), (0, *p), (1, *d)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _picked_rows(module: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``_take(_rows(module, x), keep)`` without unfolding the whole batch at once: a conv's patches
    of a 224x224 batch take gigabytes (64 images x 576 x 50,176 floats: 7.4 GB), so they are
    unfolded a few examples at a time (``UNFOLD_BYTES``) and only the kept rows are gathered."""
    if keep is None or not isinstance(module, _CONV):
        return _take(_rows(module, x), keep)
    per_example = _rows(module, x[:1])  # (positions, C*k) of one example
    positions, width = per_example.shape
    step = max(1, UNFOLD_BYTES // max(1, positions * width * x.element_size()))
    keep = keep.to(x.device)
    parts = []
    for i in range(0, x.shape[0], step):
        lo, hi = i * positions, min(x.shape[0], i + step) * positions
        inside = keep[(keep >= lo) & (keep < hi)]
        if len(inside):
            parts.append(_rows(module, x[i:i + step])[inside - lo])
    return torch.cat(parts) if parts else per_example[:0]


def _targets(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])  # conv and BatchNorm: channel axis 1


class _Layer:
    """The sums of one layer: X^T X and X^T T per weight block (groups), float64."""

    def __init__(self, name: str, module: nn.Module, through: tuple[str, nn.Module] | None = None):
        self.name, self.module = name, module
        self.target = name if through is None else through[0]  # whose outputs are the targets
        self.bn = None if through is None else through[1]  # fit through this BatchNorm (see ``pre``)
        self.bias = isinstance(module, _NORM) or self.bn is not None or getattr(module, "bias", None) is not None
        self.groups = module.groups if isinstance(module, _CONV) else 1
        self.reset()

    def add(self, x: torch.Tensor, t: torch.Tensor, got: torch.Tensor) -> None:
        """Add rows: the merged model's inputs ``x``, the targets ``t``, its outputs ``got``."""
        x, t, got = x.double(), t.double(), got.double()
        self.err += (got - t).square().sum()  # kept on the device: no host sync per batch
        self.norm += (t - t.mean(0)).square().sum()
        if isinstance(self.module, _NORM):  # per channel: the 2x2 system of (z, 1)
            gram = torch.stack([x.square().sum(0), x.sum(0), torch.full_like(x[0], x.shape[0])], 1)
            cross = torch.stack([(x * t).sum(0), t.sum(0)], 1)
        else:
            g = self.groups
            xs = x.view(x.shape[0], g, -1).transpose(0, 1)  # (g, n, in/g * k)
            ts = t.view(t.shape[0], g, -1).transpose(0, 1)  # (g, n, out/g)
            if self.bias:
                xs = torch.cat([xs, torch.ones_like(xs[..., :1])], -1)
            gram, cross = xs.transpose(1, 2) @ xs, xs.transpose(1, 2) @ ts
        self.gram += gram
        self.cross += cross

    def current(self) -> torch.Tensor:
        """The parameters as solved for: (g, in/g*k [+1], out/g), or (C, 2) for a BatchNorm."""
        m = self.module
        if isinstance(m, _NORM):
            return torch.stack([m.weight.detach(), m.bias.detach()], 1).double()
        w = m.weight.detach().double()
        g, out = self.groups, w.shape[0]
        w = w.reshape(g, out // g, -1)  # (g, out/g, in/g * k)
        if self.bias:  # a layer without a bias fit through its BatchNorm: the intercept starts at 0
            b = m.bias.detach().double() if m.bias is not None else w.new_zeros(out)
            w = torch.cat([w, b.view(g, out // g, 1)], -1)
        return w.transpose(1, 2)

    @torch.no_grad()
    def solve(self) -> None:
        m, theta0 = self.module, self.current()
        if isinstance(m, _NORM):
            a = torch.stack([torch.stack([self.gram[:, 0], self.gram[:, 1]], -1),
                             torch.stack([self.gram[:, 1], self.gram[:, 2]], -1)], 1)  # (C, 2, 2)
            lam = RIDGE * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
            a = a + lam[:, None, None] * torch.eye(2, dtype=a.dtype, device=a.device)
            theta = _solve(a, self.cross + lam[:, None] * theta0)
            m.weight.copy_(theta[:, 0].to(m.weight))
            m.bias.copy_(theta[:, 1].to(m.bias))
            return
        a = self.gram
        lam = RIDGE * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        a = a + lam[:, None, None] * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        theta = _solve(a, self.cross + lam[:, None, None] * theta0)  # (g, in/g*k [+1], out/g)
        theta = theta.transpose(1, 2)  # (g, out/g, in/g*k [+1])
        if self.bias:
            intercept = theta[..., -1].reshape(-1)
            if m.bias is not None:
                m.bias.copy_(intercept.to(m.bias))
            else:  # BN(Wx + c) = BN'(Wx) with BN's mean moved by -c
                self.bn.running_mean.sub_(intercept.to(self.bn.running_mean))
            theta = theta[..., :-1]
        m.weight.copy_(theta.reshape(m.weight.shape).to(m.weight))

    def pre(self, t: torch.Tensor) -> torch.Tensor:
        """Target rows (channel last) of the BatchNorm after this layer, mapped back through it: the
        layer's output that gives them, BN^-1(t) = (t - beta) / gamma * sqrt(var + eps) + mean."""
        if self.bn is None:
            return t
        bn = self.bn
        scale = torch.sqrt(bn.running_var.double() + bn.eps) / bn.weight.double()
        return ((t.double() - bn.bias.double()) * scale + bn.running_mean.double()).float()

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram, self.cross]

    def reset(self) -> None:
        """Zero sums, shaped as ``add`` makes them (a rank without data adds nothing)."""
        m, kw = self.module, dict(dtype=torch.float64, device=self.module.weight.device)
        if isinstance(m, _NORM):
            c = m.weight.shape[0]
            self.gram, self.cross = torch.zeros(c, 3, **kw), torch.zeros(c, 2, **kw)
        else:
            g, out = self.groups, m.weight.shape[0]
            d = m.weight[0].numel() + self.bias
            self.gram, self.cross = torch.zeros(g, d, d, **kw), torch.zeros(g, d, out // g, **kw)
        self.err, self.norm = torch.zeros((), **kw), torch.zeros((), **kw)


def _solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """a^-1 rhs per batch element (a symmetric, positive semi-definite); the pseudo-inverse where
    ``a`` is singular (a layer whose inputs never varied, with no ridge to hold it)."""
    theta, info = torch.linalg.solve_ex(a, rhs)
    bad = info != 0
    if bool(bad.any()):
        theta[bad] = torch.linalg.pinv(a[bad], hermitian=True) @ rhs[bad]
    return theta


def _find_layers(merged: nn.Module, endpoints: list[nn.Module]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The merged model's refit modules by name, and why the others of their kinds are kept."""
    layers, kept = {}, {}
    others = [dict(e.named_modules()) for e in endpoints]
    for name, module in merged.named_modules():
        if not isinstance(module, (nn.Linear, *_CONV, *_NORM)):
            continue
        if any(type(o.get(name)) is not type(module) for o in others):
            kept[name] = "no module of the same kind under this name in every endpoint"
            continue
        why = _why_not(module)
        if why is not None:
            kept[name] = why
            continue
        layers[name] = module
    return layers, kept


class _Stop(Exception):
    """Ends a forward pass once the layer being fit has been seen (nothing after it is needed)."""


@torch.no_grad()
def refit(merged: nn.Module, endpoints: list[nn.Module], weights: list[float], fit, sweeps: int,
          seed: int = 0, measure: bool = False, examples: int | None = EXAMPLES) -> Refit:
    """Refit ``merged``'s layers in place over ``fit`` (``io.examples.Examples``: every pass sees
    the same batches, so the targets of batch b from one pass meet the merged model's inputs of
    batch b from another) for ``sweeps`` sweeps, the
    targets the ``weights``-interpolation of the ``endpoints``' layer outputs (the endpoints B, C..
    already aligned to A); see the module text. ``measure``: one more pass per layer for its error
    after the last sweep (``Refit.after``). ``examples``: how many of the fitting examples (the first
    ones; None: all) the refit reads, over all processes of a distributed run."""
    check_refit(sweeps, examples)
    out = Refit(sweeps=sweeps, examples=examples)
    if examples is not None and distributed.current() is not None:
        examples = -(-examples // distributed.world())  # each rank its share
    if sweeps == 0:
        return out
    modules, out.kept = _find_layers(merged, endpoints)
    if not modules:
        why = "; ".join(f"{k}: {v}" for k, v in list(out.kept.items())[:3])
        raise GraphRepairError(f"refit: {type(merged).__name__} has no Linear, Conv1d/2d, BatchNorm or LayerNorm "
                               f"layer that can be refit" + (f" ({why})" if why else " (functional layers are not "
                               "refit); merge with refit=0"))
    ends = [dict(e.named_modules()) for e in endpoints]
    device = next(iter(modules.values())).weight.device
    with eval_mode(merged, *endpoints):
        calls, out.through = _calls(merged, modules, fit)  # call order, calls per forward, pairs
        out.layers = list(calls)
        paired = set(out.through.values())
        fitted = [n for n in out.layers if n not in paired]  # solved, in call order
        layers = {n: _Layer(n, modules[n], (out.through[n], modules[out.through[n]]) if n in out.through else None)
                  for n in fitted}
        index = {name: i for i, name in enumerate(out.layers)}
        targets = [n for n in out.layers if n not in out.through]  # whose outputs are targets
        cache = _Targets(endpoints, ends, weights, targets, index, seed, examples).fill(fit)
        out.cached = cache.filled

        def run(name):
            layer = layers[name]
            _pass(merged, layer, index[layer.target], fit, cache if cache.filled else
                  _Targets(endpoints, ends, weights, [layer.target], index, seed, examples,
                           stop=calls[layer.target] == 1),
                  stop=calls[name] == 1)
            return layer, torch.stack([layer.err, layer.norm])

        for sweep in range(sweeps):
            for name in fitted:
                layer, errs = run(name)
                flat = distributed.all_reduce_sum(layer.tensors() + [errs], device)  # exact float64 sums
                layer.gram, layer.cross = flat[0], flat[1]
                if sweep == 0:
                    out.before[name] = float(flat[2][0] / flat[2][1].clamp_min(1e-300))
                layer.solve()
                layer.reset()
        if measure:
            for name in fitted:
                layer, errs = run(name)
                e = distributed.all_reduce_sum([errs], device)[0]
                out.after[name] = float(e[0] / e[1].clamp_min(1e-300))
                layer.reset()
    return out


def _calls(merged: nn.Module, modules: dict[str, nn.Module], fit) -> tuple[dict[str, int], dict[str, str]]:
    """The layers in the order the merged model first calls them, with their calls per example
    batch; and {conv or linear: BatchNorm} where a BatchNorm (eval, every gamma away from 0) is
    called once, on the very tensor a conv or linear called once returned: the pair is fit as one
    affine map (the layer through the BatchNorm), in one pass instead of two."""
    counts: dict[str, int] = {}
    made: dict[int, str] = {}
    fed: dict[str, str] = {}

    def seen(name, inp, y):
        counts[name] = counts.get(name, 0) + 1
        if isinstance(modules[name], _BN) and inp and id(inp[0]) in made:
            fed[name] = made[id(inp[0])]
        made[id(y)] = name

    with forward_hooks(modules, seen):
        y = fit.example().call(merged)
    del y
    through = {}
    for bn, producer in fed.items():
        m, p = modules[bn], modules[producer]
        gamma = m.weight.detach().abs()
        if (counts[bn] == counts[producer] == 1 and bool((gamma > 1e-6 * gamma.max().clamp_min(1e-30)).all())
                and (isinstance(p, _CONV) or (isinstance(m, nn.BatchNorm1d) and isinstance(p, nn.Linear)))
                and p.weight.shape[0] == m.num_features):
            through[producer] = bn
    return counts, through


def _pick(rows: int, layer: int, batch: int, call: int, seed: int) -> torch.Tensor | None:
    """The rows of one call of one layer on one batch that enter the sums (all up to MAX_ROWS),
    the same in the endpoints' pass and the merged model's."""
    if rows <= MAX_ROWS:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + (layer * 65_537 + batch) * 257 + call)
    return torch.randperm(rows, generator=g)[:MAX_ROWS].sort().values  # ascending (``_picked_rows``)


def _take(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return t if keep is None else t[keep.to(t.device)]


class _Targets:
    """The targets of some layers: per batch and call, the ``weights``-sum of the endpoints' outputs
    of the layer, as the rows that enter the sums. ``fill`` keeps them for every layer from one pass
    of the endpoints when they take at most CACHE_BYTES (then every layer's pass runs the merged
    model alone); otherwise each layer's pass computes its own (``batch``), the endpoints stopped
    after the layer when it is called once."""

    def __init__(self, endpoints, ends, weights, names, index, seed, examples, stop=False):
        self.endpoints, self.ends, self.weights, self.names = endpoints, ends, weights, names
        self.index, self.seed, self.examples, self.stop = index, seed, examples, stop
        self.filled = False
        self.kept: dict[tuple[str, int], list] = {}

    def batch(self, x: Inputs, b: int) -> dict[str, list]:
        """{layer: [target rows per call]} of the batch of inputs ``x`` (the ``b``-th)."""
        out: dict[str, list] = {}
        for w, end, mods in zip(self.weights, self.endpoints, self.ends):
            seen: dict[str, int] = {}

            def keep(name, inp, y, w=w, seen=seen):
                c = seen.get(name, 0)
                seen[name] = c + 1
                rows = _targets(mods[name], y.detach())
                t = w * _take(rows, _pick(rows.shape[0], self.index[name], b, c, self.seed)).float()
                slot = out.setdefault(name, [])
                if c < len(slot):
                    slot[c] = slot[c] + t
                else:
                    slot.append(t)
                if self.stop:
                    raise _Stop

            with forward_hooks({n: mods[n] for n in self.names}, keep), contextlib.suppress(_Stop):
                x.call(end)
        return out

    def fill(self, fit) -> "_Targets":
        """Keep every layer's targets over the refit's examples, if they fit in CACHE_BYTES."""
        size = 0
        for b, batch in enumerate(fit.take(self.examples)):
            got = self.batch(batch.inputs, b)
            size += sum(t.numel() * t.element_size() for ts in got.values() for t in ts)
            if b == 0:  # the first batch tells: this much per example
                known = [v for v in (fit.count if fit.count is not None else fit.n, self.examples) if v is not None]
                total = min(known) if known else None
                if total is None or size / max(batch.size, 1) * total > CACHE_BYTES:
                    self.kept.clear()
                    return self
            for name, ts in got.items():
                self.kept[(name, b)] = ts
        self.filled = True
        return self

    def of(self, x: Inputs, b: int, name: str) -> list:
        if self.filled:
            return self.kept.get((name, b), [])
        return self.batch(x, b).get(name, [])


def _pass(merged, layer: _Layer, index: int, fit, targets: _Targets, stop: bool) -> None:
    """One pass for one layer: the merged model's input and output of it per batch, against the
    batch's targets, added to the layer's sums. A layer called once per forward ends each forward
    there (``stop``)."""
    name = layer.name
    for b, batch in enumerate(fit.take(targets.examples)):
        target = [layer.pre(t) for t in targets.of(batch.inputs, b, layer.target)]
        seen = [0]

        def add(_, inp, y):
            c = seen[0]
            seen[0] += 1
            rows = _targets(layer.module, y.detach())
            keep = _pick(rows.shape[0], index, b, c, targets.seed)
            got = _take(rows, keep)
            if c < len(target) and got.shape == target[c].shape:  # else no target for this call
                layer.add(_picked_rows(layer.module, inp[0].detach(), keep), target[c], got)
            if stop:
                raise _Stop

        with forward_hooks({name: layer.module}, add), contextlib.suppress(_Stop):
            batch.inputs.call(merged)
