"""Activation matching: permutations of B's groups that make B's units line up with A's, from
the A-B correlations of one joint pass.

Activation matching (REPAIR, Git Re-Basin): for each group g, with corr_g[i, j] the correlation of
A's channel i and B's channel j over the fitting data (``stats.py``), solve

    P_g = argmax_P  sum_i corr_g[i, P(i)]          (``assign.lap``)

so that B' = B.index_select(axis, P_g) puts B's best match for A's channel i at position i.
Groups coupled at a shared tensor (heads x head dims) are solved jointly, see ``activation_perms``.

Ties. The correlations are rounded to multiples of TIE_GRID = 2^-17 (about 7.6e-6) before each
assignment, so that statistics which differ only by the order their sums were added in (one
process or several, another thread count) give the same matrix; what then ties (dead units, whose
correlations are exactly 0, and correlations equal to within rounding) is resolved by the
solver's fixed order on that identical matrix, the same whatever the number of ranks. Where
the weights are given (``prepare.align_pair`` always gives them), they break these ties first: a
term w cos(W_A,i, W_B,j) too small to outweigh one grid step (``activation_perms``); the units
still tied are counted (``unsignalled``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from graphrepair.discovery import axes as ax
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.merging.assign import lap, lap_each


TIE_GRID = 2.0 ** -17


def tie_safe(corr: torch.Tensor) -> torch.Tensor:
    """``corr`` rounded to multiples of ``TIE_GRID`` (float64, a new tensor; see the module doc),
    in one float64 tensor written in place (a wide layer's matrix is tens of megabytes)."""
    return (corr.double() / TIE_GRID).round_().mul_(TIE_GRID)


def activation_perms(spec: PermutationSpec, stats, max_rounds: int = 50,
                     weights: "weight_match.WeightScores | None" = None, tie_rounds: int = 5,
                     blind: dict | None = None) -> dict[str, torch.Tensor]:
    """One linear assignment per group on its correlation (``stats``: a ``stats.PairStats``).

    Ties broken by the weights (``weights``, a ``WeightScores``): what the rounded correlations
    cannot tell apart (``unsignalled``: dead units, whose correlations are all 0; units with equal
    activations) is decided by how alike A's and B's units' weights are. After the assignment P
    on the rounded correlations alone, let U be A's units matched without signal and P(U) their
    matches; the assignment of U onto P(U) is solved again, maximising

        sum_{i in U}  tie_safe(corr_g)[i, Q(i)] + w S_g[i, Q(i)],     w = TIE_GRID / (4 |U|)

    over the bijections Q: U -> P(U), with S_g the cosine of A's unit i's and B's unit j's weights
    (``WeightScores.cosine``, the other groups permuted as last found). The weight term of any Q
    lies in [-TIE_GRID / 4, TIE_GRID / 4], less than one step of the rounded correlations' sum: a Q
    with a larger summed rounded correlation always wins (P restricted to U is one of them, so
    the group's summed correlation never drops), and among those with the largest the weights
    decide. Only U x P(U) is scored and solved (a few units of a wide layer, not the whole
    layer again). Up to ``tie_rounds`` rounds re-solve every such group with S_g from the others'
    latest permutations, until none changes. The parts of a Wreath family (``wreath_perms``) are
    such groups too, on their slot's block against the B slot the order gives it (an exchange
    inside a slot leaves the family's optimum as it is); coupled groups (below) keep the
    correlations alone.

    Groups that share a tensor with other groups (split-head attention: heads x head dims,
    ``PairStats.coupled``) are solved jointly: at such a node the correlation of A's channel i with
    B's channel j depends on how the other groups' positions are paired,

        corr_g[i, j] = mean_r  C[pos_g(i, r), Q_g(pos_g(j, r))]

    (C the correlation of every pair of positions of the node's joint channel space, pos_g the
    positions of g's channels, Q_g the gather index of the other groups' current permutations).
    Started from a pairing-free estimate (each A position's best match among B's replicas),
    coordinate ascent solves one group at a time until no group changes; every step can only
    raise the summed correlation.

    ``blind``: a dict given to be filled with ``blind_units`` of each group solved alone on its
    rounded correlations as gathered (what ``unsignalled`` reads afterwards, not found twice)."""
    # whole groups of channels (Wreath families, e.g. a grouped conv's groups): solved exactly
    # from their joint points, or kept in place where they have none (``wreath_perms``)
    perms = wreath_perms(spec, stats)
    done = set(perms)
    # a rounded matrix per group being solved (a model's correlations can take gigabytes: as
    # many at once as threads solve them, ``assign.lap_each``); kept, as its U x P(U) block,
    # only for the groups with units matched without signal
    tied = {}

    def ties(g: str, r: torch.Tensor, perm: torch.Tensor, found=None):
        if weights is not None and g in weights.touches:
            u = _without_signal(r, perm, found).nonzero().flatten().cpu()  # perms are on the CPU
            if len(u) > 1:  # U, P(U) and the rounded block U x P(U), on the CPU as lap wants it
                return u, perm[u], r[u][:, perm[u]].cpu()
        return None

    # each group alone: what it gives does not depend on the other groups. Its dead units may
    # come in any order among themselves (``assign``, "Dead units in any order"): the weights
    # order them below, and what the correlations decide (how the live units pair) is scipy's
    alone = [g for g, c in stats.corr.items() if g not in stats.coupled and g not in done]
    for g, (r, perm) in zip(alone, lap_each((tie_safe(stats.corr[g]) for g in alone), dead_any_order=True)):
        perms[g] = perm
        found = None
        if blind is not None:
            found = blind[g] = blind_units(r)
        t = ties(g, r, perm, found)
        if t is not None:
            tied[g] = t
    families, held = spec.wreaths
    orders = set(families) | held
    for g in [h.name for h in spec.groups if h.name in done and h.name not in orders]:
        # a part of a family solved from its joint points: its slot's block against the B slot
        # the order pairs it with (``paired_corr``); the weights break its ties like any group's
        t = ties(g, tie_safe(paired_corr(spec, stats, g, perms)), perms[g])
        if t is not None:
            tied[g] = t
    # a group's step reads only the permutations of the groups its weights share a tensor with
    # (``WeightScores.depends``; U, P(U) and its block are fixed): one whose neighbours hold the
    # permutations of its last step would find what it found, and is not solved again
    last: dict[str, dict] = {}
    for _ in range(tie_rounds if tied else 0):
        changed = False
        for g in [h.name for h in spec.groups if h.name in tied]:
            near = {h: perms.get(h) for h in weights.depends(g)}
            if g in last and all(last[g][h] is p for h, p in near.items()):
                continue
            last[g] = near  # permutations are replaced, never changed in place
            u, cols, block = tied[g]
            held = {h: p for h, p in perms.items() if h != g}
            q = lap(block + TIE_GRID / (4 * len(u)) * weights.cosine(g, held, rows=u, cols=cols))
            new = perms[g].clone()
            new[u] = cols[q]
            if not torch.equal(new, perms[g]):
                perms[g], changed = new, True
        if not changed:
            break
    coupled = [g for g in stats.coupled if g not in done]
    if not coupled:
        return perms

    def best(jp, pos):  # each A replica's best match among B's: (|g|, |g|, R, R) -> (|g|, |g|)
        return jp.corr[pos[:, None, :, None], pos[None, :, None, :]].max(-1).values.mean(-1)

    for g in coupled:  # start from the pairing-free estimate
        perms[g] = lap(tie_safe(_coupled_mean(spec, stats, g, best)))
    for _ in range(max_rounds):
        changed = False
        for g in coupled:
            p = lap(tie_safe(coupled_corr(spec, stats, g, perms)))
            if not torch.equal(p, perms[g]):
                perms[g], changed = p, True
        if not changed:
            break
    return perms


def _wreath_points(spec: PermutationSpec, stats, fam) -> list[torch.Tensor] | None:
    """For each layout of a Wreath family (``PermutationSpec.wreaths``), the mean of the A-B
    correlations at the joint points that carry exactly that layout (k*s, k*s); None when some
    layout has no such point (its slots' pairing was not measured). Computed once per pass and
    kept in ``stats.wreath``."""
    if fam.order in stats.wreath:
        return stats.wreath[fam.order]
    order = spec.var_of_group[fam.order]
    out = []
    for key in fam.parts:
        ids = tuple(spec.var_of_group[n] for n in key)
        found = [jp.corr for jp in stats.joint.values()
                 if isinstance(jp.expr, ax.Wreath) and isinstance(jp.expr.outer, ax.Var)
                 and jp.expr.outer.id == order and tuple(getattr(p, "id", None) for p in jp.expr.parts) == ids]
        if not found:
            out = None
            break
        total = found[0].double().clone()
        for c in found[1:]:
            total += c.double()
        out.append(total / len(found))
    stats.wreath[fam.order] = out
    return out


def wreath_perms(spec: PermutationSpec, stats) -> dict[str, torch.Tensor]:
    """The permutations of every Wreath family's groups (whole slots of channels moving, each
    slot reordered inside; ``axes.Wreath``), and identities for the order groups kept in place.

    For a family with k slots of s positions in each of its layouts L (a grouped conv's input
    groups and its output groups share one order), let C_L be L's mean A-B correlation (k*s x
    k*s, from the joint points) and C_L[a, J] the s x s block of A's slot a against B's slot J.
    The best permutation inside a pairing of A's slot a with B's slot J is one linear assignment,
    worth v_L(a, J) = max_p sum_b C_L[a, J][b, p(b)]; the order is the assignment of slots

        G = argmax_G  sum_a sum_L v_L(a, G(a)),

    and slot a of layout L takes the best p for (a, G(a)). This maximises the summed correlation
    over all orders and all permutations inside the slots together (k^2 small assignments per
    layout, then one of k x k). A family some layout of which has no joint point (its space was
    larger than ``stats.JOINT_MAX``, or it is observed nowhere) keeps its slots in place: its
    parts are then ordinary groups (their correlations as gathered pair slot a with slot a)."""
    families, held = spec.wreaths
    perms = {name: torch.arange(spec.group(name).size) for name in held}
    for fam in families.values():
        blocks = _wreath_points(spec, stats, fam)
        k = spec.group(fam.order).size
        if blocks is None:
            perms[fam.order] = torch.arange(k)
            continue
        value = np.zeros((k, k))
        best = []
        for c, s in zip(blocks, fam.slots):
            r = np.nan_to_num(tie_safe(c).cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
            r = r.reshape(k, s, k, s).transpose(0, 2, 1, 3)  # [A slot, B slot, A pos, B pos]
            cols = np.empty((k, k, s), dtype=np.int64)
            for a in range(k):
                for j in range(k):
                    rows, cols[a, j] = linear_sum_assignment(r[a, j], maximize=True)
                    value[a, j] += r[a, j][rows, cols[a, j]].sum()
            best.append(cols)
        order = lap(torch.as_tensor(value))
        perms[fam.order] = order
        for key, cols in zip(fam.parts, best):
            for a, name in enumerate(key):
                perms[name] = torch.as_tensor(cols[a, int(order[a])], dtype=torch.long)
    return perms


def paired_corr(spec: PermutationSpec, stats, g: str, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Group ``g``'s correlation matrix under the other groups' permutations ``perms``: row i,
    column perms[g][i] is the correlation of A's unit i and its match. A part of a Wreath family
    solved from its joint points: its slot's block against B's slot the order gives it; the
    order itself: per pair of slots, the mean correlation of the positions paired inside them
    (by A's slot's part); a coupled group: ``coupled_corr``; else as gathered."""
    families, _ = spec.wreaths
    fam = next((f for f in families.values() if g == f.order or any(g in key for key in f.parts)), None)
    blocks = None if fam is None else _wreath_points(spec, stats, fam)
    if blocks is not None:
        k = spec.group(fam.order).size
        order = perms[fam.order]
        layouts = [(key, c.cpu().reshape(k, s, k, s), s) for key, c, s in zip(fam.parts, blocks, fam.slots)]
        for key, c, _ in layouts:
            if g in key:  # a part: its slot against the B slot the order pairs it with
                a = key.index(g)
                return c[a, :, int(order[a])]
        total = torch.zeros(k, k, dtype=torch.float64)
        for key, c, s in layouts:  # the order: A's slot a against every B slot, paired by part a
            for a, name in enumerate(key):
                total[a] += c[a][torch.arange(s), :, perms[name]].mean(0)
        return total / len(layouts)
    if g in stats.coupled:
        return coupled_corr(spec, stats, g, perms)
    return stats.corr[g]


@functools.lru_cache(maxsize=64)
def _hash_vectors(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, 2) random integers for ``_blind``'s hashes (made once per size: the same every call)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 2 ** 18 if n <= 2 ** 16 else 2 ** 10, (n, 2), generator=g).to(dtype=dtype, device=device)


def _repeated(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows of ``keys`` (n, k): (each row's position in their lexicographic order, and
    whether the row there equals the row before it). k stable sorts, one per column, last first."""
    order = torch.arange(keys.shape[0], device=keys.device)
    for col in range(keys.shape[1] - 1, -1, -1):
        order = order[torch.sort(keys[order, col], stable=True).indices]
    s = keys[order]
    same = torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    same[1:] = (s[1:] == s[:-1]).all(1)
    return order, same


def _blind(rounded: torch.Tensor) -> torch.Tensor:
    """Rows of ``rounded`` (correlations on the TIE_GRID) that tell nothing apart: all zero (a
    dead unit: every correlation 0) or equal to another row (units whose activations are the
    same). Rows are hashed by two exact integer hashes (the rows times random integer vectors:
    every value is an integer multiple of TIE_GRID, so float64 adds them without rounding below
    2^53); rows whose hashes repeat are candidates, each compared with the first row of its run
    of equal hashes. Where every candidate equals its run's first row (always, but for a hash
    collision) that decides it; otherwise the candidate rows are compared all together (a sort of
    the rows themselves). All-zero rows are known at once and left out of the hashes' repeats
    (a deep ReLU layer has dozens). The same answer as comparing every pair of rows, at the cost
    of one (n, n) x (n, 2) product and two sorts of n numbers."""
    n = rounded.shape[0]
    blind = (rounded == 0).all(1)
    if n < 2:
        return blind
    keys = rounded @ _hash_vectors(rounded.shape[1], rounded.dtype, rounded.device)
    keys[blind] = float("nan")  # dead rows are known; as NaN (equal to nothing) they repeat no row
    order, same = _repeated(keys)
    if not bool(same.any()):
        return blind
    run = torch.cumsum(~same, 0) - 1  # run of equal hashes, per sorted position
    starts = order[(~same).nonzero().flatten()]  # the first row of each run
    size = torch.bincount(run)
    in_run = size[run] > 1
    rows, first = order[in_run], starts[run[in_run]]
    if bool((rounded[rows] == rounded[first]).all()):
        blind[rows] = True
        return blind
    _, inv, cnt = torch.unique(rounded[rows], dim=0, return_inverse=True, return_counts=True)
    blind[rows] |= cnt[inv] > 1
    return blind


def blind_units(rounded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A's units, B's units) that the rounded correlations ``rounded`` (``tie_safe``) cannot
    tell apart (``_blind`` of its rows and of its columns): what ``unsignalled`` reads."""
    return _blind(rounded), _blind(rounded.T)


def _without_signal(rounded: torch.Tensor, perm: torch.Tensor, blind=None) -> torch.Tensor:
    """Mask of A's units matched without activation signal (see ``unsignalled``); ``blind``:
    ``blind_units(rounded)``, when already known."""
    rows, cols = blind if blind is not None else blind_units(rounded)
    return rows | cols[perm.to(cols.device)]


def unsignalled(rounded: torch.Tensor | None, perm: torch.Tensor,
                cosine: torch.Tensor | None = None, blind=None) -> tuple[int, int]:
    """(units matched without activation signal, those of them the weights did not decide either)
    for one group: ``rounded`` its rounded correlations (``tie_safe``), ``perm`` its assignment,
    ``cosine`` its weights' ``WeightScores.cosine`` under the final permutations (the matrix, or a
    function of (rows, cols) giving that block); ``blind``: ``blind_units(rounded)`` when already
    known (``activation_perms`` keeps them), then ``rounded`` is not read.

    A's unit i is matched without activation signal when its row of rounded correlations, or
    the column of its match P(i), is all zero (a dead unit, in A or in B: zero variance at every
    point) or equal to another row (column): activations cannot tell such units apart, so any
    exchange among them leaves the summed correlation as it is. (A value that merely coincides
    with another on the rounding grid is no tie: the rest of the row tells the units apart.)
    The weights decided it when no other column matched to such a unit has the same cosine with
    i as P(i), on the same grid; otherwise nothing did (tied weights too, or a unit with no
    weights): the match is arbitrary."""
    without = _without_signal(rounded, perm, blind).cpu()
    n = int(without.sum())
    if cosine is None or n == 0:
        return n, n
    u = without.nonzero().flatten()
    # rows: those units; columns: their matches (``cosine`` a matrix, or a function of them)
    c = tie_safe(cosine(u, perm[u]) if callable(cosine) else cosine[u][:, perm[u]])
    arbitrary = (c == c.diagonal()[:, None]).sum(1) > 1
    return n, int(arbitrary.sum())


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
