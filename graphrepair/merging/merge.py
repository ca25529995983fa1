"""Merge: align B to A, interpolate, REPAIR, fold — driven by the discovered spec alone.

Interpolation, with B' = B permuted onto A:      theta_a = (1 - a) theta_A + a theta_B'
(integer buffers such as BatchNorm's ``num_batches_tracked`` are taken from A).

The steps live in their own modules: ``prepare`` (check, trace, discover, the joint pass, align,
prove), ``repair`` (REPAIR's goal statistics, resets, pass and fold), ``refit`` (the layerwise
least-squares refit). This module holds the public forms and the interpolation between them.

Merging k > 2 models: every model is aligned to the first, the weights are averaged with weights
w_i, and the goal statistics are the w-weighted averages of the aligned endpoints' statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from graphrepair import distributed
from graphrepair.discovery.discover import discover
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import DataError, GraphRepairError, GraphRepairWarning, listed
from graphrepair.merging.checks import check_same_architecture
from graphrepair.merging.diagnostics import check_statistics
from graphrepair.merging.weight_match import weight_matching
from graphrepair.merging.prepare import METHODS, Prepared, prepare
from graphrepair.merging.points import reset_points
from graphrepair.merging.refit import EXAMPLES as REFIT_EXAMPLES
from graphrepair.merging.refit import Refit, check_refit
from graphrepair.merging.refit import refit as refit_layers
from graphrepair.merging.repair import (OUTPUTS, REPAIR_MODES, SCALE_ONLY, batch_goals, closed_form_statistics, goal_statistics,
                                       repair_merged, reset_batchnorm_stats)
from graphrepair.models import MODULE_TABLES, copy_with_state, given_back, user_models


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
    # output="class": reset point -> what was done instead of a fold (scale only, left out and why)
    treated: dict[str, str] = field(default_factory=dict)
    output: str = "class"
    dead_channels: int = 0
    # activation matching: units matched without activation signal (dead or tied, see
    # activation_match.unsignalled), and those of them the weights did not decide either (arbitrary)
    unsignalled: int = 0
    arbitrary: int = 0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the data may not support (diagnostics.check_statistics)
    unfolded: nn.Module | None = None  # with keep_unfolded: the merged graph with its reset nodes
    goals: dict | None = None  # with keep_unfolded: reset node -> (goal mean, goal std)
    refit: Refit | None = None  # with refit > 0: the layers refit, those kept and the errors

    def as_dict(self) -> dict:
        """The merge's report as plain data (what ``graphrepair merge --json`` prints of it)."""
        from graphrepair.merging.diagnostics import corr_summary

        return {
            "method": self.method, "repair": self.repair, "examples": self.examples,
            "groups": len(self.spec.groups), "free_channels": self.spec.num_free,
            "group_sizes": {g.name: g.size for g in self.spec.groups},
            "mean_corr": self.mean_corr, "mean_corr_summary": corr_summary(self.mean_corr),
            "resets": self.resets, "folded": self.folded, "kept": self.kept, "treated": self.treated,
            "output": self.output, "dead_channels": self.dead_channels,
            "unsignalled": self.unsignalled, "arbitrary": self.arbitrary,
            "refit": None if self.refit is None else {"sweeps": self.refit.sweeps, "examples": self.refit.examples,
                                                      "layers": len(self.refit.layers), "kept": self.refit.kept},
            "merged_class": type(self.model).__name__, "interpolation_weights": self.weights,
            "notes": self.notes, "warnings": self.warnings,
        }


def check_alpha(alpha: float, option: str | None = None) -> float:
    """``alpha`` as a float in [0, 1]: any real number (numpy scalars, 0-d tensors and arrays too).
    ``option``: the command-line option it came from (``--alpha``): then a bad value is a
    DataError led by the option and the value, as every option's is."""
    value = real_number(alpha, option or "alpha")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        if option is not None:
            raise DataError(f"{option} {value!r}: must be in [0, 1] (0 = model A, 1 = model B)")
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


