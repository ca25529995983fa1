"""Merge: align B to A, interpolate, REPAIR, fold — driven by the discovered spec alone.

Interpolation, with B' = B permuted onto A:      theta_a = (1 - a) theta_A + a theta_B'
(integer buffers such as BatchNorm's ``num_batches_tracked`` are taken from A).

REPAIR goal statistics at every reset point (channel c of a conv/linear output or of a residual
stream), from the one joint pass of A and B (``stats.py``), B's statistics permuted like B:

    goal_mean_c = (1 - a) mu_A,c + a mu_B',c          goal_std_c = (1 - a) sigma_A,c + a sigma_B',c

- "exact" (paper 4.2): reset nodes normalise the interpolated network's channel c to
  (goal_mean_c, goal_std_c); one pass of the merged net in "collect" mode (batch statistics,
  BatchNorm-style) estimates each reset's mean and variance; the resets then become per-channel
  affines folded into the producing conv/linear/BatchNorm. A reset divides by sqrt(var + eps) and
  multiplies by sqrt(goal_std^2 + eps), the same eps on both sides, so that a channel already at
  its goal (merging a model with a permuted copy of itself) is left exactly as it is.
- "approx" (paper 4.1, closed form; no pass through the merged net): the merged channel is
  predicted as X_a = (1 - a) X_A + a X_B', so

      mean = (1 - a) mu_A + a mu_B',   var = (1 - a)^2 Var(X_A) + a^2 Var(X_B') + 2 a (1 - a) Cov(X_A, X_B')

  and the resets use these as their running statistics.
- "reset": BatchNorm running statistics re-estimated on the merged net (Izmailov et al.).
- None: plain interpolation of the aligned models.

Merging k > 2 models: every model is aligned to the first, the weights are averaged with weights
w_i, and the goal statistics are the w-weighted averages of the aligned endpoints' statistics.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from passes.fold_affine import fold_affines
from passes.reset import ChannelAffine, Reset, ResetSpec, insert_resets, resets, set_mode

from graphrepair.merging.activation_match import activation_perms, paired_corr, tie_safe, unsignalled
from graphrepair.merging.checks import check_same_architecture
from graphrepair.merging.weight_match import WeightScores, weight_matching
from graphrepair.io.data import take_examples
from graphrepair.discovery.discover import discover
from graphrepair import distributed
from graphrepair.errors import CheckError, DataError, GraphRepairError
from graphrepair.merging.points import ResetPoint, observation_points, reset_points
from graphrepair.merging.refit import EXAMPLES as REFIT_EXAMPLES
from graphrepair.merging.refit import Refit, check_refit
from graphrepair.merging.refit import refit as refit_layers
from graphrepair.progress import progress
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.merging.stats import (PairStats, batch_key, calibrate, check_finite, collect, copy_with_state,
                                      graph_for)
from graphrepair.runtime import model_device, release

REPAIR_MODES = ("exact", "approx", "reset", None)
METHODS = ("activation", "weight")


@dataclass
class MergeResult:
    model: nn.Module
    spec: PermutationSpec
    perms: list[dict[str, torch.Tensor]]  # per model after the first: its permutation onto model 0
    weights: list[float]
    method: str
    repair: str | None
    examples: int = 0
    mean_corr: dict[str, float] = field(default_factory=dict)  # group -> mean matched correlation
    resets: int = 0
    folded: int = 0
    kept: list[str] = field(default_factory=list)  # "<node>: <why it could not be folded>"
    dead_channels: int = 0
    # activation matching: units matched without activation signal (dead or tied, see
    # activation_match.unsignalled), and those of them the weights did not decide either (arbitrary)
    unsignalled: int = 0
    arbitrary: int = 0
    notes: list[str] = field(default_factory=list)
    unfolded: nn.Module | None = None  # with keep_unfolded: the merged graph with its reset nodes
    goals: dict | None = None  # with keep_unfolded: reset node -> (goal mean, goal std)
    refit: Refit | None = None  # with refit > 0: the layers refit, those kept and the errors


class FitData:
    """Fitting data that can be read several times: re-iterable data is re-read, a one-shot
    iterator is read once and its batches kept (inputs only, on the models' device).

    In a distributed run (``graphrepair.distributed``) this is the rank's own share: it may be
    empty (no batch, ``num_examples`` 0), ``example()`` is the batch every rank traced with
    (``shared_example``), ``totals`` the examples used and asked for by all ranks together (set by
    the joint pass), and iterating checks between batches whether another rank has failed."""

    def __init__(self, data, num_examples: int, batch_size: int, device: torch.device):
        self.n, self.batch_size, self.device = num_examples, batch_size, device
        self.cached = None
        self.data = data
        self.count = None
        self.shared_example: torch.Tensor | None = None
        self.totals: tuple[int, int] | None = None
        self.empty = distributed.current() is not None and (num_examples == 0 or distributed.is_empty(data))
        if self.empty:
            self.cached, self.n, self.count = [], 0, 0
        elif isinstance(data, Iterator):
            self.cached = list(self._stream())

    def _stream(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stream = take_examples(self.data, self.n, self.batch_size, self.device)
            yield from stream
        self.count = stream.count
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=4)

    def __iter__(self):
        batches = iter(self.cached) if self.cached is not None else self._stream()
        return batches if distributed.current() is None else self._checked(batches)

    @staticmethod
    def _checked(batches):
        for x in batches:
            distributed.check()
            yield x

    def batches(self) -> int:
        return -(-self.n // self.batch_size)

    def example(self) -> torch.Tensor:
        """Two examples to trace with: the shared example in a distributed run, else the first
        batch's first two."""
        if self.shared_example is not None:
            return self.shared_example
        return next(iter(self))[:2]

    def local_example(self) -> torch.Tensor | None:
        return None if self.empty else next(iter(self))[:2]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1]: any real number (numpy scalars, 0-d tensors and arrays too)."""
    value = real_number(alpha, "alpha")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise GraphRepairError(f"alpha must be in [0, 1] (0 = model A, 1 = model B), got {value!r}")
    return value


def real_number(value, what: str) -> float:
    """``value`` as a float: a Python, numpy or 0-d tensor/array real number (not a bool)."""
    import numbers

    import numpy as np

    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
        raise GraphRepairError(f"{what} must be a real number, got a {type(value).__name__}{shape}: {value!r}")
    return float(value)


def check_weights(weights, n: int) -> list[float]:
    """``n`` finite, non-negative merge weights summing to 1."""
    import math

    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise GraphRepairError(f"weights must be a list of {n} numbers, got {weights!r}")
    values = [real_number(w, "each weight") for w in weights]
    if (len(values) != n or not all(math.isfinite(w) and w >= 0 for w in values)
            or abs(sum(values) - 1.0) > 1e-6):
        raise GraphRepairError(f"weights must be {n} finite, non-negative numbers summing to 1, got {values}")
    return values


def interpolate_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    out = {}
    for k, t0 in states[0].items():
        if t0.is_floating_point():
            acc = torch.zeros_like(t0, dtype=torch.float64)
            for s, w in zip(states, weights):
                acc += w * s[k].double()
            out[k] = acc.to(t0.dtype)
        else:
            out[k] = t0.clone()
    return out


def _permuted(stat: torch.Tensor, spec: PermutationSpec, node: str, axis: int, perms) -> torch.Tensor:
    """``perms``: group permutations, or ``spec.checked(perms)`` of them."""
    return stat[spec.node_index(node, axis, perms).to(stat.device)]


def align_pair(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, fit: FitData, *,
               method: str, resets: list[ResetPoint], cross_at_resets: bool, quiet: bool,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], PairStats | None, dict[str, float]]:
    """Permutations of B's groups onto A, and the pass statistics (None for weight matching
    without REPAIR statistics). Activation matching breaks its ties with the weights
    (``activation_perms``) and counts, per group, the units matched without activation signal and
    those the weights did not decide either (``activation_match.unsignalled``; ``PairStats.unsignalled``,
    ``PairStats.arbitrary``)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    stats = None
    scores = WeightScores(spec, sa, sb) if method == "activation" else None
    if method == "activation" or resets:
        observe = observation_points(spec) if method == "activation" else {}
        stats = collect(spec, model_a, model_b, fit, observe, resets, cross_at_resets=cross_at_resets,
                        quiet=quiet, total=fit.batches(), requested=fit.n, example=fit.example())
    perms = None
    with distributed.step("solving the assignments"):
        if distributed.is_reporting():  # one solver: rank 0 (see graphrepair.distributed)
            if method == "activation":
                perms = activation_perms(spec, stats, weights=scores)
                rest = [g.name for g in spec.groups if g.name not in perms]
                if rest:  # groups no activation reaches (fused attention internals): weight matching
                    perms = weight_matching(spec, sa, sb, groups=rest, init=perms, seed=seed)
            else:
                perms = weight_matching(spec, sa, sb, seed=seed)
    perms = distributed.broadcast_perms(perms, {g.name: g.size for g in spec.groups})
    mean_corr = {}
    if stats is not None:
        for g, c in stats.corr.items():
            if g in stats.coupled:
                c = paired_corr(spec, stats, g, perms)
            p = perms[g].to(c.device)
            mean_corr[g] = float(c[torch.arange(len(p), device=c.device), p].mean())
            if scores is not None:
                held = {h: q for h, q in perms.items() if h != g}
                n, arbitrary = unsignalled(tie_safe(c).cpu(), p.cpu(),
                                           lambda rows, cols: scores.cosine(g, held, rows, cols))
                if n:
                    stats.unsignalled[g], stats.arbitrary[g] = n, arbitrary
    return perms, stats, mean_corr


