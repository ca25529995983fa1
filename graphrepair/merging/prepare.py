"""Preparing a merge: check the models, hold the fitting data, trace and discover, run the joint pass of
each model with model 0, align, and prove the permutations found; everything a merge needs that does
not depend on alpha or the repair mode (``Prepared``), so that a barrier curve aligns once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graphrepair import distributed
from graphrepair.discovery.discover import discover
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import CheckError, DataError, GraphRepairError, MismatchError, ShapeError
from graphrepair.io.examples import Examples
from graphrepair.io.inputs import Inputs
from graphrepair.merging.activation_match import activation_perms, paired_corr, tie_safe, unsignalled
from graphrepair.merging.checks import check_same_architecture
from graphrepair.merging.diagnostics import require_groups
from graphrepair.merging.weight_match import WeightScores, weight_matching
from graphrepair.merging.points import ResetPoint, observation_points, reset_points
from graphrepair.merging.stats import PairStats, collect
from graphrepair.models import check_finite, copy_with_state, user_models
from graphrepair.runtime import model_device, model_dtype, release

METHODS = ("activation", "weight")


def fitting_examples(data, num_examples: int, batch_size: int, models: list[nn.Module]) -> Examples:
    """The fitting data as the Examples every pass of a merge reads: on model 0's device, floating
    inputs in its dtype. In a distributed run (``graphrepair.distributed``) this is the rank's own
    share: it may be empty, and every batch first checks whether another rank has failed."""
    run = distributed.current() is not None
    if run and num_examples == 0 and not isinstance(data, Examples):
        data, num_examples = [], None
    return Examples.of(data, num_examples, batch_size, device=model_device(models[0]),
                       dtype=model_dtype(models[0]), allow_empty=run,
                       between=distributed.check if run else None)


def discover_on(model: nn.Module, fit: Examples) -> PermutationSpec:
    """``discover(model, fit.example())``; when the model does not run on the example because the
    data yields single examples without a batch axis, the DataError that says so."""
    try:
        return discover(model, fit.example())
    except ShapeError as e:
        better = fit.missing_batch_axis(model)
        if better is not None:
            raise better from e
        raise


def spec_for(spec: PermutationSpec, model: nn.Module, fit: Examples) -> PermutationSpec:
    """``spec`` (given by the caller) for merging ``model``: as it is when its graph holds the
    model's floating dtype. A spec traced at another dtype (discovered on the float32 model, merged
    in bfloat16) has the same groups but a graph whose weights and constants are of that dtype:
    the passes would run the model at the wrong precision, or fail where its float32 constants
    meet half-precision weights. Then the model is traced as it is, and the groups found must be
    the spec's (MismatchError naming the first difference otherwise)."""
    traced_dtype, dtype = model_dtype(spec.traced.gm), model_dtype(model)
    if traced_dtype is None or dtype is None or traced_dtype == dtype:
        return spec
    fresh = discover_on(model, fit)
    given = {g.name: g.size for g in spec.groups}
    found = {g.name: g.size for g in fresh.groups}
    if given != found:
        k = next((k for k in given if found.get(k) != given[k]), None)
        diff = (f"the spec's group {k!r} of {given[k]} channels "
                + ("is not found" if k not in found else f"has {found[k]} channels") if k is not None else
                f"group {next(k for k in found if k not in given)!r} is not in the spec")
        raise MismatchError(f"the spec given was traced with {traced_dtype} weights and the model is {dtype}; "
                            f"traced as it is, the model's groups differ ({diff}): pass spec=None "
                            f"(discovery on the model itself) or a spec discovered on the {dtype} model")
    return fresh


def align_pair(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, fit: Examples, *,
               method: str, resets: list[ResetPoint], cross_at_resets: bool, quiet: bool,
               seed: int = 0, states: tuple[dict, dict] | None = None
               ) -> tuple[dict[str, torch.Tensor], PairStats | None, dict[str, float]]:
    """Permutations of B's groups onto A, and the pass statistics (None for weight matching
    without REPAIR statistics). Activation matching breaks its ties with the weights
    (``activation_perms``) and counts, per group, the units matched without activation signal and
    those the weights did not decide either (``activation_match.unsignalled``; ``PairStats.unsignalled``,
    ``PairStats.arbitrary``). ``states``: the two models' state dicts, when the caller has them."""
    sa, sb = states if states is not None else (model_a.state_dict(), model_b.state_dict())
    stats = None
    scores = WeightScores(spec, sa, sb) if method == "activation" else None
    if method == "activation" or resets:
        observe = observation_points(spec) if method == "activation" else {}
        stats = collect(spec, model_a, model_b, fit, observe, resets, cross_at_resets=cross_at_resets,
                        quiet=quiet, total=fit.batches(), requested=fit.n or 0, example=fit.example())
    perms = None
    blind = {}  # group -> its units the activations cannot tell apart (found by activation_perms)
    with distributed.step("solving the assignments"):
        if distributed.is_reporting():  # one solver: rank 0 (see graphrepair.distributed)
            if method == "activation":
                perms = activation_perms(spec, stats, weights=scores, blind=blind)
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
                known = blind.get(g)  # groups solved alone on their correlations as gathered
                n, arbitrary = unsignalled(None if known is not None else tie_safe(c).cpu(), p.cpu(),
                                           lambda rows, cols: scores.cosine(g, held, rows, cols), blind=known)
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
    fit: Examples
    method: str
    points: list[ResetPoint]
    perms: list[dict[str, torch.Tensor]]
    stats: list[PairStats | None]
    mean_corr: dict[str, float]
    aligned: list[dict[str, torch.Tensor]]  # state dicts, models 1.. permuted onto model 0 (or [])