# A floating tensor of more than this many elements is interpolated in float64 blocks of this
# many (1 MB of float64): a block of each model's weights and their sum stay in the cache, where
# whole float64 copies of a large tensor would each be written to memory and read back (a
# 156M-parameter LLaMA pair: 1.2 - 3.1 s -> 0.4 s). Smaller ones are summed whole (packing them
# into blocks costs more than it saves: the paper MLP's 42 tensors, 1.7 -> 2.1 ms).
_BLOCK = 1 << 17


def interpolate_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    """sum_i weights[i] states[i][k] for every floating tensor k of ``states[0]``, summed in
    float64 in the models' order and cast back to ``states[0][k]``'s dtype (a fresh tensor per
    key, laid out as ``states[0][k]``); other tensors (integer buffers) are ``states[0]``'s,
    copied. The inputs are not changed."""
    out = {}
    for k, t0 in states[0].items():
        if not t0.is_floating_point():
            out[k] = t0.clone()
        elif t0.numel() > _BLOCK and t0.is_contiguous():
            dst = torch.empty_like(t0).view(-1)
            srcs = [s[k].reshape(-1) for s in states]
            for i in range(0, t0.numel(), _BLOCK):
                dst[i:i + _BLOCK].copy_(_combine([src[i:i + _BLOCK] for src in srcs], weights))
            out[k] = dst.view(t0.shape)
        else:  # (laid out as ``t0``: the float64 sum takes its strides, and the cast keeps them)
            out[k] = _combine([s[k] for s in states], weights).to(t0.dtype)
    return out


def _note_kept(first: dict[str, torch.Tensor], others: list[dict[str, torch.Tensor]], weights: list[float]) -> None:
    """A warning naming the integer and bool tensors (other than BatchNorm's batch counters) whose
    values differ between the models given weight: the merged model holds model A's, which no
    average can replace (an index, a mask, a step count)."""
    differ = [k for k, t in first.items() if not t.is_floating_point() and not k.endswith("num_batches_tracked")
              and any(w > 0 and not torch.equal(s[k], t) for s, w in zip(others, weights[1:]))]
    if differ:
        warnings.warn(f"integer and bool tensors cannot be averaged: the merged model holds model A's "
                      f"{listed(repr(k) for k in differ)}, "
                      f"which differ{'s' if len(differ) == 1 else ''} in the other model"
                      f"{'s' if len(others) > 1 else ''}", GraphRepairWarning, stacklevel=2)


def note_unregistered(models: list[nn.Module], weights: list[float], stacklevel: int = 4) -> None:
    """A warning naming the weights model A holds outside its state dict (modules or parameters
    in a plain list or dict) that differ in another model given weight: no merge reads them, and
    the merged model, a copy of A, holds A's."""
    differ = []
    for path, m in models[0].named_modules():
        for k, v in vars(m).items():
            if k in MODULE_TABLES or not _holds_weights(v):
                continue
            for other, w in zip(models[1:], weights[1:]):
                try:
                    theirs = vars(other.get_submodule(path)).get(k)
                except AttributeError:
                    theirs = None
                if w > 0 and not _same_weights(v, theirs):
                    where = f"attribute {k!r} of module {path!r}" if path else f"attribute {k!r} of the {type(models[0]).__name__}"
                    differ.append(where)
                    break
    if differ:
        warnings.warn(f"model A holds weights in no state dict ({listed(differ)}: modules or parameters in a plain "
                      f"list or dict), which differ in the other model: no merge reads them, and the merged "
                      f"model holds model A's; register them (nn.ModuleList, nn.ModuleDict, nn.ParameterList) "
                      f"to merge them", GraphRepairWarning, stacklevel=stacklevel)


def _holds_weights(v) -> bool:
    """Whether an attribute value is a plain list, tuple or dict holding modules or parameters
    (a tensor kept as an attribute may be an activation a forward left: not named)."""
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return any(isinstance(i, (nn.Module, nn.Parameter)) for i in items)


