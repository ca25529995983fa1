"""One streaming pass of A and B, on the same batches, gives every statistic a merge needs.

A and B run as the two halves of one paired graph (``passes.pair``): node by node, A's copy and
B's copy of the traced graph, with a tap (``passes.pair_tap.PairTap``) after every node a statistic
is taken at. Per group g and per observation point p of g, on every batch,

    X_A = A's activation at p as a (|g|, samples) matrix, X_B likewise,
    S1, S2 <- per-channel sums of X and X^2;  S_AB <- X_A X_B^T   (float64 totals, one matmul)

and at the end cov_p = S_AB / n - m_A m_B^T (sums taken about a per-channel shift when means are
large, see ``ChannelSums``). The correlation used for matching is the average over the points of
a group:

    corr_g = mean_p  cov_p(A_i, B_j) / (std_p(A_i) std_p(B_j)).

Where one group's positions are replicated over another group's (heads x head dims after the
split to heads; whole groups of a grouped conv or a GroupNorm and the channels inside them), the
pairing of those replicas depends on the other group's permutation, which is not known yet:
there the A-B correlation of every pair of positions of the joint channel space is
gathered instead (``JointPoint``, at most ``JOINT_MAX`` positions), and alignment solves the
groups jointly (``activation_match.activation_perms``).

At every reset point the per-channel mean and variance of A and of B are accumulated too (the
goal statistics of REPAIR); for the closed form the full A-B cross-covariance is kept there, since
Cov(X_A,i, X_B',i) needs the permutation that is only known after the pass.

Memory: O(|g|^2) per group point and O(C) per reset point (O(C^2) for the closed form). No
activation is kept: each tap compares A's and B's value of its node as soon as both exist, and
they are freed at their last use as in a plain forward (about twice one model's activation memory).
When the traced graph calls the models' own modules (``torch.fx.symbolic_trace``), the pair reads
them directly; no copy of either model is made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from passes.in_place_ops import writes_in_place
from passes.pair import bind_pair, pair_graph, unbind_pair
from passes.moments import PairScratch, ShiftChoices, correlation, correlations_together, moments_all
from passes.pair_tap import PairTap, TapView

from graphrepair import distributed
from graphrepair.discovery import axes as ax
from graphrepair.errors import DataError, NumericError, listed
from graphrepair.io.checks import example_shapes, raise_if_other_shape
from graphrepair.io.inputs import Inputs
from graphrepair.merging import kept
from graphrepair.merging.points import ObservePoint, ResetPoint
from graphrepair.progress import progress
from graphrepair.models import eval_mode, graph_for
from graphrepair.runtime import model_device, release
from graphrepair.discovery.spec import PermutationSpec


# A channel whose standard deviation over the fitting data is at most this is dead: its
# correlations are 0 (what is left is float32 rounding, not signal) and ``PairStats.dead`` counts
# it, so that dead units are always among those alignment reports as matched without signal.
DEAD_STD = 1e-6

@dataclass
class PointStats:
    mean_a: torch.Tensor
    var_a: torch.Tensor
    mean_b: torch.Tensor
    var_b: torch.Tensor
    cov_ab: torch.Tensor | None = None  # (C, C) A-B cross-covariance, closed-form REPAIR only
    # per batch of this process, in the order seen: (mean A, var A, mean B, var B), each (batches, C),
    # row t for batch t (exact REPAIR's per-batch goals, see repair.batch_goals); None without them
    batches: tuple | None = None


@dataclass
class JointPoint:
    """A node whose tensor carries several groups (e.g. heads and the dims inside a head): the
    A-B correlation of every pair of positions of their joint channel space, flattened in the
    order of ``expr`` (the Kronecker product of the node's group-carrying axes)."""

    expr: object  # axes.Expr
    corr: torch.Tensor  # (F, F)
    var_a: torch.Tensor  # (F,) A's variance at every position


@dataclass
class Coupled:
    """A group observed at joint points: its correlation depends on the other groups' permutations
    there. ``plain_sum`` sums its correlations at ordinary points (``plain_count`` of them)."""

    plain_sum: torch.Tensor | None
    plain_count: int
    nodes: list[str]


@dataclass
class PairStats:
    corr: dict[str, torch.Tensor]  # group name -> (|g|, |g|) mean correlation A_i vs B_j
    points: dict[str, PointStats]  # reset node -> endpoint statistics
    examples: int
    dead: dict[str, int] = field(default_factory=dict)  # group -> A's channels with zero variance at every point
    # groups whose correlation depends on other groups' permutations (see JointPoint); their
    # ``corr`` entry pairs the other groups' positions as they are
    coupled: dict[str, Coupled] = field(default_factory=dict)
    joint: dict[str, JointPoint] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    requested: int = 0  # examples asked for (by all ranks together in a distributed run)
    # set by alignment (prepare.align_pair): group -> units matched without activation signal, and
    # those of them the weights did not decide either (activation_match.unsignalled)
    unsignalled: dict[str, int] = field(default_factory=dict)
    arbitrary: dict[str, int] = field(default_factory=dict)
    # Wreath family (order group) -> mean joint correlation per layout, or None (``activation_match._wreath_points``)
    wreath: dict = field(default_factory=dict)


def _reads_own(gm: torch.fx.GraphModule, model_a: nn.Module, model_b: nn.Module) -> bool:
    """Whether every module and attribute ``gm``'s graph reads is ``model_a``'s own (the same
    objects) and ``model_b`` has modules configured alike and tensors of the same shapes there."""
    for n in gm.graph.nodes:
        if n.op == "call_module":
            try:
                ref, ma, mb = (m.get_submodule(n.target) for m in (gm, model_a, model_b))
            except AttributeError:
                return False
            if not (ref is ma and type(mb) is type(ma) and mb.extra_repr() == ma.extra_repr()):
                return False
        elif n.op == "get_attr":
            prefix, _, attr = n.target.rpartition(".")
            try:
                parents = [m.get_submodule(prefix) if prefix else m for m in (gm, model_a, model_b)]
            except AttributeError:
                return False
            ref, va, vb = (getattr(p, attr, None) for p in parents)
            if not (isinstance(ref, torch.Tensor) and va is ref
                    and isinstance(vb, torch.Tensor) and vb.shape == ref.shape):
                return False
    return True


def pair_roots(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module,
               device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The modules the two copies of the traced graph read from: the models themselves when every
    module and attribute the graph reads is theirs and B's modules are configured like A's (no
    copy), else copies of the traced graph carrying each model's weights: its parameters
    themselves and copies of its buffers (``_reading``), or copies of everything where the graph
    may write into a tensor."""
    if _reads_own(spec.traced.gm, model_a, model_b):
        return model_a, model_b
    if writes_in_place(spec.traced.gm):  # an op may write into what it reads: copies of everything
        return graph_for(spec, model_a, device), graph_for(spec, model_b, device)
    return _reading(spec, model_a, device), _reading(spec, model_b, device)


def _reading(spec: PermutationSpec, model: nn.Module, device: torch.device) -> torch.fx.GraphModule:
    """A copy of the traced graph that reads ``model``'s parameters themselves and copies of its
    buffers: a graph that writes into no tensor (``writes_in_place``), run without gradients,
    only reads the parameters, as a pass of the model itself would (``_reads_own``), while a
    module's forward may still change a buffer it owns (a counter). A 156M-parameter LLaMA's
    two copies of every weight took 0.9 s of its merge."""
    params = {id(p) for p in model.parameters()}
    state = {k: v.detach() if id(v) in params else v.detach().clone()
             for k, v in model.state_dict(keep_vars=True).items()}
    return graph_for(spec, state, device, own=True)


# Largest joint channel space (product of a node's group-carrying axes) whose full A-B
# correlation is gathered: (F, F) float64, 32 MB at this size.
JOINT_MAX = 2048


def _joint_axes(spec: PermutationSpec, node: str, shape) -> tuple[tuple, object, int] | None:
    """(axes, Kronecker expression, joint size) of ``node``'s group-carrying axes when one group's
    positions are replicated over another's (two such axes, or heads x head dims on one); else
    None."""
    exprs = spec.node_axes.get(node)
    if not exprs or len(exprs) != len(shape):
        return None
    axes_ = tuple(d for d, e in enumerate(exprs) if not ax.is_fixed(e))
    if len(axes_) == 1 and not ax.mixes(exprs[axes_[0]]):
        return None  # one axis whose groups sit in separate blocks (a concat): nothing couples
    size = 1
    for d in axes_:
        size *= shape[d]
    expr = exprs[axes_[0]]
    for d in axes_[1:]:
        expr = ax.kron(expr, exprs[d])
    return axes_, expr, size


@dataclass
class TapPlan:
    """Where the joint pass measures what: one ``PairTap`` per node (its views: the channel axes
    measured there), and where each statistic will be read, as (node, view index)."""

    taps: dict[str, PairTap]
    at_group: dict[tuple[str, str], tuple[str, int]]  # (group, node) -> its view
    at_joint: dict[str, tuple[str, int]]  # node -> the view of its joint channel space
    joint_exprs: dict[str, tuple[tuple, object]]  # node -> (its group-carrying axes, expr)
    at_reset: dict[str, tuple[str, int]]  # reset node -> its view
    cross_at_resets: bool
    notes: list[str] = field(default_factory=list)


def plan_taps(spec: PermutationSpec, observe: dict[str, list[ObservePoint]], resets: list[ResetPoint], *,
              cross_at_resets: bool, device: torch.device) -> TapPlan:
    """The taps of the joint pass: a view per observation point (a joint view where groups meet in
    one tensor, see ``JointPoint``) and per reset point, one view per distinct channel axis."""
    info = spec.traced.info
    views: dict[str, list[TapView]] = {}

    def view(node: str, v: TapView) -> tuple[str, int]:
        vs = views.setdefault(node, [])
        for i, old in enumerate(vs):  # one view per (axis, whole channel axis)
            if v.index is None and old.index is None and old.dim == v.dim:
                if v.cross and not old.cross:
                    vs[i] = TapView(old.dim, None, True)
                return node, i
        vs.append(v)
        return node, len(vs) - 1

    at_group: dict[tuple[str, str], tuple[str, int]] = {}
    joint_exprs: dict[str, tuple[tuple, object]] = {}
    at_joint: dict[str, tuple[str, int]] = {}
    notes: dict[str, str] = {}
    for g, pts in observe.items():
        for p in pts:
            ndim = len(info[p.node].shape)
            joint = _joint_axes(spec, p.node, info[p.node].shape)
            if joint is not None and joint[2] > JOINT_MAX:
                notes[p.node] = (
                    f"at node {p.node!r} whole groups of channels (a grouped conv's or a GroupNorm's, "
                    f"{joint[2]} positions, more than {JOINT_MAX}) are not measured jointly: they keep "
                    f"their places, and the channels inside each group are aligned"
                    if isinstance(joint[1], ax.Wreath) else
                    f"at node {p.node!r} groups meet in a joint space of {joint[2]} positions "
                    f"(more than {JOINT_MAX}): there each group's replicas are paired as "
                    f"they are, so their alignment is approximate")
            elif joint is not None:  # the joint view serves every group at this node
                joint_exprs[p.node] = joint[:2]
                at_joint[p.node] = view(p.node, TapView(joint[0], None, True))
                continue
            whole = (p.positions.shape[1] == 1 and p.positions.shape[0] == info[p.node].shape[p.axis]
                     and bool((p.positions[:, 0] == torch.arange(p.positions.shape[0])).all()))
            index = None if whole else p.positions.to(device)
            at_group[(g, p.node)] = view(p.node, TapView(p.axis % ndim, index, True))
    at_reset = {r.node: view(r.node, TapView(r.axis % len(info[r.node].shape), None, cross_at_resets))
                for r in resets}
    scratch = PairScratch()  # one working buffer for every tap (``moments.pair_update``)
    taps = {node: PairTap(vs, source=node, shape=info[node].shape, scratch=scratch) for node, vs in views.items()}
    for node, i in at_reset.values():
        taps[node].keep_batches(i)
    return TapPlan(taps, at_group, at_joint, joint_exprs, at_reset, cross_at_resets, list(notes.values()))


@torch.no_grad()
def run_pair(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, plan: TapPlan, batches, *,
             quiet: bool = True, total: int | None = None, example: Inputs | None = None) -> int:
    """Run A and B side by side over ``batches`` (``io.examples.Batch``es on the models' device)
    with the plan's taps; returns the number of examples seen. ``example``: the taps' sums choose
    their shifts from it first (``ChannelSums.calibrate``), so that the sums of every batch do not
    depend on which batch came first (one process or several give the same per-batch sums)."""
    root_a, root_b = pair_roots(spec, model_a, model_b, model_device(model_a))
    traced, key = spec.traced.gm, ("pair", frozenset(plan.taps))
    pair = kept.take(traced, key)  # the paired graph of an earlier merge of this spec (``merging.kept``)
    if pair is None:
        pair = pair_graph(traced, root_a, root_b, plan.taps, outputs=False).graph_module
    bind_pair(pair, traced, root_a, root_b, plan.taps)
    examples = 0
    try:
        with eval_mode(model_a, model_b):  # the pair may run the models' own modules
            if example is not None:
                calibrate(pair, plan.taps.values(), example)
            for t, batch in enumerate(progress(batches, "statistics of A and B", total=total, quiet=quiet)):
                try:
                    batch.inputs.call(pair)
                except Exception as exc:  # (not an interrupt)
                    if example is not None:
                        raise_if_other_shape(exc, f"batch {t} of the data", batch.inputs, example_shapes(example))
                    raise
                examples += batch.size
    finally:  # the pair is kept without its models and taps; the graph copies (when made) are
        # not kept in cycles (``runtime.release``)
        unbind_pair(pair)
        kept.give(traced, key, pair)
        release(*[r for r in (root_a, root_b) if r is not model_a and r is not model_b])
    return examples


def calibrate(module: nn.Module, holders, example: Inputs) -> None:
    """Run ``module`` once on ``example`` with ``holders`` (taps, resets) choosing their sums'
    shifts from it, counting nothing; the shifts are chosen all together after the run
    (``moments.ShiftChoices``)."""
    holders = list(holders)
    choices = ShiftChoices()
    for h in holders:
        h.calibrating = choices
    try:
        example.call(module)
        choices.decide()
    finally:
        for h in holders:
            h.calibrating = False


def summarise(spec: PermutationSpec, plan: TapPlan, observe: dict[str, list[ObservePoint]],
              resets: list[ResetPoint], examples: int) -> PairStats:
    """The statistics a merge reads, from the taps' sums: per group its mean correlation over its
    points (coupled groups: see ``Coupled``), per reset point the endpoint moments."""
    if examples == 0:
        raise DataError("the fitting data has no examples")
    taps = plan.taps
    joint = {}
    for node, (view_node, i) in plan.at_joint.items():
        sa, sb = taps[view_node].moments(i)
        jc = correlation(taps[view_node].cov(i), sa.var, sb.var, DEAD_STD)
        if not plan.cross_at_resets:  # read once: free the cross products now (``drop_cross``)
            taps[view_node].drop_cross(i)
        if not torch.isfinite(jc).all():
            raise NumericError(f"correlations at node {node!r} are not finite ({_why_not_finite(node, sa, sb)})")
        joint[node] = JointPoint(plan.joint_exprs[node][1], jc, sa.var)
    # every variance and mean read below, at once (``moments.moments_all``: rows of one table
    # per channel count, the same numbers as each sums' own)
    ordinary = [plan.at_group[(g, p.node)] for g, pts in observe.items() for p in pts if p.node not in joint]
    at_reset = [plan.at_reset[r.node] for r in resets]
    read = {id(s): s for node, i in ordinary + at_reset for s in taps[node].moments(i)}
    moments = dict(zip(read, moments_all(list(read.values()))))
    notes = list(plan.notes)
    # one check of every mean and variance read (the reset points' among them, checked again
    # below only where this one fails)
    finite = not moments or bool(torch.isfinite(torch.cat([t.reshape(-1) for mv in moments.values()
                                                           for t in mv])).all())
    if not finite:
        notes.extend(_not_finite_points(taps, ordinary + at_reset, moments))
    # the small correlations of the ordinary points, all together (``moments.correlations_together``:
    # the same numbers as each alone), their cross products then freed (``drop_cross``); a wide
    # one is made below when its group reads it
    read = list(dict.fromkeys(ordinary))
    together = correlations_together([(taps[node].cross_total(i), *taps[node].moments(i),
                                       *(moments[id(s)][1] for s in taps[node].moments(i))) for node, i in read],
                                     DEAD_STD)
    correlated = {key: c for key, c in zip(read, together) if c is not None}
    uses = Counter(key for key in ordinary if key in correlated)  # (a point two groups read: each its own)
    if not plan.cross_at_resets:
        for node, i in correlated:
            taps[node].drop_cross(i)
    corr: dict[str, torch.Tensor] = {}
    dead: dict[str, int] = {}
    coupled: dict[str, Coupled] = {}
    for g, pts in observe.items():
        if not pts:
            continue
        # running sums (a stack of every point's matrix would hold them all at once)
        nodes = [p.node for p in pts if p.node in joint]
        total, plain, var_a = None, None, None
        for p in pts:
            if p.node in joint:  # replicas paired as they are (alignment re-pairs them)
                jp = joint[p.node]
                pos = ax.positions(jp.expr, spec.var_of_group[g]).to(jp.corr.device)
                m = jp.corr[pos[:, None, :], pos[None, :, :]].mean(-1)
                va = jp.var_a[pos].max(1).values  # a channel is dead when all its replicas are
            else:
                node, i = plan.at_group[(g, p.node)]
                sa, sb = taps[node].moments(i)
                va = moments[id(sa)][1]
                if (node, i) in correlated:
                    uses[(node, i)] -= 1
                    m = correlated[(node, i)] if uses[(node, i)] == 0 else correlated[(node, i)].clone()
                else:
                    m = correlation(taps[node].cov(i), va, moments[id(sb)][1], DEAD_STD)
                    if not plan.cross_at_resets:
                        taps[node].drop_cross(i)
                if nodes:
                    plain = m.clone() if plain is None else plain.add_(m)
            total = m if total is None else total.add_(m)
            var_a = va if var_a is None else torch.maximum(var_a, va)  # dead: at every point
        c = total.div_(len(pts))
        corr[g] = c
        dead[g] = int((var_a <= DEAD_STD ** 2).sum())
        if nodes:
            coupled[g] = Coupled(plain, len(pts) - len(nodes), nodes)
    # correlations lie in [-1, 1] (``correlation`` clamps them) or are NaN: a group's sum is
    # finite exactly when all of them are. One check for all; the first culprit named on failure
    if corr and not bool(torch.isfinite(torch.stack([c.sum() for c in corr.values()])).all()):
        g = next(g for g, c in corr.items() if not torch.isfinite(c).all())
        why = _NOT_FINITE
        for p in observe[g]:  # the first point whose statistics say why
            node, i = plan.at_group.get((g, p.node)) or plan.at_joint[p.node]
            why = _why_not_finite(p.node, *taps[node].moments(i))
            if why != _NOT_FINITE:
                break
        raise NumericError(f"correlations of group {g!r} are not finite ({why})")
    stats = {}
    for r in resets:
        node, i = plan.at_reset[r.node]
        a, b = taps[node].moments(i)
        stats[r.node] = PointStats(*moments[id(a)], *moments[id(b)],
                                   taps[node].cov(i) if plan.cross_at_resets else None,
                                   taps[node].batch_rows(i))
    if not finite:  # (the reset points' moments are among those checked above)
        for node, p in stats.items():  # the first culprit named
            _raise_if_not_finite(node, (("A", p.mean_a, p.var_a), ("B", p.mean_b, p.var_b)))
    return PairStats(corr, stats, examples, {g: n for g, n in dead.items() if n}, coupled, joint, notes)


_NOT_FINITE = "NaN/Inf activations?"
_NAN = "NaN/Inf activations: look for NaN or infinite values in the data and the weights"


def _overflow(who: str, node: str, mean: torch.Tensor, var: torch.Tensor) -> str | None:
    """Why a finite ``mean`` has a variance that is not: the squares overflowed (None otherwise)."""
    if not bool(torch.isfinite(mean).all()) or not bool(torch.isinf(var).any()):
        return None
    top = float(mean.abs().max())
    return (f"model {who}'s activations at node {node!r} are finite but large (means up to {top:.1e}): "
            f"their squares overflow the statistics' sums; merge the models in float64 "
            f"(model.double() and float64 data) or scale the inputs down")


def _raise_if_not_finite(node: str, per_model, where: str = "") -> None:
    """NumericError naming the first model of ``per_model`` ((who, mean, var), ...) whose
    statistics at ``node`` are not finite, and why (``_overflow``, else NaN/Inf activations)."""
    for who, m, v in per_model:
        if not (torch.isfinite(m).all() and torch.isfinite(v).all()):
            raise NumericError(f"statistics of model {who} at node {node!r} are not finite{where} "
                               f"({_overflow(who, node, m, v) or _NAN})")


def _not_finite_points(taps, points: list[tuple[str, int]], moments: dict) -> list[str]:
    """The note on channels whose statistics are not finite (NaN or Inf activations there): the
    correlations read them as units without signal, which the weights match. A model may compute
    them in a few places (T5's decoder: a masked attention row); when every point holds nothing
    else (NaN in the data reaches every channel), NumericError: there is nothing to align on."""
    points = list(dict.fromkeys(points))  # (a tap read for a group and a reset alike: once)
    bad, whole = [], 0
    for node, i in points:
        worst, parts = 0, []
        for who, s in zip("AB", taps[node].moments(i)):
            m, v = moments[id(s)]
            k = int((~(torch.isfinite(m) & torch.isfinite(v))).sum())
            if k:
                parts.append(f"{k} of {m.numel()} channels in model {who}")
                worst = max(worst, k / m.numel())
        if parts:
            bad.append(f"'{node}' ({', '.join(parts)})")
        whole += worst == 1
    if not bad:
        return []
    if whole == len(points):
        node, i = points[0]
        _raise_if_not_finite(node, ((who, *moments[id(s)]) for who, s in zip("AB", taps[node].moments(i))),
                             ", as at every observed point")
    return [f"statistics not finite (NaN/Inf activations) at {listed(bad, 4)}: those units are matched by the "
            f"weights alone"]


def _why_not_finite(node: str, sa, sb) -> str:
    """Why the correlations at ``node`` (``ChannelSums`` of A and B there) are not finite."""
    for who, s in (("A", sa), ("B", sb)):
        why = _overflow(who, node, s.mean, s.var)
        if why is not None:
            return why
    return _NOT_FINITE


def collect(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches,
            observe: dict[str, list[ObservePoint]], resets: list[ResetPoint], *,
            cross_at_resets: bool = False, quiet: bool = True, total: int | None = None,
            requested: int = 0, example: torch.Tensor | None = None) -> PairStats:
    """The single joint pass (see the module docstring): plan the taps, run the pair over
    ``batches`` (input tensors already on the models' device), summarise. In a distributed run
    every rank runs its own batches and the taps' sums (with the examples seen and ``requested``)
    are added across ranks in one collective before the summary (``graphrepair.distributed``);
    ``example`` (the same on every rank) fixes the sums' shifts (``run_pair``)."""
    device = model_device(model_a)
    plan = plan_taps(spec, observe, resets, cross_at_resets=cross_at_resets, device=device)
    with distributed.step("the joint pass of A and B"):
        examples = run_pair(spec, model_a, model_b, plan, batches, quiet=quiet, total=total, example=example)
    shares = None
    if distributed.current() is not None:  # the totals, and each rank's examples (its slot)
        mine = torch.zeros(2 + distributed.world(), dtype=torch.float64)
        mine[0], mine[1], mine[2 + distributed.rank()] = examples, requested, examples
        counts = [int(round(float(c))) for c in
                  distributed.reduce_holders(list(plan.taps.values()), device, [mine])[0].cpu()]
        examples, requested, shares = counts[0], counts[1], counts[2:]
    stats = summarise(spec, plan, observe, resets, examples)
    stats.requested = requested
    if shares is not None and len(set(shares)) > 1:  # normal when sharding; said, not refused
        stats.notes.append(f"the ranks streamed {', '.join(map(str, shares))} examples (rank 0 first); "
                           f"the statistics are of all {examples} together")
    return stats
