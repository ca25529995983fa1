"""REPAIR: the goal statistics of every reset point, the resets, the pass that estimates them and the
fold of the corrections into the weights.

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

Merging k > 2 models: the goal statistics are the w-weighted averages of the aligned endpoints'
statistics.

What comes back (``output``):
- "class" (the default): the user's class. Before the merged net's pass, the resets are planned
  against the class (``passes.fold_affine.fold_plan``): a reset that folds into the producing layer's
  own parameters stays as it is; a reset whose producer has no bias for its shift (LLaMA's, T5's
  projections) corrects the spread only, y_c = x_c * goal_std_c / sqrt(var_c + eps) (scale-only,
  folded into the weight); a reset that cannot fold at all (a residual stream read by LayerNorms,
  a tied or shared weight) is left out. The pass then estimates the resets that remain, so each is
  measured on the model that will be saved, not on one with the left-out corrections in it.
  ``Repaired.treated`` says what was done to each reset point that did not fold as it was.
  A model whose resets all fold is merged exactly as with "graph".
- "graph": every reset folds where it can; the others stay as one per-channel affine each in a
  ``torch.fx.GraphModule`` (and a missing bias is created), which the user's class cannot hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from passes.base import annotation, deepcopy_quietly
from passes.fold_affine import NEEDS_BIAS, fold_affines, fold_plan, refold
from passes.reset import ChannelAffine, Reset, ResetSpec, insert_resets, remove_resets, restart_all, resets, set_mode

from graphrepair import distributed
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import GraphRepairError
from graphrepair.merging import kept
from graphrepair.merging.points import ResetPoint
from graphrepair.io.inputs import Inputs
from graphrepair.merging.stats import PairStats, calibrate
from graphrepair.models import assign_state, copy_with_state, graph_for, graph_state
from graphrepair.progress import progress
from graphrepair.runtime import model_device

REPAIR_MODES = ("exact", "approx", "reset", None)
OUTPUTS = ("class", "graph")  # what a REPAIR merge returns, see the module doc


RESET_EPS = 1e-5  # the resets' variance epsilon, as BatchNorm's
SCALE_ONLY = "scale only"  # how ``Repaired.treated`` begins for a reset that corrects the scale only


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


def _permuted(stat: torch.Tensor, spec: PermutationSpec, node: str, axis: int, perms) -> torch.Tensor:
    """``perms``: group permutations, or ``spec.checked(perms)`` of them."""
    return stat[..., spec.node_index(node, axis, perms).to(stat.device)]  # along the last axis: (C,) or (batches, C)


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
    counts = {0 if st.points[r.node].batches is None else st.points[r.node].batches[0].shape[0]
              for st in stats_all for r in points}
    if not points or len(counts) != 1 or 0 in counts:
        return []
    perms_all = [spec.checked(p) for p in perms_all]
    out = [{} for _ in range(counts.pop())]
    for r in points:  # every batch of a point at once, as (batches, C) rows: the same elementwise sums
        a = stats_all[0].points[r.node].batches[:2]
        others = [st.points[r.node].batches[2:] for st in stats_all]
        mean, std = _interpolated(spec, r, a, others, perms_all, weights)
        mean, std = mean.float(), _normaliser_std(std).float()
        for t, goals in enumerate(out):
            goals[r.node] = (mean[t], std[t])
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
    """What the REPAIR step made: the merged model (the user's class with output "class", or when
    every reset folded), how many resets there were, how many folded, why the others could not be."""

    model: nn.Module
    resets: int
    folded: int
    kept: list[str]
    unfolded: nn.Module | None = None  # with keep_unfolded: the graph with its reset nodes
    treated: dict[str, str] | None = None  # output="class": reset point -> what was done instead of a fold


def repair_merged(spec: PermutationSpec, model_a: nn.Module, merged_state: dict[str, torch.Tensor],
                  goals: dict[str, tuple], points: list[ResetPoint], *, fit,
                  running: dict[str, tuple] | None = None, quiet: bool = True,
                  keep_unfolded: bool = False, per_batch: list | None = None,
                  output: str = "class", scale_only: bool = True) -> Repaired:
    """REPAIR the interpolated weights ``merged_state``: a reset after every point, normalising it
    to its ``goals`` (mean, std); the resets' statistics are ``running`` (mean, var) per point
    when given (the closed form), else estimated in one pass of the merged graph over ``fit``
    (exact REPAIR); then every reset is folded into its producer where it can be. ``per_batch``:
    ``batch_goals``, the goals of each batch of the joint pass: during the pass batch t is
    normalised to its own goal (``Reset.set_batch_goal``). ``fit`` (``io.examples.Examples``) gives
    every pass the same batches, so batch t here is batch t of the joint pass. ``output``: "class"
    or "graph" (the module doc); ``scale_only=False``: with "class", a reset whose layer has no bias
    is left out instead of correcting the scale only (for measuring the choice)."""
    if output not in OUTPUTS:
        raise GraphRepairError(f"output must be one of {OUTPUTS}, got {output!r}")
    device = model_device(model_a)
    # with output "class", what an earlier merge of this spec kept (``merging.kept``): what is done
    # to each reset (None: planned here), and the merged graph with its resets as planned, to be
    # given this merge's weights and goals (None: made here)
    traced = spec.traced.gm
    key = ("repair", tuple((r.node, r.axis) for r in points), output, scale_only, running is None,
           _shapes(fit.example()))
    plan, gm, steps = (kept.take(traced, key) if output == "class" else None) or (None, None, None)
    reuse = output == "class" and not keep_unfolded  # the graph is kept, never returned
    left_out = {p for p, what in (plan or {}).items() if not what.startswith(SCALE_ONLY)}
    if gm is not None and reuse:
        _rebind(gm, spec, merged_state, goals)
    else:
        gm = graph_for(spec, merged_state, device, own=True)
        insert_resets(gm, {r.node: ResetSpec(r.axis, goals[r.node][0].float(),
                                             _normaliser_std(goals[r.node][1]).float(), RESET_EPS,
                                             scale_only=r.node in (plan or {}) and r.node not in left_out)
                           for r in points if r.node not in left_out}, inplace=True)
    if running is None:
        set_mode(gm, "collect")
        with torch.no_grad():  # the resets' shifts from the example every rank shares
            calibrate(gm, resets(gm).values(), fit.example())
            if output == "class" and plan is None:  # planned on the ranks the resets just saw
                plan = class_resets(gm, scale_only=scale_only)
                if plan:  # the shifts again, from what the remaining resets now see
                    calibrate(gm, resets(gm).values(), fit.example())
        with distributed.step("the REPAIR pass of the merged model"), torch.no_grad():
            found = resets(gm)
            goals_t = per_batch or []
            for t, batch in enumerate(progress(iter(fit), "REPAIR statistics of the merged model",
                                               total=fit.batches(), quiet=quiet)):
                mine = goals_t[t] if t < len(goals_t) else None
                for node, reset in found.items():
                    reset.set_batch_goal(*(mine[node] if mine is not None else (None,)))
                batch.inputs.call(gm)
            for reset in found.values():
                reset.set_batch_goal(None)
        # every rank's sums, added: one collective (graph order, the same on every rank)
        distributed.reduce_holders(list(resets(gm).values()), device)
    else:
        found = resets(gm)
        for node, (mean, var) in running.items():
            if node not in left_out:  # (those the kept plan leaves out are not inserted)
                found[node].set_running(mean.float(), var.float())
    set_mode(gm, "apply")
    if running is not None and output == "class" and plan is None:
        plan = class_resets(gm, placeholder_args(gm, fit.example()), scale_only)
    treated = None if plan is None else dict(plan)  # (the caller's copy: the plan may be kept)
    unfolded = deepcopy_quietly(gm) if keep_unfolded else None
    # exact: every reset saw data and knows its input's rank; closed form (and a distributed rank,
    # which may have seen no batch): shapes from one example
    example = running is not None or distributed.current() is not None
    if reuse and steps and refold(gm, steps):
        # the kept graph's folds played again on this merge's weights (``fold_affine.refold``): the
        # parameters the fold gives, the graph not edited, so not copied and put back either
        model = copy_with_state(model_a, {**merged_state, **_folded_state(gm, spec.traced.graph_own)}, own=True).eval()
        _unbind(gm, spec)
        kept.give(traced, key, (plan, gm, steps))
        return Repaired(model, len(points), len(steps), [], unfolded, treated)
    # the graph to keep as it is before the fold (the fold takes its resets out), put back after
    if reuse:
        graph_before = deepcopy_quietly(gm.graph)
        resets_before = {name: m for name, m in gm.named_modules() if isinstance(m, Reset)}
        params_before = [k for k, _ in gm.named_parameters()]
    # the folded module's code is regenerated only when it is returned (``finalize``)
    steps = [] if reuse else None  # what the fold did, for the next merge to play again
    folded = fold_affines(gm, inplace=True, example_inputs=placeholder_args(gm, fit.example()) if example else None,
                          recompile=False, steps=steps)
    model = finalize(gm, model_a, merged_state, spec.traced.graph_own)
    if plan is not None:
        # kept only when the merge returned the class and the fold gave the graph's modules no
        # parameter (the class's resets never need one): the next merge rebinds every one
        keep = reuse and model is not gm and [k for k, _ in gm.named_parameters()] == params_before
        if keep:
            _restore(gm, graph_before, resets_before)
            _unbind(gm, spec)
        kept.give(traced, key, (plan, gm if keep else None, steps if keep else None))
    return Repaired(model, len(points), folded.counts.get("folded", 0), list(folded.notes), unfolded, treated)


def _restore(gm: torch.fx.GraphModule, graph: torch.fx.Graph, held: dict[str, Reset]) -> None:
    """``gm`` as it was before its fold: its resets back, its graph ``graph`` (a copy of the one
    it had) and the code of that graph."""
    for name, reset in held.items():
        gm.add_submodule(name, reset)
    gm.graph = graph


def _folded_state(gm: torch.fx.GraphModule, graph_own=frozenset()) -> dict[str, torch.Tensor]:
    """``gm``'s state after ``refold``: what ``finalize`` reads of a folded graph (its resets,
    folded, have no state left; nor the graph's own tensors ``graph_own``)."""
    held = tuple(f"{name}." for name, m in gm.named_modules() if isinstance(m, Reset))
    return {k: v for k, v in gm.state_dict().items() if k not in graph_own and not k.startswith(held)}