@dataclass
class Prepared:
    """Everything a merge needs that does not depend on alpha or the repair mode: the spec, the
    fitting data, the reset points, each model's permutation onto model 0 and the pass statistics.
    Computing it once lets a barrier curve reuse one alignment for every alpha."""

    models: list[nn.Module]
    spec: PermutationSpec
    fit: FitData
    method: str
    points: list[ResetPoint]
    perms: list[dict[str, torch.Tensor]]
    stats: list[PairStats | None]
    mean_corr: dict[str, float]
    aligned: list[dict[str, torch.Tensor]]  # state dicts, models 1.. permuted onto model 0 (or [])


def prepare(models: list[nn.Module], data, *, method: str = "activation", statistics: bool = True,
            cross: bool = False, num_examples: int = 5000, batch_size: int = 256, points: str = "all",
            spec: PermutationSpec | None = None, quiet: bool = True, seed: int = 0,
            align: bool = True, states: bool = True) -> Prepared:
    """Check, trace, discover, run the joint pass(es) and align. ``statistics``: gather REPAIR's
    endpoint statistics at the reset points (``cross``: also A-B cross-covariances, for 'approx').
    ``align=False`` keeps B as it is (the naive baseline). ``states=False``: only the
    permutations are wanted; the permuted copies of the models' weights (``Prepared.aligned``,
    what ``merge_prepared`` interpolates) are not made."""
    if len(models) < 2:
        raise GraphRepairError("merging needs at least two models")
    if method not in METHODS:
        raise GraphRepairError(f"method must be one of {METHODS}, got {method!r}")
    with distributed.step("checking the models and the fitting data"):
        for m in models[1:]:
            check_same_architecture(models[0], m)
        for i, m in enumerate(models):
            check_finite(m.state_dict(), f"model {'AB'[i] if len(models) == 2 else i}")
        device = model_device(models[0])
        # the caller's models are read, never changed: one on another device is copied to model 0's,
        # and each pass puts them in eval mode only while it runs (``runtime.eval_mode``)
        models = [m if model_device(m) == device else copy_with_state(m, m.state_dict(), device=device)
                  for m in models]
        fit = FitData(data, num_examples, batch_size, device)
        example = fit.local_example() if distributed.current() is not None else None
    if distributed.current() is not None:  # the same models everywhere; one example to trace with
        example = distributed.agree_on_start([m.state_dict() for m in models], example)
        if example is None:
            raise DataError("the fitting data has no examples on any rank")
        fit.shared_example = example.to(device)
    with distributed.step("tracing the model and discovering its permutation groups"):
        if spec is None:
            spec = discover(models[0], (fit.example(),))
        rpoints = reset_points(spec, points) if statistics else []
    perms_all, stats_all, corr = [], [], {}
    for m in models[1:]:
        if align:
            perms, stats, mean_corr = align_pair(spec, models[0], m, fit, method=method, resets=rpoints,
                                                 cross_at_resets=cross, quiet=quiet, seed=seed)
        else:
            perms = spec.identity_permutations()
            stats = collect(spec, models[0], m, fit, {}, rpoints, cross_at_resets=cross, quiet=quiet,
                            total=fit.batches(), requested=fit.n, example=fit.example()) if rpoints else None
            mean_corr = {}
        perms_all.append(perms)
        stats_all.append(stats)
        corr = corr or mean_corr
    aligned = []
    with distributed.step("proving the permutations on a batch of the fitting data"):
        for i, (m, p) in enumerate(zip(models[1:], perms_all)):
            sd = m.state_dict()
            permuted = spec.permute_state_dict(sd, p)
            if align:
                prove_permutations(spec, m, permuted, p, fit.example(), f"model {'B' if len(models) == 2 else i + 1}")
            if states:
                # entries with no permuted axis come back as the model's own tensors: copy them, so
                # that changing the model later cannot change what this preparation merges
                aligned.append({k: v.clone() if v is sd[k] else v for k, v in permuted.items()})
    return Prepared(models, spec, fit, method, rpoints, perms_all, stats_all, corr, aligned)


