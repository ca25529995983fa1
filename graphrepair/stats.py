"""One streaming pass of A and one of B, on the same batches, gives every statistic a merge needs.

Both models run as copies of the traced graph with observers inserted (``passes.track``). For
every batch, A and B see the same inputs; then, per group g and per observation point p of g,

    X_A = A's activation at p as a (|g|, samples) matrix, X_B likewise,
    C_g,p <- per-batch means, centred second moments and (X_A - m_A)(X_B - m_B)^T, merged across
             batches in float64 (passes.track), on the models' device

and the correlation used for matching is the average over the points of a group:

    corr_g = mean_p  cov_p(A_i, B_j) / (std_p(A_i) std_p(B_j)).

At every reset point the per-channel mean and variance of A and of B are accumulated too (the
goal statistics of REPAIR); for the closed form the full A-B cross-covariance is kept there, since
Cov(X_A,i, X_B',i) needs the permutation that is only known after the pass.

Memory: O(|g|^2) per group point and O(C) per reset point (O(C^2) for the closed form); the
activations of one batch are the only tensors held, and only until B has run on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from passes.track import CrossMoments, ObserverSpec, channel_matrix, insert_observers, observers

from .errors import DataError, MismatchError, NumericError
from .points import ObservePoint, ResetPoint
from .progress import progress
from .spec import PermutationSpec


@dataclass
class PointStats:
    mean_a: torch.Tensor
    var_a: torch.Tensor
    mean_b: torch.Tensor
    var_b: torch.Tensor
    cov_ab: torch.Tensor | None = None  # (C, C) A-B cross-covariance, closed-form REPAIR only


@dataclass
class PairStats:
    corr: dict[str, torch.Tensor]  # group name -> (|g|, |g|) mean correlation A_i vs B_j
    points: dict[str, PointStats]  # reset node -> endpoint statistics
    examples: int
    dead: dict[str, int] = field(default_factory=dict)  # group -> channels with zero variance


def graph_for(spec: PermutationSpec, state: dict[str, torch.Tensor] | nn.Module,
              device: torch.device | None = None) -> torch.fx.GraphModule:
    """A copy of the traced graph carrying the weights of ``state`` (a model or a state dict)."""
    gm = copy.deepcopy(spec.traced.gm)
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    own = gm.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise MismatchError(f"the model has no parameter {missing[0]!r} that its traced graph uses "
                            f"({len(missing)} missing); is it the architecture the spec was made for?")
    gm.load_state_dict({k: sd[k] for k in own}, strict=True)
    if device is not None:
        gm.to(device)
    return gm.eval()


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def check_finite(state: dict[str, torch.Tensor], who: str) -> None:
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericError(f"{who}: parameter {k!r} contains NaN or Inf; the model cannot be merged")


def _matrix_along(obs, axis: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The observer's kept batch as a channel matrix along ``axis`` (which may differ from the axis
    it observes, when two groups meet in one node, e.g. heads and head dims)."""
    ndim = len(shape)
    if axis % ndim == obs.dim % ndim:
        return obs.last
    t, d = obs.kept()
    if d == 0 and t.ndim == 2 and ndim != 2:  # a channel matrix: back to the tensor's layout
        dim = obs.dim % ndim
        rest = [s for i, s in enumerate(shape) if i != dim]
        rest[0] = -1  # the batch axis (the last batch may be smaller)
        t, d = t.reshape([shape[dim]] + rest).movedim(0, dim), dim
    return channel_matrix(t, axis % ndim)


