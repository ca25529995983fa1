"""Measurements along the path between two models.

Barrier (REPAIR, Eq. 1), for the loss L and likewise for the error rate:

    B = sup_a [ L(theta_a) - ((1 - a) L(theta_A) + a L(theta_B)) ]

evaluated on a grid of alphas. Accuracy barriers are reported as the height of the error bump.

Variance collapse (REPAIR 3.1), per reset point (conv/linear or residual output), with v the mean
over channels of the per-channel variance on the fitting data:

    ratio = v_merged / ((v_A + v_B') / 2)                 (1 = no collapse; REPAIR restores ~1)

Layerwise linear feature connectivity (Zhou et al. 2023), per point, over the examples x:

    LLFC = mean_x cos( f(theta_a; x),  (1 - a) f(theta_A; x) + a f(theta_B'; x) )

and the commutativity distance of a Linear/Conv layer with weights W and input features H,

    ||W_A H_B' - W_B' H_A||_F / (||W_A H_A||_F + ||W_B' H_B'||_F) * 2    (0 = commuting)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from passes.observe import ObserverSpec, insert_observers, observers

from graphrepair import distributed
from graphrepair.io.examples import Examples
from graphrepair.io.checks import IGNORE_INDEX, LabelRule, check_labels, example_shapes, raise_if_other_shape
from graphrepair.errors import DataError
from graphrepair.merging.checks import check_same_architecture
from graphrepair.merging.merge import Prepared, check_alpha, merge_prepared, note_unregistered, prepare
from graphrepair.progress import progress
from graphrepair.models import eval_mode, forward_hooks, graph_for, user_models
from graphrepair.runtime import model_device, model_dtype


@user_models("model", state=False)
@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 512, quiet: bool = True) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a classifier on labeled data; outputs may be logits of
    shape (N, classes) or a ModelOutput/dict with ``logits``. The model runs in eval mode and is
    given back in the mode it was in. In a distributed run ``data`` is this rank's share (it may
    be empty) and the counts of every rank are added: every rank gets the same answer."""
    device = model_device(model)
    # correct, summed loss (per-example losses added in float64), examples: on the device, read
    # once at the end (no host copy per batch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    run = distributed.current() is not None
    with distributed.step("evaluating"), eval_mode(model):
        # in the step: a rank whose data fail says so to every rank
        local = Examples.of(data, None, batch_size, device=device, dtype=model_dtype(model), labels=True,
                            consistent=False, allow_empty=run, between=distributed.check if run else None)
        first = None  # the first batch's example shapes
        for t, batch in enumerate(progress(local, "evaluating", quiet=quiet)):
            y = batch.labels
            first = first or example_shapes(batch.inputs)
            try:
                out = batch.inputs.call(model)
            except Exception as exc:  # (not an interrupt)
                raise_if_other_shape(exc, f"batch {t} of {local.where}", batch.inputs, first)
                raise
            logits = out["logits"] if isinstance(out, dict) or hasattr(out, "logits") else out
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            check_labels(y, batch.inputs, LabelRule(logits.shape[-1], logits.dim() - 1), local.where)
            logits = logits.reshape(-1, logits.shape[-1]).float()
            y = y.reshape(-1).to(logits.device)
            kept = y != IGNORE_INDEX
            sums[0] += (logits.argmax(-1) == y)[kept].sum()
            sums[1] += F.cross_entropy(logits, y, reduction="none").sum(dtype=torch.float64)
            sums[2] += kept.sum()
    (sums,) = distributed.all_reduce_sum([sums], sums.device)
    correct, loss, n = (float(v) for v in sums.cpu())
    correct, n = int(round(correct)), int(round(n))
    if n == 0:
        raise DataError("the evaluation data has no examples")
    return correct / n, loss / n


def barrier_of(alphas: list[float], values: list[float], higher_is_better: bool = False) -> float:
    """Eq. (1) on a grid: the largest rise of ``values`` above the straight line between the ends
    (for accuracies, the largest drop below it)."""
    a0, a1 = values[0], values[-1]
    worst = 0.0
    for a, v in zip(alphas, values):
        line = (1 - a) * a0 + a * a1
        worst = max(worst, (line - v) if higher_is_better else (v - line))
    return worst


@dataclass
class Curve:
    label: str
    alphas: list[float]
    accuracy: list[float]
    loss: list[float]
    notes: list[str] = field(default_factory=list)
    # merges kept from the evaluation ({alpha: MergeResult}, see ``curve``'s ``keep_at``)
    merged: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def accuracy_barrier(self) -> float:
        return barrier_of(self.alphas, self.accuracy, higher_is_better=True)

    @property
    def loss_barrier(self) -> float:
        return barrier_of(self.alphas, self.loss)

    def at(self, alpha: float) -> tuple[float, float]:
        i = min(range(len(self.alphas)), key=lambda k: abs(self.alphas[k] - alpha))
        return self.accuracy[i], self.loss[i]

    def as_dict(self) -> dict:
        return {"label": self.label, "alphas": self.alphas, "accuracy": self.accuracy, "loss": self.loss,
                "accuracy_barrier": self.accuracy_barrier, "loss_barrier": self.loss_barrier,
                "notes": self.notes}