def prove_permutations(spec: PermutationSpec, model: nn.Module, permuted_state: dict, perms: dict,
                       example: torch.Tensor, who: str) -> float:
    """Before anything is interpolated: the model with the permutations found must compute what the
    model computes, on one batch of the fitting data (a rule bug would otherwise become a silently
    broken merged model). One more forward of the model and of its permuted copy (which shares the
    unpermuted tensors); CheckError naming the group otherwise."""
    if all(bool((q == torch.arange(q.numel(), device=q.device)).all()) for q in perms.values()):
        return 0.0  # nothing moves
    permuted = copy_with_state(model, permuted_state, own=True)  # shares the tensors, copies none
    try:
        return spec.prove(model, permuted, (example,), perms)
    except CheckError as e:
        raise CheckError(f"the permutations aligning {who} break its function: {e}") from e
    finally:
        release(permuted)  # a copy of a GraphModule is a cycle (see runtime.release)


def merge_prepared(prep: Prepared, weights: list[float], repair: str | None,
                   quiet: bool = True, keep_unfolded: bool = False, refit: int = 0,
                   refit_examples: int | None = REFIT_EXAMPLES) -> MergeResult:
    """Interpolate the aligned models with ``weights`` and apply ``repair``, then ``refit``
    sweeps of the layerwise least-squares refit (``merging.refit``) on the first
    ``refit_examples`` fitting examples (None: all)."""
    models = prep.models
    weights = check_weights(weights, len(models))
    check_refit(refit, refit_examples)
    if repair not in REPAIR_MODES:
        raise GraphRepairError(f"repair must be one of {REPAIR_MODES}, got {repair!r}")
    if len(prep.aligned) != len(models) - 1:
        raise GraphRepairError("this preparation has no permuted weights to merge: prepare(..., states=True)")
    if repair == "approx" and len(models) > 2:
        raise GraphRepairError("the closed-form REPAIR ('approx') merges two models; use 'exact' for more")
    if repair in ("exact", "approx") and not prep.spec.groups:
        raise GraphRepairError(f"no permutation groups in {prep.spec.model_name}: no hidden channel may move, so "
                               f"there is nothing to repair; spec.fixed (discover(model, x).fixed) says why each "
                               f"axis is kept fixed")
    if repair in ("exact", "approx") and (not prep.points or prep.stats[0] is None):
        raise GraphRepairError(f"repair={repair!r} needs the endpoint statistics: prepare(..., statistics=True)")
    if repair == "approx" and prep.stats[0].points and next(iter(prep.stats[0].points.values())).cov_ab is None:
        raise GraphRepairError("repair='approx' needs A-B cross-covariances: prepare(..., cross=True)")
    # a convex combination of finite weights (every model was checked in prepare) is finite
    merged_state = interpolate_states([models[0].state_dict()] + prep.aligned, weights)
    result = MergeResult(model=None, spec=prep.spec, perms=prep.perms, weights=weights,
                         method=prep.method, repair=repair, mean_corr=prep.mean_corr)
    if prep.stats and prep.stats[0] is not None:
        result.examples = prep.stats[0].examples
        result.dead_channels = sum(prep.stats[0].dead.values())
        if result.dead_channels:
            result.notes.append(f"{result.dead_channels} dead units (zero variance in model A at every "
                                f"matching point, e.g. ReLUs that never fire): their activations cannot place them")
        result.unsignalled = sum(prep.stats[0].unsignalled.values())
        result.arbitrary = sum(prep.stats[0].arbitrary.values())
        if result.unsignalled:
            result.notes.append(f"{result.unsignalled} units matched without activation signal (dead, or "
                                f"tied with another unit): the weights placed {result.unsignalled - result.arbitrary}, "
                                f"{result.arbitrary} had no weight signal either and are matched arbitrarily")
        result.notes.extend(prep.stats[0].notes)
    fit = prep.fit
    stats0 = prep.stats[0] if prep.stats else None
    if distributed.current() is not None:  # every rank's examples together
        used, asked = (stats0.examples, stats0.requested) if stats0 is not None else (None, None)
    else:
        used, asked = fit.count, fit.n
    if used is not None and used < asked:
        result.notes.append(f"used {used} examples (fewer than the {asked} requested)")
    if repair in ("exact", "approx"):
        goals = goal_statistics(prep.spec, prep.points, prep.stats, prep.perms, weights)
        running = (closed_form_statistics(prep.spec, prep.points, prep.stats[0], prep.perms[0], weights[1])
                   if repair == "approx" else None)
        per_batch = ((batch_goals(prep.spec, prep.points, prep.stats, prep.perms, weights), prep.stats[0].batch_keys)
                     if running is None else None)
        done = repair_merged(prep.spec, models[0], merged_state, goals, prep.points, fit=fit, running=running,
                             quiet=quiet, keep_unfolded=keep_unfolded, per_batch=per_batch)
        result.model, result.resets, result.folded, result.kept = done.model, done.resets, done.folded, done.kept
        if keep_unfolded:  # the resets as nodes, for checking the fold
            result.unfolded = done.unfolded
            result.goals = {k: (m.detach(), sd.detach()) for k, (m, sd) in goals.items()}
    else:
        model = copy_with_state(models[0], merged_state, own=True)
        if repair == "reset":
            n = reset_batchnorm_stats(model, fit, quiet)
            if n == 0:
                result.notes.append("the model has no BatchNorm: 'reset' changes nothing")
        result.model = model.eval()
    if refit:
        endpoints = [models[0]] + [copy_with_state(models[0], st) for st in prep.aligned]
        result.refit = refit_layers(result.model, endpoints, weights, fit, refit, examples=refit_examples)
        if result.refit.kept:
            result.notes.append(f"refit: {len(result.refit.kept)} layers kept as they were, e.g. "
                                f"{next(iter(result.refit.kept))}: {next(iter(result.refit.kept.values()))}")
    return result