def _reset_buffers(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The state-dict entries of ``gm``'s resets (goals and running statistics)."""
    return {f"{name}.{b}": t for name, m in gm.named_modules() if isinstance(m, Reset) for b, t in m._buffers.items()}


def _rebind(gm: torch.fx.GraphModule, spec: PermutationSpec, merged_state: dict, goals: dict) -> None:
    """A kept merged graph given this merge's weights ``merged_state`` (taken as they are, as
    ``graph_for`` takes them) and its resets started afresh with their ``goals``."""
    assign_state(gm, {**_reset_buffers(gm), **graph_state(spec, merged_state)}, own=True)
    found = resets(gm)
    restart_all(found, {node: (goals[node][0].float(), _normaliser_std(goals[node][1]).float()) for node in found})


def _unbind(gm: torch.fx.GraphModule, spec: PermutationSpec) -> None:
    """A merged graph to be kept let go of the merge's weights: the traced graph's own tensors
    (the spec holds them anyway) in their place."""
    assign_state(gm, {**_reset_buffers(gm), **spec.traced.gm.state_dict()}, own=True)


def _shapes(example: Inputs) -> tuple:
    """What the example's tensors are (name, shape, dtype, device): the ranks a plan reads."""
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in example.named())


def class_resets(gm: torch.fx.GraphModule, example: tuple | None = None, scale_only: bool = True) -> dict[str, str]:
    """Make every reset of ``gm`` one that folds into the model's own parameters (output "class",
    see the module doc), in place: scale-only where the producer has no bias for the shift, left out
    where it cannot fold at all. Returns {reset point: what was done}. ``example``: placeholder
    arguments to learn ranks from (apply mode only; in collect mode each reset's last input tells).
    ``scale_only=False``: a reset whose layer has no bias is left out too."""
    plan = fold_plan(gm, example)
    after = {n.name: annotation(n).get("after") for n in gm.graph.nodes if n.name in plan}
    found, treated, out = resets(gm), {}, []
    for name, kind in plan.items():
        point = after[name]
        if kind is None or point is None:  # folds as it is, or no reset of this merge
            continue
        if kind == NEEDS_BIAS and scale_only:
            found[point].scale_only = True
            treated[point] = f"{SCALE_ONLY} (the layer has no bias to take the shift)"
        else:
            out.append(point)
            treated[point] = f"left out ({kind})"
    remove_resets(gm, out)
    return treated