def alpha_grid(alphas) -> list[float]:
    if isinstance(alphas, int):
        if alphas < 2:
            raise DataError(f"a barrier needs at least 2 alphas (the two endpoints), got {alphas}")
        return [i / (alphas - 1) for i in range(alphas)]
    grid = [check_alpha(a) for a in alphas]
    if len(grid) < 2:
        raise DataError("a barrier needs at least two alphas")
    return sorted(grid)


def curve(prep: Prepared, eval_data, alphas, repair: str | None, label: str, quiet: bool = True,
          batch_size: int = 512, endpoints: tuple | None = None, keep_at: float | None = None,
          refit: int = 0) -> Curve:
    """Accuracy and loss of the interpolation (and repair) at every alpha, from one alignment.
    ``endpoints`` ((acc, loss) of A, (acc, loss) of B), when known from another curve of the same
    pair, spare the two endpoint evaluations (B and every permuted B' compute the same function).
    ``keep_at``: an inner alpha whose merge is kept in ``Curve.merged`` for later use. ``refit``:
    sweeps of the least-squares refit after the repair at every inner alpha."""
    grid = alpha_grid(alphas)
    acc, loss, notes, kept = [], [], set(), {}
    for a in grid:
        if endpoints is not None and a in (0.0, 1.0):
            ac, lo = endpoints[0] if a == 0.0 else endpoints[1]
        else:
            if a == 0.0:
                model = prep.models[0]
            else:
                inner = 0 < a < 1
                res = merge_prepared(prep, [1 - a, a], repair if inner else None, quiet=quiet,
                                     refit=refit if inner else 0)
                model = res.model
                notes.update(res.notes)
                if keep_at is not None and a == keep_at:
                    kept[a] = res
            ac, lo = evaluate(model, eval_data, batch_size, quiet=quiet)
        acc.append(ac)
        loss.append(lo)
    return Curve(label, grid, acc, loss, sorted(notes), kept)


@user_models("model_a", "model_b")
def barrier(model_a: nn.Module, model_b: nn.Module, *, eval_data, fit_data, alphas=11,
            repair: str | None = "exact", method: str = "activation", num_examples: int = 5000,
            batch_size: int = 256, quiet: bool = True, refit: int = 0) -> Curve:
    """The path A -> B' (B aligned to A, REPAIRed at every inner alpha): accuracy, loss, barriers.
    ``eval_data`` (labeled) is what the path is measured on, ``fit_data`` what the alignment and
    REPAIR statistics come from; both by name, so that the two cannot be swapped silently.
    ``refit``: sweeps of the least-squares refit after REPAIR at every inner alpha."""
    check_same_architecture(model_a, model_b)
    # the path's far end and every inner point hold model A's weights outside the state dicts
    note_unregistered([model_a, model_b], [0.0, 1.0])
    prep = prepare([model_a, model_b], fit_data, method=method,
                   statistics=repair in ("exact", "approx"), cross=repair == "approx",
                   num_examples=num_examples, batch_size=batch_size, quiet=quiet)
    label = (f"{method} + {repair}" if repair else method) + (" + refit" if refit else "")
    return curve(prep, eval_data, alphas, repair, label, quiet, refit=refit)


# -- variance collapse and LLFC -------------------------------------------------------------------

@torch.no_grad()
def _features(spec, state, points, keep: bool):
    """Observers at ``points`` ({node: axis}) on a graph carrying ``state``."""
    gm = graph_for(spec, state, None)
    info = spec.traced.info
    gm = insert_observers(gm, {n: ObserverSpec(dim=a, keep=keep, channels=info[n].shape[a])
                               for n, a in points.items()}, inplace=True).graph_module
    return gm, observers(gm)