def merge_models(models: list[nn.Module], data, *, weights: list[float] | None = None,
                 method: str = "activation", repair: str | None = "exact", num_examples: int = 5000,
                 batch_size: int = 256, points: str = "all", spec: PermutationSpec | None = None,
                 quiet: bool = True, seed: int = 0, refit: int = 0,
                 refit_examples: int | None = REFIT_EXAMPLES) -> MergeResult:
    """Align every model to ``models[0]``, average with ``weights``, REPAIR, fold, and ``refit``
    sweeps of the layerwise least-squares refit."""
    weights = [1.0 / len(models)] * len(models) if weights is None else check_weights(weights, len(models))
    check_refit(refit, refit_examples)
    if repair not in REPAIR_MODES:
        raise GraphRepairError(f"repair must be one of {REPAIR_MODES}, got {repair!r}")
    prep = prepare(models, data, method=method, statistics=repair in ("exact", "approx"),
                   cross=repair == "approx", num_examples=num_examples, batch_size=batch_size,
                   points=points, spec=spec, quiet=quiet, seed=seed)
    for st in prep.stats:  # the correlations served alignment (a ViT-B's take 0.9 GB); not the merge
        if st is not None:
            st.corr.clear()
            st.joint.clear()
            st.coupled.clear()
            st.wreath.clear()
    return merge_prepared(prep, weights, repair, quiet, refit=refit, refit_examples=refit_examples)