def placeholder_args(gm: torch.fx.GraphModule, example: Inputs) -> tuple:
    """``example`` as the graph's placeholders in order, for a pass that runs the graph on
    positional arguments only (``passes``' shape propagation): keyword inputs by name, a
    placeholder's default where the example has no value for it."""
    if not example.kwargs:
        return example.args
    out = []
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(example.args):
            out.append(example.args[i])
        else:
            out.append(example.kwargs.get(n.target, n.args[0] if n.args else None))
    return tuple(out)


def finalize(gm, model_a: nn.Module, merged_state: dict, graph_own=frozenset()) -> nn.Module:
    """The user's own model class when every reset was folded into existing parameters, else the
    GraphModule (with one ChannelAffine per unfoldable reset), its code regenerated from its
    folded graph (``fold_affines(recompile=False)``). ``graph_own``: the graph's own
    tensors (``Traced.graph_own``), which the user's model holds elsewhere or not at all."""
    gsd = {k: v for k, v in gm.state_dict().items() if k not in graph_own}
    leftovers = any(isinstance(m, (Reset, ChannelAffine)) for m in gm.modules())
    if not leftovers and set(gsd) <= set(merged_state):
        return copy_with_state(model_a, {**merged_state, **gsd}, own=True).eval()
    gm.recompile()
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
        for batch in progress(iter(fit), "BatchNorm statistics of the merged model", quiet=quiet):
            batch.inputs.call(model)
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