def _same_weights(a, b) -> bool:
    """Whether two attribute values hold the same tensors (modules by their state dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu())
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        if not (isinstance(a, nn.Module) and isinstance(b, nn.Module)):
            return False
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(_same_weights(sa[k], sb[k]) for k in sa)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_weights(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_weights(x, y) for x, y in zip(a, b))
    return True  # (anything else is not weights)


def _combine(pieces: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] pieces[i] in float64, a fresh tensor laid out as ``pieces[0]`` (``to``
    keeps a dense tensor's strides): each term rounded, then added in order to a zero (+ 0.0
    makes a -0.0 first term +0.0)."""
    acc = pieces[0].to(torch.float64, copy=True).mul_(weights[0]).add_(0.0)
    for piece, w in zip(pieces[1:], weights[1:]):
        acc.add_(piece.to(torch.float64, copy=True).mul_(w))
    return acc


def merge_prepared(prep: Prepared, weights: list[float], repair: str | None,
                   quiet: bool = True, keep_unfolded: bool = False, refit: int = 0,
                   refit_examples: int | None = REFIT_EXAMPLES, output: str = "class") -> MergeResult:
    """Interpolate the aligned models with ``weights`` and apply ``repair``, then ``refit``
    sweeps of the layerwise least-squares refit (``merging.refit``) on the first
    ``refit_examples`` fitting examples (None: all). ``output``: "class" (the user's class, REPAIR
    limited to the corrections it can hold) or "graph" (a GraphModule where a correction does not
    fold); see ``merging.repair``. The prepared (caller's) models come back as they were
    (``models.given_back``); the merged model's tensors are ordinary ones even where the caller
    is in ``torch.inference_mode`` (as with every entry point, ``models.user_models``)."""
    with torch.inference_mode(False), given_back(*prep.models):
        return _merge_prepared(prep, weights, repair, quiet, keep_unfolded, refit, refit_examples, output)


def check_output(output) -> str:
    if output not in OUTPUTS:
        raise GraphRepairError(f"output must be one of {OUTPUTS}, got {output!r}")
    return output


def _merge_prepared(prep: Prepared, weights: list[float], repair: str | None, quiet: bool,
                    keep_unfolded: bool, refit: int, refit_examples: int | None, output: str) -> MergeResult:
    models = prep.models
    weights = check_weights(weights, len(models))
    check_refit(refit, refit_examples)
    check_output(output)
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
    if repair in ("exact", "approx") and not prep.points and not reset_points(prep.spec):
        raise GraphRepairError(
            f"nothing to repair in {prep.spec.model_name}: REPAIR resets the outputs of linear and conv "
            f"layers (nn.Linear, nn.Conv*, F.linear, F.conv*, x @ weight) and of residual adds whose channels "
            f"move, and none of its groups has one (its layers are other ops, e.g. einsum); merge with "
            f"repair=None (--repair none), or write its layers with F.linear")
    if repair in ("exact", "approx") and (not prep.points or prep.stats[0] is None):
        raise GraphRepairError(f"repair={repair!r} needs the endpoint statistics: prepare(..., statistics=True)")
    if repair == "approx" and prep.stats[0].points and next(iter(prep.stats[0].points.values())).cov_ab is None:
        raise GraphRepairError("repair='approx' needs A-B cross-covariances: prepare(..., cross=True)")
    # a convex combination of finite weights (every model was checked in prepare) is finite
    first = models[0].state_dict()
    merged_state = interpolate_states([first] + prep.aligned, weights)
    _note_kept(first, prep.aligned, weights)
    result = MergeResult(model=None, spec=prep.spec, perms=prep.perms, weights=weights,
                         method=prep.method, repair=repair, mean_corr=prep.mean_corr, output=output)
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
        if result.examples:  # all-dead data: DataError; fewer examples than the widest group: a warning
            result.warnings = check_statistics(result.dead_channels, prep.spec, prep.fit.where, result.examples)
    fit = prep.fit
    stats0 = prep.stats[0] if prep.stats else None
    if distributed.current() is not None:  # every rank's examples together
        used, asked = (stats0.examples, stats0.requested) if stats0 is not None else (None, None)
    else:
        used, asked = fit.count, fit.n
    if used is not None and asked is not None and used < asked:
        result.notes.append(f"used {used} examples (fewer than the {asked} requested)")
    if repair in ("exact", "approx"):
        goals = goal_statistics(prep.spec, prep.points, prep.stats, prep.perms, weights)
        running = (closed_form_statistics(prep.spec, prep.points, prep.stats[0], prep.perms[0], weights[1])
                   if repair == "approx" else None)
        per_batch = batch_goals(prep.spec, prep.points, prep.stats, prep.perms, weights) if running is None else None
        done = repair_merged(prep.spec, models[0], merged_state, goals, prep.points, fit=fit, running=running,
                             quiet=quiet, keep_unfolded=keep_unfolded, per_batch=per_batch, output=output)
        result.model, result.resets, result.folded, result.kept = done.model, done.resets, done.folded, done.kept
        result.treated = done.treated or {}
        if result.treated:
            scaled = sum(v.startswith(SCALE_ONLY) for v in result.treated.values())
            said = ([f"{scaled} correct the scale only (their layers have no bias for the shift)"] * bool(scaled)
                    + [f"{len(result.treated) - scaled} are left out (they cannot fold into "
                       f"{type(models[0]).__name__})"] * bool(len(result.treated) - scaled))
            result.notes.append(f"REPAIR kept the class (output='class'): of {result.resets} resets, "
                                f"{' and '.join(said)}; output='graph' keeps every correction in a GraphModule")
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