RESET_EPS = 1e-5  # the resets' variance epsilon, as BatchNorm's


def _normaliser_std(goal_std: torch.Tensor, eps: float = RESET_EPS) -> torch.Tensor:
    """The std a reset multiplies by, sqrt(goal_std^2 + eps): a reset divides by
    sqrt(var + eps), so multiplying by the goal std itself would scale every channel by
    sqrt(var / (var + eps)) on top of REPAIR's correction: 0.3 for a channel of variance 1e-6, so
    that merging a model with a permuted copy of itself changed its output. With the same eps
    on both sides, a merged channel whose statistics already are the goal's (identical endpoints)
    is left exactly as it is, large channels are rescaled to the goal as before (the output
    variance misses goal_std^2 by less than eps), and channels of variance far below eps keep
    their variance instead of being shrunk further."""
    return (goal_std.double().square() + eps).sqrt()


def goal_statistics(spec: PermutationSpec, points: list[ResetPoint], stats_all: list[PairStats],
                    perms_all: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, tuple]:
    """Goal (mean, std) per reset point: the weighted average of the aligned endpoints' statistics
    (``stats_all[i]``: model 0 and model i + 1; ``perms_all[i]``: model i + 1 onto model 0)."""
    perms_all = [spec.checked(p) for p in perms_all]  # validated once, not per point
    return {r.node: _interpolated(spec, r, (stats_all[0].points[r.node].mean_a, stats_all[0].points[r.node].var_a),
                                  [(st.points[r.node].mean_b, st.points[r.node].var_b) for st in stats_all],
                                  perms_all, weights)
            for r in points}


