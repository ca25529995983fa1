"""Alignment: permutations of B's groups that make B's units line up with A's.

Activation matching (REPAIR, Git Re-Basin): for each group g, with corr_g[i, j] the correlation of
A's channel i and B's channel j over the fitting data (``stats.py``), solve

    P_g = argmax_P  sum_i corr_g[i, P(i)]          (scipy's linear_sum_assignment)

so that B' = B.index_select(axis, P_g) puts B's best match for A's channel i at position i.
Groups coupled at a shared tensor (heads x head dims) are solved jointly, see ``activation_perms``.

Ties. The correlations are rounded to multiples of TIE_GRID = 2^-17 (about 7.6e-6) before each
assignment, so that statistics which differ only by the order their sums were added in (one
process or several, another thread count) give the same matrix; what then ties (dead units, whose
correlations are exactly 0, and correlations equal to within rounding) is resolved by the
solver's fixed order on that identical matrix, the same whatever the number of ranks.

Weight matching (Git Re-Basin, permutation coordinate descent; no data): for each group g in a
random order, holding the other groups' permutations, maximise the summed inner products of the
weights that g touches,

    P_g = argmax_P  sum_{W, axis d containing g}  < W_A[g-view],  W_B'[P, g-view] >_F

where the g-view gathers, along axis d, the R positions of each of g's channels (a flattened
feature map repeats a channel over spatial positions; a Kronecker layout repeats it per block) and
flattens everything else, with the other groups' current permutations already applied to B. Where
axis d is a grouped conv's per-group axis (a PerBlock: row block j of axis a is permuted by its
own expression e_j), g's term is the sum over the blocks whose e_j contains g, each g-view taken
from that block's rows only:

    sum_{j: g in e_j}  < W_A[rows of block j][g-view of e_j],  W_B'[rows of block j][P, g-view of e_j] >_F.

The descent repeats until no group changes. Groups replicated over other groups on one axis (heads x
head dims) start from a pairing-free estimate instead of the identity (see ``weight_matching``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from graphrepair.discovery import axes as ax
from graphrepair.errors import MismatchError
from graphrepair.discovery.spec import PermutationSpec


TIE_GRID = 2.0 ** -17


def tie_safe(corr: torch.Tensor) -> torch.Tensor:
    """``corr`` rounded to multiples of ``TIE_GRID`` (float64; see the module doc)."""
    return torch.round(corr.double() / TIE_GRID) * TIE_GRID


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation maximising sum_i score[i, P(i)] (rows: A's channels, columns: B's)."""
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def activation_perms(spec: PermutationSpec, stats, max_rounds: int = 50) -> dict[str, torch.Tensor]:
    """One linear assignment per group on its correlation (``stats``: a ``stats.PairStats``).

    Groups that share a tensor with other groups (split-head attention: heads x head dims,
    ``PairStats.coupled``) are solved jointly: at such a node the correlation of A's channel i with
    B's channel j depends on how the other groups' positions are paired,

        corr_g[i, j] = mean_r  C[pos_g(i, r), Q_g(pos_g(j, r))]

    (C the correlation of every pair of positions of the node's joint channel space, pos_g the
    positions of g's channels, Q_g the gather index of the other groups' current permutations).
    Started from a pairing-free estimate (each A position's best match among B's replicas),
    coordinate ascent solves one group at a time until no group changes; every step can only
    raise the summed correlation."""
    perms = {g: lap(tie_safe(c)) for g, c in stats.corr.items() if g not in stats.coupled}
    if not stats.coupled:
        return perms

    def best(jp, pos):  # each A replica's best match among B's: (|g|, |g|, R, R) -> (|g|, |g|)
        return jp.corr[pos[:, None, :, None], pos[None, :, None, :]].max(-1).values.mean(-1)

    for g in stats.coupled:  # start from the pairing-free estimate
        perms[g] = lap(tie_safe(_coupled_mean(spec, stats, g, best)))
    for _ in range(max_rounds):
        changed = False
        for g in stats.coupled:
            p = lap(tie_safe(coupled_corr(spec, stats, g, perms)))
            if not torch.equal(p, perms[g]):
                perms[g], changed = p, True
        if not changed:
            break
    return perms


def _coupled_mean(spec: PermutationSpec, stats, g: str, score) -> torch.Tensor:
    """Group ``g``'s correlation averaged over its points: the ordinary ones as gathered, each
    joint one as ``score(joint point, positions of g's channels there)``."""
    c = stats.coupled[g]
    total = c.plain_sum.clone() if c.plain_sum is not None else 0.0
    for node in c.nodes:
        jp = stats.joint[node]
        total = total + score(jp, ax.positions(jp.expr, spec.var_of_group[g]).to(jp.corr.device))
    return total / (c.plain_count + len(c.nodes))