@torch.no_grad()
def layer_report(prep: Prepared, merged: nn.Module | dict, alpha: float, quiet: bool = True) -> list[dict]:
    """Per reset point: variance-collapse ratio of ``merged``, its LLFC cosine and (for points
    produced by an nn.Linear/nn.Conv) the commutativity distance of A and B', measured in one pass
    over the fitting data with A, B' and the merged model side by side (distributed: every rank
    over its share, the sums added across ranks)."""
    spec = prep.spec
    pts = {r.node: r.axis for r in prep.points} or {r.node: r.axis for r in _default_points(spec)}
    device = model_device(prep.models[0])
    states = [prep.models[0].state_dict(), prep.aligned[0]]
    gms = []
    for st in states:
        gm, obs = _features(spec, st, pts, keep=True)
        gms.append((gm.to(device), obs))
    if isinstance(merged, torch.fx.GraphModule):
        raise DataError("layer_report needs a merged model of the original class (all resets folded); "
                        "measure it with repair=None or 'reset', or points='conv'")
    merged_state = merged.state_dict() if isinstance(merged, nn.Module) else merged
    gm_m, obs_m = _features(spec, merged_state, pts, keep=True)
    gm_m = gm_m.to(device)
    layers = _commuting_layers(prep, gms[0][0], gms[1][0])
    # float64 sums on the device, read once at the end (no host copy per batch)
    cos_sum = torch.zeros(len(pts), dtype=torch.float64, device=device)
    # per layer: ||W_A H_B' - W_B' H_A||^2, ||W_A H_A||^2 + ||W_B' H_B'||^2
    comm = torch.zeros(len(layers), 2, dtype=torch.float64, device=device)
    count = 0
    seen = {}  # (reset point, 0 for A / 1 for B') -> the layer's input in this batch

    def capture(key, inputs, _):
        seen[key] = inputs[0].detach()

    hooked = {(n, i): mod for n, mods in layers.items() for i, mod in enumerate(mods)}
    with distributed.step("the layer statistics"), forward_hooks(hooked, capture):
        for batch in progress(iter(prep.fit), "layer statistics", total=prep.fit.batches(), quiet=quiet):
            x = batch.inputs
            for gm, _ in gms:
                x.call(gm)
            x.call(gm_m)
            for i, n in enumerate(pts):
                fa, fb, fm = gms[0][1][n].last, gms[1][1][n].last, obs_m[n].last
                # per-example feature vectors: channel matrices are (C, N*rest); regroup by example
                lin = (1 - alpha) * fa + alpha * fb
                cos_sum[i] += _per_example_cos(fm, lin, batch.size).sum(dtype=torch.float64)
            for i, (n, (mod_a, mod_b)) in enumerate(layers.items()):
                h_a, h_b = seen[n, 0], seen[n, 1]
                cross = _weight_only(mod_a, h_b) - _weight_only(mod_b, h_a)
                comm[i, 0] += cross.double().square().sum()
                comm[i, 1] += (_weight_only(mod_a, h_a).double().square().sum()
                               + _weight_only(mod_b, h_b).double().square().sum())
            count += batch.size
    holders = [o[n] for o in (gms[0][1], gms[1][1], obs_m) for n in pts]
    cos_sum, comm, total = distributed.reduce_holders(
        holders, device, [cos_sum, comm, torch.tensor([float(count)], device=device)])
    count = int(round(float(total[0])))
    if count == 0:
        raise DataError("the fitting data has no examples")
    cos_sum, comm = cos_sum.tolist(), dict(zip(layers, comm.tolist()))
    out = []
    for i, n in enumerate(pts):
        va, vb, vm = gms[0][1][n].var.mean(), gms[1][1][n].var.mean(), obs_m[n].var.mean()
        row = {"node": n, "variance_ratio": float(vm / ((va + vb) / 2).clamp_min(1e-12)),
               "llfc_cosine": cos_sum[i] / count, "commutativity": None}
        if n in comm and comm[n][1] > 0:
            # relative to the mean norm of the two endpoints' own products
            row["commutativity"] = (comm[n][0] ** 0.5) / ((comm[n][1] / 2) ** 0.5)
        out.append(row)
    return out


def _weight_only(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """W h without the bias (LLFC's commutativity compares the weights' action)."""
    if isinstance(module, nn.Linear):
        return F.linear(h, module.weight)
    return module._conv_forward(h, module.weight, None)


def _commuting_layers(prep: Prepared, gm_a, gm_b) -> dict:
    """Reset point -> (layer in A's graph, layer in B''s graph) for reset points produced by an
    nn.Linear / nn.Conv module call (``layer_report`` captures their inputs with ``forward_hooks``)."""
    out = {}
    nodes = {n.name: n for n in gm_a.graph.nodes}
    for r in prep.points:
        node = nodes.get(r.producer)
        if node is None or node.op != "call_module":
            continue
        mod_a, mod_b = gm_a.get_submodule(node.target), gm_b.get_submodule(node.target)
        if not isinstance(mod_a, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(
                mod_a, nn.modules.conv._ConvTransposeNd):
            continue
        out[r.node] = (mod_a, mod_b)
    return out


def _per_example_cos(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Cosine per example between two (C, N*rest) channel matrices of one batch of n examples."""
    c = a.shape[0]
    a = a.reshape(c, n, -1).transpose(0, 1).reshape(n, -1)
    b = b.reshape(c, n, -1).transpose(0, 1).reshape(n, -1)
    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


def _default_points(spec):
    from graphrepair.merging.points import reset_points
    return reset_points(spec, "all")