@user_models("models")
def prepare(models: list[nn.Module], data, *, method: str = "activation", statistics: bool = True,
            cross: bool = False, num_examples: int = 5000, batch_size: int = 256, points: str = "all",
            spec: PermutationSpec | None = None, quiet: bool = True, seed: int = 0,
            align: bool = True, states: bool = True, name: str | None = None, see: str | None = None) -> Prepared:
    """Check, trace, discover, run the joint pass(es) and align. ``statistics``: gather REPAIR's
    endpoint statistics at the reset points (``cross``: also A-B cross-covariances, for 'approx').
    ``align=False`` keeps B as it is (the naive baseline). ``states=False``: only the
    permutations are wanted; the permuted copies of the models' weights (``Prepared.aligned``,
    what ``merge_prepared`` interpolates) are not made. A model with no permutation group raises
    NoGroupsError (``diagnostics.require_groups``), naming the model ``name`` (by default its class)
    and pointing to ``see`` for the reasons (by default the spec's ``fixed`` list)."""
    if len(models) < 2:
        raise GraphRepairError("merging needs at least two models")
    if method not in METHODS:
        raise GraphRepairError(f"method must be one of {METHODS}, got {method!r}")
    with distributed.step("checking the models and the fitting data"):
        for m in models[1:]:
            check_same_architecture(models[0], m)
        # read once for the checks and the alignment's weights (tracing gives the buffers back)
        read = [m.state_dict() for m in models]
        for i, sd in enumerate(read):
            check_finite(sd, f"model {'AB'[i] if len(models) == 2 else i}")
        device = model_device(models[0])
        # the caller's models are read, never changed: one on another device is copied to model 0's,
        # and each pass puts them in eval mode only while it runs (``models.eval_mode``)
        moved = [model_device(m) != device for m in models]
        models = [copy_with_state(m, sd, device=device) if move else m for m, sd, move in zip(models, read, moved)]
        read = [m.state_dict() if move else sd for m, sd, move in zip(models, read, moved)]
        fit = fitting_examples(data, num_examples, batch_size, models)
        example = fit.local_example() if distributed.current() is not None else None
    if distributed.current() is not None:  # the same models everywhere; one example to trace with
        example = distributed.agree_on_start([m.state_dict() for m in models], example)
        if example is None:
            raise DataError("the fitting data has no examples on any rank")
        fit.shared_example = example.to(device, fit.dtype)
        distributed.agree_on_function(models, fit.shared_example)  # the same function everywhere too
    with distributed.step("tracing the model and discovering its permutation groups"):
        spec = discover_on(models[0], fit) if spec is None else spec_for(spec, models[0], fit)
        require_groups(spec, name or spec.model_name or type(models[0]).__name__, see=see)
        rpoints = reset_points(spec, points) if statistics else []
    perms_all, stats_all, corr = [], [], {}
    for k, m in enumerate(models[1:], 1):
        if align:
            perms, stats, mean_corr = align_pair(spec, models[0], m, fit, method=method, resets=rpoints,
                                                 cross_at_resets=cross, quiet=quiet, seed=seed,
                                                 states=(read[0], read[k]))
        else:
            perms = spec.identity_permutations()
            stats = collect(spec, models[0], m, fit, {}, rpoints, cross_at_resets=cross, quiet=quiet,
                            total=fit.batches(), requested=fit.n or 0, example=fit.example()) if rpoints else None
            mean_corr = {}
        perms_all.append(perms)
        stats_all.append(stats)
        corr = corr or mean_corr
    aligned = []
    with distributed.step("proving the permutations on a batch of the fitting data"):
        for i, (m, p) in enumerate(zip(models[1:], perms_all)):
            sd = m.state_dict()  # (afresh: a forward of the passes may have replaced a buffer)
            permuted = spec.permute_state_dict(sd, p)
            if align:
                prove_permutations(spec, m, permuted, p, fit.example(), f"model {'B' if len(models) == 2 else i + 1}")
            if states:
                # entries with no permuted axis come back as the model's own tensors: copy them, so
                # that changing the model later cannot change what this preparation merges
                aligned.append({k: v.clone() if v is sd[k] else v for k, v in permuted.items()})
    return Prepared(models, spec, fit, method, rpoints, perms_all, stats_all, corr, aligned)


def prove_permutations(spec: PermutationSpec, model: nn.Module, permuted_state: dict, perms: dict,
                       example: Inputs, who: str) -> float:
    """Before anything is interpolated: the model with the permutations found must compute what the
    model computes, on one batch of the fitting data (a rule bug would otherwise become a silently
    broken merged model). One more forward of the model and of its permuted copy (which shares the
    unpermuted tensors); CheckError naming the group otherwise."""
    if all(bool((q == torch.arange(q.numel(), device=q.device)).all()) for q in perms.values()):
        return 0.0  # nothing moves
    permuted = copy_with_state(model, permuted_state, own=True)  # shares the tensors, copies none
    try:
        return spec.prove(model, permuted, example, perms)
    except CheckError as e:
        if getattr(e, "random_forward", False):  # the model, not the permutations (``PermutationSpec._prove``)
            raise CheckError(f"{who}: {e}") from e
        raise CheckError(f"the permutations aligning {who} break its function: {e}") from e
    finally:
        release(permuted)  # a copy of a GraphModule is a cycle (see runtime.release)