def _interpolated(spec: PermutationSpec, r: ResetPoint, a: tuple, others: list[tuple], perms_all: list,
                  weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) at reset point ``r``: the ``weights``-average of model 0's (mean, var) ``a`` and
    the other models' ``others``, each permuted onto model 0 (``perms_all``, checked)."""
    mean, std = weights[0] * a[0], weights[0] * a[1].sqrt()
    for w, (m, v), p in zip(weights[1:], others, perms_all):
        mean = mean + w * _permuted(m, spec, r.node, r.axis, p)
        std = std + w * _permuted(v, spec, r.node, r.axis, p).sqrt()
    return mean, std


def batch_goals(spec: PermutationSpec, points: list[ResetPoint], stats_all: list[PairStats],
                perms_all: list[dict[str, torch.Tensor]], weights: list[float]) -> list[dict[str, tuple]]:
    """Per batch of this process's joint pass, the goal of that batch at every reset point: the
    weighted average of the aligned endpoints' mean and standard deviation over that batch alone.

    Why. While exact REPAIR collects the merged model's statistics, every reset normalises each
    batch by the batch's own statistics (as the paper's BatchNorm does in training mode). Giving
    every batch the global goal takes away the spread between batches that the finished model
    will have, so the layers after it measure too little variance and over-correct: a model
    merged with a permuted copy of itself came back changed by up to 2% over 3 batches of 16. With
    each batch given the endpoints' own moments of that batch, identical endpoints pass through
    every reset unchanged (the merged model's batch is the endpoints' batch), and in general each
    batch keeps its natural deviation from the global goal. The statistics collected, and so the
    final correction, are the same kind as before: the merged model's over all batches, normalised
    to the global goal. [] when the statistics hold no per-batch moments (closed form, an older
    preparation) or the passes disagree in their number of batches."""
    counts = {len(st.points[r.node].batches) for st in stats_all for r in points}
    if not points or len(counts) != 1 or 0 in counts:
        return []
    perms_all = [spec.checked(p) for p in perms_all]
    out = []
    for t in range(counts.pop()):
        goals = {}
        for r in points:
            mean, std = _interpolated(spec, r, stats_all[0].points[r.node].batches[t][:2],
                                      [st.points[r.node].batches[t][2:] for st in stats_all], perms_all, weights)
            goals[r.node] = (mean.float(), _normaliser_std(std).float())
        out.append(goals)
    return out