@user_models("models")
def merge_models(models: list[nn.Module], data, *, weights: list[float] | None = None,
                 method: str = "activation", repair: str | None = "exact", num_examples: int = 5000,
                 batch_size: int = 256, points: str = "all", spec: PermutationSpec | None = None,
                 quiet: bool = True, seed: int = 0, refit: int = 0,
                 refit_examples: int | None = REFIT_EXAMPLES, name: str | None = None,
                 see: str | None = None, output: str = "class") -> MergeResult:
    """Align every model to ``models[0]``, average with ``weights``, REPAIR, fold, and ``refit``
    sweeps of the layerwise least-squares refit. ``output``: "class" (the default: the user's class)
    or "graph" (see ``merge_prepared``). ``name`` and ``see``: how a NoGroupsError names the
    model and where it sends the reader (``prepare``)."""
    weights = [1.0 / len(models)] * len(models) if weights is None else check_weights(weights, len(models))
    check_refit(refit, refit_examples)
    check_output(output)
    if repair not in REPAIR_MODES:
        raise GraphRepairError(f"repair must be one of {REPAIR_MODES}, got {repair!r}")
    for m in models[1:]:  # models of other architectures are refused before anything is said of their weights
        check_same_architecture(models[0], m)
    note_unregistered(models, weights)  # (before any forward of this call sets attributes)
    prep = prepare(models, data, method=method, statistics=repair in ("exact", "approx"),
                   cross=repair == "approx", num_examples=num_examples, batch_size=batch_size,
                   points=points, spec=spec, quiet=quiet, seed=seed, name=name, see=see)
    for st in prep.stats:  # the correlations served alignment (a ViT-B's take 0.9 GB); not the merge
        if st is not None:
            st.corr.clear()
            st.joint.clear()
            st.coupled.clear()
            st.wreath.clear()
    return merge_prepared(prep, weights, repair, quiet, refit=refit, refit_examples=refit_examples, output=output)


# -- the public forms ---------------------------------------------------------------------------

@user_models("model_a", "model_b")
def merge(model_a: nn.Module, model_b: nn.Module, data, alpha: float = 0.5, method: str = "activation",
          repair: str | None = "exact", num_examples: int = 5000, points: str = "all",
          batch_size: int = 256, spec: PermutationSpec | None = None, quiet: bool = True,
          refit: int = 0, refit_examples: int | None = REFIT_EXAMPLES, output: str = "class") -> nn.Module:
    """Merge two models of one architecture (see the module docstring); returns the merged model.
    ``refit``: sweeps of the layerwise least-squares refit after ``repair`` (``merging.refit``) on
    the first ``refit_examples`` fitting examples. ``output``: "class" (the user's class) or "graph"
    (a GraphModule holding the REPAIR corrections the class cannot; see ``merge_prepared``)."""
    alpha = check_alpha(alpha)
    return merge_models([model_a, model_b], data, weights=[1 - alpha, alpha], method=method,
                        repair=repair, num_examples=num_examples, batch_size=batch_size, points=points,
                        spec=spec, quiet=quiet, refit=refit, refit_examples=refit_examples, output=output).model


@user_models("model_a", "model_b")
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