@torch.no_grad()
def collect(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches,
            observe: dict[str, list[ObservePoint]], resets: list[ResetPoint], *,
            cross_at_resets: bool = False, quiet: bool = True, total: int | None = None) -> PairStats:
    """The single joint pass (see the module docstring). ``batches`` yields input tensors already
    on the models' device."""
    device = model_device(model_a)
    gm_a, gm_b = graph_for(spec, model_a, device), graph_for(spec, model_b, device)
    keep_nodes: dict[str, int] = {}  # one observer per node, on the first axis observed there
    for pts in observe.values():
        for p in pts:
            keep_nodes.setdefault(p.node, p.axis)
    points = {}
    for node, axis in keep_nodes.items():
        points[node] = ObserverSpec(dim=axis, keep=True)
    for r in resets:
        if r.node in points and points[r.node].dim != r.axis:
            raise AssertionError(f"node {r.node} observed on two axes")
        points[r.node] = ObserverSpec(dim=r.axis, keep=r.node in keep_nodes or cross_at_resets)
    gm_a = insert_observers(gm_a, points, inplace=True).graph_module
    gm_b = insert_observers(gm_b, points, inplace=True).graph_module
    obs_a, obs_b = observers(gm_a), observers(gm_b)

    cross: dict[tuple[str, str], CrossMoments] = {}
    for g, pts in observe.items():
        for p in pts:
            size = p.positions.shape[0]
            cross[(g, p.node)] = CrossMoments(size, size, device)
    reset_cross = {r.node: CrossMoments(r.channels, r.channels, device)
                   for r in resets} if cross_at_resets else {}
    info = spec.traced.info
    pos_dev = {}  # None where the group is the node's whole channel axis: no gather needed
    for g, pts in observe.items():
        for p in pts:
            whole = (p.positions.shape[1] == 1 and p.positions.shape[0] == info[p.node].shape[p.axis]
                     and bool((p.positions[:, 0] == torch.arange(p.positions.shape[0])).all())
                     and keep_nodes[p.node] == p.axis)
            pos_dev[(g, p.node)] = None if whole else (p.axis, p.positions.to(device))

    examples = 0
    for x in progress(batches, "statistics of A and B", total=total, quiet=quiet):
        gm_a(x)
        gm_b(x)
        examples += x.shape[0]
        for (g, node), cm in cross.items():
            pos = pos_dev[(g, node)]
            if pos is None:  # the observers' batch moments are those of xa, xb: not reduced again
                (ta, dim), (tb, _) = obs_a[node].kept(), obs_b[node].kept()
                cm.update(ta, tb, obs_a[node].batch, obs_b[node].batch, dim=dim)
            else:
                axis, pos = pos
                xa = _matrix_along(obs_a[node], axis, info[node].shape)
                xb = _matrix_along(obs_b[node], axis, info[node].shape)
                cm.update(xa[pos].reshape(pos.shape[0], -1), xb[pos].reshape(pos.shape[0], -1))
        for node, cm in reset_cross.items():
            (ta, dim), (tb, _) = obs_a[node].kept(), obs_b[node].kept()
            cm.update(ta, tb, obs_a[node].batch, obs_b[node].batch, dim=dim)
        for o in list(obs_a.values()) + list(obs_b.values()):
            o.last = None  # drop the batch's activations before the next batch
    if examples == 0:
        raise DataError("the fitting data has no examples")

    corr: dict[str, torch.Tensor] = {}
    dead: dict[str, int] = {}
    for g, pts in observe.items():
        if not pts:
            continue
        mats = [cross[(g, p.node)].corr() for p in pts]
        c = torch.stack(mats).mean(0)
        if not torch.isfinite(c).all():
            raise NumericError(f"correlations of group {g!r} are not finite (NaN/Inf activations?)")
        corr[g] = c
        var_a = cross[(g, pts[0].node)].var_a
        dead[g] = int((var_a <= 1e-12).sum())
    stats = {}
    for r in resets:
        a, b = obs_a[r.node], obs_b[r.node]
        for who, o in (("A", a), ("B", b)):
            if not (torch.isfinite(o.mean).all() and torch.isfinite(o.var).all()):
                raise NumericError(f"statistics of model {who} at node {r.node!r} are not finite "
                                   f"(NaN/Inf activations)")
        stats[r.node] = PointStats(a.mean, a.var, b.mean, b.var,
                                   reset_cross[r.node].cov() if r.node in reset_cross else None)
    return PairStats(corr, stats, examples, {g: n for g, n in dead.items() if n})