def closed_form_statistics(spec: PermutationSpec, points: list[ResetPoint], stats: PairStats,
                           perms: dict[str, torch.Tensor], alpha: float) -> dict[str, tuple]:
    """(mean, var) per reset point of the interpolated channel X_a = (1 - a) X_A + a X_B' as the
    closed form predicts it from the A-B statistics alone (see the module doc)."""
    out = {}
    for r in points:
        s = stats.points[r.node]
        idx = spec.node_index(r.node, r.axis, perms).to(s.mean_a.device)
        mean_b, var_b = s.mean_b[idx], s.var_b[idx]
        cov = s.cov_ab[torch.arange(len(idx), device=idx.device), idx]
        mean = (1 - alpha) * s.mean_a + alpha * mean_b
        var = ((1 - alpha) ** 2 * s.var_a + alpha ** 2 * var_b
               + 2 * alpha * (1 - alpha) * cov).clamp_min(0.0)
        out[r.node] = (mean, var)
    return out


@dataclass
class Repaired:
    """What the REPAIR step made: the merged model (the user's class when every reset folded),
    how many resets there were, how many folded, why the others could not be."""

    model: nn.Module
    resets: int
    folded: int
    kept: list[str]
    unfolded: nn.Module | None = None  # with keep_unfolded: the graph with its reset nodes


def repair_merged(spec: PermutationSpec, model_a: nn.Module, merged_state: dict[str, torch.Tensor],
                  goals: dict[str, tuple], points: list[ResetPoint], *, fit: FitData,
                  running: dict[str, tuple] | None = None, quiet: bool = True,
                  keep_unfolded: bool = False, per_batch: tuple[list, list] | None = None) -> Repaired:
    """REPAIR the interpolated weights ``merged_state``: a reset after every point, normalising it
    to its ``goals`` (mean, std); the resets' statistics are ``running`` (mean, var) per point
    when given (the closed form), else estimated in one pass of the merged graph over ``fit``
    (exact REPAIR); then every reset is folded into its producer where it can be. ``per_batch``:
    (``batch_goals``, the joint pass's ``batch_key`` of each batch): during the pass each batch
    whose key matches is normalised to its own goal (``Reset.set_batch_goal``), the others to the
    global goal."""
    device = model_device(model_a)
    gm = graph_for(spec, merged_state, device, own=True)
    insert_resets(gm, {r.node: ResetSpec(r.axis, goals[r.node][0].float(),
                                         _normaliser_std(goals[r.node][1]).float(), RESET_EPS)
                       for r in points}, inplace=True)
    if running is None:
        set_mode(gm, "collect")
        with torch.no_grad():  # the resets' shifts from the example every rank shares
            calibrate(gm, resets(gm).values(), fit.example())
        with distributed.step("the REPAIR pass of the merged model"), torch.no_grad():
            found = resets(gm)
            goals_t, keys = per_batch if per_batch is not None else ([], [])
            for t, x in enumerate(progress(iter(fit), "REPAIR statistics of the merged model",
                                           total=fit.batches(), quiet=quiet)):
                mine = goals_t[t] if t < len(goals_t) and t < len(keys) and batch_key(x) == keys[t] else None
                for node, reset in found.items():
                    reset.set_batch_goal(*(mine[node] if mine is not None else (None,)))
                gm(x)
            for reset in found.values():
                reset.set_batch_goal(None)
        # every rank's sums, added: one collective (graph order, the same on every rank)
        distributed.reduce_holders(list(resets(gm).values()), device)
    else:
        found = resets(gm)
        for node, (mean, var) in running.items():
            found[node].set_running(mean.float(), var.float())
    set_mode(gm, "apply")
    unfolded = copy.deepcopy(gm) if keep_unfolded else None
    # exact: every reset saw data and knows its input's rank; closed form (and a distributed rank,
    # which may have seen no batch): shapes from one example
    example = running is not None or distributed.current() is not None
    folded = fold_affines(gm, inplace=True, example_inputs=(fit.example(),) if example else None)
    return Repaired(finalize(gm, model_a, merged_state, spec.traced.graph_own), len(points),
                    folded.counts.get("folded", 0),
                    list(folded.notes), unfolded)