def coupled_corr(spec: PermutationSpec, stats, g: str, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """corr_g given the other groups' permutations ``perms`` (see ``activation_perms``)."""
    others = {spec.var_of_group[h]: p for h, p in perms.items() if h != g}

    def paired(jp, pos):
        q = ax.index(jp.expr, others).to(pos.device)
        return jp.corr[pos[:, None, :], q[pos][None, :, :]].mean(-1)

    return _coupled_mean(spec, stats, g, paired)


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """MismatchError naming the first parameter that differs in name or shape."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for (ka, ta), (kb, tb) in zip(sa.items(), sb.items()):
        if ka != kb:
            raise MismatchError(f"models A and B differ: A has parameter {ka!r} where B has {kb!r}; "
                                f"both must be the same architecture")
        if ta.shape != tb.shape:
            raise MismatchError(f"models A and B differ at parameter {ka!r}: shape {tuple(ta.shape)} in A "
                                f"vs {tuple(tb.shape)} in B; both must be the same architecture")
    if len(sa) != len(sb):
        longer, name = (sa, "A") if len(sa) > len(sb) else (sb, "B")
        extra = list(longer)[min(len(sa), len(sb))]
        raise MismatchError(f"models A and B differ: only {name} has parameter {extra!r}")


def _replicas(t: torch.Tensor, axis: int, pos: torch.Tensor, rows: tuple | None = None) -> torch.Tensor:
    """(|g|, R, everything else): channel c's R positions pos[c] along ``axis``, each with all
    other axes flattened; ``rows`` = (row axis, start, length) first narrows to one row block."""
    if rows is not None:
        t = t.narrow(*rows)
    m = t.movedim(axis, 0)
    return m[pos.to(t.device)].reshape(pos.shape[0], pos.shape[1], -1)


def _inner(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """<A's channel i, B's channel j> over all their replicas: (|g|, |g|)."""
    return wa.flatten(1) @ wb.flatten(1).T


def _best_replicas(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Each replica of A's channel i against its best match among B's channel j's: (|g|, |g|)."""
    return torch.einsum("irk,jsk->ijrs", wa, wb).max(-1).values.sum(-1)


def weight_matching(spec: PermutationSpec, state_a: dict, state_b: dict, *, groups=None,
                    init: dict[str, torch.Tensor] | None = None, max_iter: int = 100,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Git Re-Basin's permutation coordinate descent over the discovered spec (see module doc).

    ``groups`` restricts the descent to some groups (the others keep ``init``)."""
    names = [g.name for g in spec.groups] if groups is None else list(groups)
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    if init:
        spec.checked(init)  # validated once; the descent only makes permutations
        perms.update({k: torch.as_tensor(v, dtype=torch.long).cpu().clone() for k, v in init.items()})
    # the (param, axis) pairs each group touches, with the positions of its channels there (and,
    # on a grouped conv's per-group axis, the row block they are read in)
    touches: dict[str, list[tuple[str, int, torch.Tensor, tuple | None]]] = {}
    for g in spec.groups:
        if g.name not in names:
            continue
        vid = spec.var_of_group[g.name]
        items = []
        for m in g.params:
            t = state_a.get(m.name)
            if t is None or not t.is_floating_point():
                continue
            e = spec.param_axes[m.name][m.axis]
            if isinstance(e, ax.PerBlock):
                size = t.shape[e.axis] // len(e.parts)
                for j, part in enumerate(e.parts):
                    pos = ax.positions(part, vid)
                    if pos is not None:
                        items.append((m.name, m.axis, pos, (e.axis, j * size, size)))
                continue
            pos = ax.positions(e, vid)
            if pos is not None:
                items.append((m.name, m.axis, pos, None))
        touches[g.name] = items
    rng = np.random.default_rng(seed)

    def b_replicas(key: str, axis: int, pos: torch.Tensor, rows, vp: dict) -> torch.Tensor:
        """``_replicas`` of B's tensor ``key`` permuted by ``vp``: only the rows of the group's
        positions are gathered (through the axis's own index) before the other axes are permuted,
        not the whole tensor; the same values as permuting all of it first."""
        t, exprs = state_b[key].detach(), spec.param_axes[key]
        if rows is not None or any(isinstance(e, ax.PerBlock) for e in exprs):
            return _replicas(ax.permute_tensor(t, exprs, vp), axis, pos, rows).double()
        idx = ax.index(exprs[axis], vp)[pos].to(t.device)  # (|g|, R) positions in B's own order
        sub = t.index_select(axis, idx.reshape(-1))
        rest = [ax.Fixed(n) if d == axis else e for d, (e, n) in enumerate(zip(exprs, sub.shape))]
        sub = ax.permute_tensor(sub, rest, vp)
        return sub.movedim(axis, 0).reshape(pos.shape[0], pos.shape[1], -1).double()

    def group_score(name: str, held: dict, pairing) -> torch.Tensor:
        """(|g|, |g|) summed ``pairing`` of A's and B's weights that group ``name`` touches, with
        the groups in ``held`` permuted as given there. Only the touched channels are gathered and
        widened to float64 (no float64 copy of either model is kept)."""
        vp = {spec.var_of_group[k]: v for k, v in held.items()}
        size = spec.group(name).size
        total = torch.zeros(size, size, dtype=torch.float64)
        for key, axis, pos, rows in touches[name]:
            total += pairing(_replicas(state_a[key].detach(), axis, pos, rows).double(),
                             b_replicas(key, axis, pos, rows, vp)).cpu()
        return total

    def descend(active: list[str]) -> None:
        for _ in range(max_iter):
            changed = False
            for gi in rng.permutation(len(active)):
                name = active[gi]
                score = group_score(name, {k: v for k, v in perms.items() if k != name}, _inner)
                size = score.shape[0]
                new = lap(score)
                old = perms[name]
                if (score[torch.arange(size), new].sum() > score[torch.arange(size), old].sum() + 1e-12
                        and not torch.equal(new, old)):
                    perms[name] = new
                    changed = True
            if not changed:
                return

    # Groups replicated over other groups on one axis (heads x head dims): coordinate descent
    # from the identity pairs their replicas wrongly and stalls. First the other groups, then
    # these from a pairing-free start (each A replica's best match among B's), then all together.
    coupled = [n for n in names if not (init and n in init)
               and any(ax.mixes(spec.param_axes[key][axis]) for key, axis, _, _ in touches[n])]
    if coupled:
        descend([n for n in names if n not in coupled])
        held = {k: v for k, v in perms.items() if k not in coupled}
        for name in coupled:
            perms[name] = lap(group_score(name, held, _best_replicas))
    descend(names)
    return perms