def finalize(gm, model_a: nn.Module, merged_state: dict, graph_own=frozenset()) -> nn.Module:
    """The user's own model class when every reset was folded into existing parameters, else the
    GraphModule (with one ChannelAffine per unfoldable reset). ``graph_own``: the graph's own
    tensors (``Traced.graph_own``), which the user's model holds elsewhere or not at all."""
    gsd = {k: v for k, v in gm.state_dict().items() if k not in graph_own}
    leftovers = any(isinstance(m, (Reset, ChannelAffine)) for m in gm.modules())
    if not leftovers and set(gsd) <= set(merged_state):
        return copy_with_state(model_a, {**merged_state, **gsd}, own=True).eval()
    return gm.eval()


@torch.no_grad()
def reset_batchnorm_stats(model: nn.Module, fit, quiet: bool = True) -> int:
    """Re-estimate every BatchNorm's running statistics on ``fit`` (cumulative average over the
    batches, one pass). Distributed: the average over every rank's batches, from the sums
    k_r * average_r and the batch counts k_r added across ranks."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with distributed.step("re-estimating the BatchNorm statistics"):
        for x in progress(iter(fit), "BatchNorm statistics of the merged model", quiet=quiet):
            model(x)
    if distributed.current() is not None:
        parts = []
        for bn in bns:
            k = bn.num_batches_tracked.double()
            parts += [k * bn.running_mean.double(), k * bn.running_var.double(), k.reshape(1)]
        sums = distributed.all_reduce_sum(parts, bns[0].running_mean.device)
        for i, bn in enumerate(bns):
            wmean, wvar, k = sums[3 * i:3 * i + 3]
            if float(k) > 0:
                bn.running_mean.copy_(wmean / k)
                bn.running_var.copy_(wvar / k)
            bn.num_batches_tracked.fill_(int(round(float(k))))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.eval()
    return len(bns)


# -- the public forms ---------------------------------------------------------------------------

def merge(model_a: nn.Module, model_b: nn.Module, data, alpha: float = 0.5, method: str = "activation",
          repair: str | None = "exact", num_examples: int = 5000, points: str = "all",
          batch_size: int = 256, spec: PermutationSpec | None = None, quiet: bool = True,
          refit: int = 0, refit_examples: int | None = REFIT_EXAMPLES) -> nn.Module:
    """Merge two models of one architecture (see the module docstring); returns the merged model.
    ``refit``: sweeps of the layerwise least-squares refit after ``repair`` (``merging.refit``) on
    the first ``refit_examples`` fitting examples."""
    alpha = check_alpha(alpha)
    return merge_models([model_a, model_b], data, weights=[1 - alpha, alpha], method=method,
                        repair=repair, num_examples=num_examples, batch_size=batch_size, points=points,
                        spec=spec, quiet=quiet, refit=refit, refit_examples=refit_examples).model


def align(model_a: nn.Module, model_b: nn.Module, data=None, spec: PermutationSpec | None = None,
          method: str = "activation", num_examples: int = 5000, batch_size: int = 256,
          example_inputs=None, quiet: bool = True) -> dict[str, torch.Tensor]:
    """Permutations {group: P} such that ``permute(model_b, spec, P)`` lines up with model_a.
    ``data`` is needed for activation matching; weight matching needs only ``example_inputs``
    (or data) to trace the model when no spec is given."""
    if method not in METHODS:
        raise GraphRepairError(f"method must be one of {METHODS}, got {method!r}")
    check_same_architecture(model_a, model_b)
    if method == "weight" and (spec is not None or example_inputs is not None):
        return weight_matching(spec or discover(model_a, example_inputs), model_a.state_dict(),
                               model_b.state_dict())
    if data is None:
        raise GraphRepairError("weight matching needs example_inputs (or data) to trace the model" if method == "weight"
                               else "activation matching needs data; pass data or use method='weight'")
    # with data, ``prepare`` checks it, agrees on one example across the ranks of a process group
    # (a rank may have no batch), traces, and proves the permutations before returning them
    return prepare([model_a, model_b], data, method=method, statistics=False, states=False,
                   num_examples=num_examples, batch_size=batch_size, spec=spec, quiet=quiet).perms[0]
