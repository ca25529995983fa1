"""Weight matching (Git Re-Basin, permutation coordinate descent; no data): permutations of B's
groups from the weights alone, and the weights' scores activation matching breaks its ties with.

For each group g in a random order, holding the other groups' permutations, maximise the summed
inner products of the weights that g touches,

    P_g = argmax_P  sum_{W, axis d containing g}  < W_A[g-view],  W_B'[P, g-view] >_F

where the g-view gathers, along axis d, the R positions of each of g's channels (a flattened
feature map repeats a channel over spatial positions; a Kronecker layout repeats it per block) and
flattens everything else, with the other groups' current permutations already applied to B. Where
axis d is a grouped conv's per-group axis (a PerBlock: row block j of axis a is permuted by its
own expression e_j), g's term is the sum over the blocks whose e_j contains g, each g-view taken
from that block's rows only:

    sum_{j: g in e_j}  < W_A[rows of block j][g-view of e_j],  W_B'[rows of block j][P, g-view of e_j] >_F.

The descent repeats until no group changes; it runs from the identity and from a pairing-free
start (each unit's weights sorted), and the larger objective is kept (``weight_matching``).
Groups replicated over other groups on one axis (heads x head dims) start from a pairing-free
estimate instead of the identity (see ``weight_matching``).
"""

from __future__ import annotations

import numpy as np
import torch

from graphrepair.discovery import axes as ax
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.merging.assign import lap, lap_each


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


class WeightScores:
    """The weights' side of alignment: for a group g, the (|g|, |g|) matrix of summed inner
    products of A's and B's weights that g touches (see the module doc), with B's other groups
    permuted as given; ``groups`` restricts it to some groups. Weight matching maximises it;
    activation matching breaks its ties with its cosine form (``cosine``)."""

    def __init__(self, spec: PermutationSpec, state_a: dict, state_b: dict, groups=None):
        self.spec = spec
        names = set(g.name for g in spec.groups) if groups is None else set(groups)
        # the (param, axis) pairs each group touches, with the positions of its channels there (and,
        # on a grouped conv's per-group axis, the row block they are read in)
        self.touches: dict[str, list[tuple[str, int, torch.Tensor, tuple | None]]] = {}
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
            self.touches[g.name] = items
        self.state_a, self.state_b = state_a, state_b  # read, never copied whole (see ``views``)
        self._norms: dict[str, torch.Tensor] = {}  # A's units' norms, per group
        self._deps: dict[str, tuple[str, ...]] = {}  # the groups each group's views read
        # per group, the last block of cosines (rows, cols, the permutations it read, the block)
        self._last: dict[str, tuple] = {}

    def mixes(self, name: str) -> bool:
        """Whether group ``name`` is replicated over other groups on one of its axes."""
        return any(ax.mixes(self.spec.param_axes[key][axis]) for key, axis, _, _ in self.touches[name])

    def views(self, name: str, held: dict, units_a=None, units_b=None):
        """(A's g-view, B's g-view) of every tensor group ``name`` touches, in float64, B's
        groups in ``held`` permuted as given there; ``units_a``, ``units_b``: only those units of
        A's and of B's view (the tie-break scores a few units of a wide layer). Only the touched
        channels are gathered and widened (no float64 copy of either model is kept), and B's are
        gathered through the axis's own index before its other axes are permuted, not after
        permuting the whole tensor: the same values, at |g| R / n of the cost (ViT-B/16's 288
        attention groups: 10.8 s -> 0.8 s)."""
        vp = {self.spec.var_of_group[k]: v for k, v in held.items()}
        for key, axis, pos, rows in self.touches[name]:
            a, b, exprs = self.state_a[key].detach(), self.state_b[key].detach(), self.spec.param_axes[key]
            pos_a = pos if units_a is None else pos[units_a]
            pos_b = pos if units_b is None else pos[units_b]
            wa = _replicas(a, axis, pos_a, rows).double()
            if rows is not None or any(isinstance(e, ax.PerBlock) for e in exprs):
                yield wa, _replicas(ax.permute_tensor(b, exprs, vp), axis, pos_b, rows).double()
                continue
            idx = ax.index(exprs[axis], vp)[pos_b].to(b.device)  # (|g|, R) positions in B's own order
            sub = b.index_select(axis, idx.reshape(-1))
            rest = [ax.Fixed(n) if d == axis else e for d, (e, n) in enumerate(zip(exprs, sub.shape))]
            sub = ax.permute_tensor(sub, rest, vp)
            yield wa, sub.movedim(axis, 0).reshape(pos_b.shape[0], pos_b.shape[1], -1).double()

    def score(self, name: str, held: dict, pairing=None, rows=None, cols=None) -> torch.Tensor:
        """(|g|, |g|) summed ``pairing`` (default: inner products) of A's and B's weights that
        group ``name`` touches, with the groups in ``held`` permuted as given there; ``rows``,
        ``cols``: only A's units ``rows`` against B's units ``cols`` (|rows|, |cols|)."""
        return self._score(name, held, pairing, rows, cols)[0]

    def _score(self, name: str, held: dict, pairing=None, rows=None, cols=None):
        """(``score``, the squared norms of B's units ``cols`` in the same views)."""
        pairing = pairing or _inner
        size = self.spec.group(name).size
        total = torch.zeros(size if rows is None else len(rows), size if cols is None else len(cols),
                            dtype=torch.float64)
        norms_b = torch.zeros(total.shape[1], dtype=torch.float64)
        # only the units asked for are gathered (not the whole group, then a few of its rows)
        units_a = None if rows is None else rows.cpu()
        units_b = None if cols is None else cols.cpu()
        for wa, wb in self.views(name, held, units_a, units_b):
            total += pairing(wa, wb).cpu()
            norms_b += wb.flatten(1).square().sum(1).cpu()
        return total, norms_b

    def objective(self, perms: dict) -> float:
        """The summed inner products of A's and B's weights (B permuted by ``perms``) over every
        tensor the groups touch."""
        vp = {self.spec.var_of_group[k]: v for k, v in perms.items()}
        keys = {key for items in self.touches.values() for key, _, _, _ in items}
        return sum(float((self.state_a[k].detach().double()
                          * ax.permute_tensor(self.state_b[k].detach(), self.spec.param_axes[k], vp).double()).sum())
                   for k in sorted(keys))

    def depends(self, name: str) -> tuple[str, ...]:
        """The other groups whose permutations group ``name``'s views read (every group on an
        axis of a tensor it touches)."""
        if name not in self._deps:
            name_of = {v: k for k, v in self.spec.var_of_group.items()}
            found = {name_of[v.id] for key, _, _, _ in self.touches[name] for e in self.spec.param_axes[key]
                     for v in ax.variables(e) if v.id in name_of}
            found.discard(name)
            self._deps[name] = tuple(sorted(found))
        return self._deps[name]

    def cosine(self, name: str, held: dict, rows=None, cols=None) -> torch.Tensor:
        """``score`` divided by the norms of A's unit i and B's unit j (all the weights each
        touches): in [-1, 1], and 0 where a unit has no weights at all. ``rows``, ``cols``: as for
        ``score``. A's norms are the same whatever the permutations and are kept; B's are taken
        from the same views as the score, since they may depend on the other groups: a part of
        a Wreath family reads B's slot that the order puts in its place (``axes.Wreath``).

        A block (``rows``, ``cols``) asked for again while the groups it reads (``depends``) hold
        the same permutations is not gathered and multiplied again: the last one is kept per
        group and its columns reordered when ``cols`` are the same units in another order (the
        tie-break's rounds re-ask every tied group, and the merge then counts what the weights
        decided on the same blocks)."""
        deps = {h: held.get(h) for h in self.depends(name)}
        if rows is not None and cols is not None:
            last = self._last.get(name)
            if last is not None and torch.equal(last[0], rows) and _same_perms(last[2], deps):
                pos = _positions(last[1], cols)
                if pos is not None:
                    return last[3][:, pos]
        c = self._cosine(name, held, rows, cols)
        if rows is not None and cols is not None:
            self._last[name] = (rows.clone(), cols.clone(), deps, c)
        return c

    def _cosine(self, name: str, held: dict, rows, cols) -> torch.Tensor:
        if name not in self._norms:
            na = 0.0
            for wa, _ in self.views(name, {}):
                na = na + wa.flatten(1).square().sum(1).cpu()
            self._norms[name] = torch.as_tensor(na).sqrt()
        na = self._norms[name]
        na = na if rows is None else na[rows]
        s, nb = self._score(name, held, rows=rows, cols=cols)  # on the CPU, as the norms
        denom = na[:, None] * nb.sqrt()[None, :]
        return torch.where(denom > 0, s / denom.clamp_min(1e-300), torch.zeros_like(s)).clamp(-1.0, 1.0)


def _same_perms(a: dict, b: dict) -> bool:
    """Whether two {group: permutation or None} maps hold the same permutations."""
    return a.keys() == b.keys() and all(
        a[k] is b[k] or (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k])) for k in a)


def _positions(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
    """pos with old[pos] == new when ``new`` holds the units of ``old`` in some order, else None."""
    if old.shape != new.shape:
        return None
    order = old.argsort()
    found = order[torch.searchsorted(old[order], new).clamp_max(len(old) - 1)]
    return found if torch.equal(old[found], new) else None


def _sorted_values(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Inner products of A's channel i's and B's channel j's weights, each sorted: the same
    whatever the other groups' permutations (the pairing-free start of ``weight_matching``)."""
    return wa.flatten(1).sort(1).values @ wb.flatten(1).sort(1).values.T


def weight_matching(spec: PermutationSpec, state_a: dict, state_b: dict, *, groups=None,
                    init: dict[str, torch.Tensor] | None = None, max_iter: int = 100,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Git Re-Basin's permutation coordinate descent over the discovered spec (see module doc).

    ``groups`` restricts the descent to some groups (the others keep ``init``).

    Two starts, the larger objective (the summed inner products of all the weights the groups
    touch) kept, the identity's on a tie:
    - the identity (Git Re-Basin's start);
    - each group alone, from the sorted values of each unit's weights: <sort(a_i), sort(b_j)>
      does not depend on the other groups' permutations, and is largest where b_j = a_i. From the
      identity, each group's score is dominated by its neighbours' still random pairing and the
      descent stalls in a local optimum: on a permuted copy of a random-init torchvision
      MobileNetV2, 22 of its 25 groups end wrong (objective 40583 where the truth has 51600);
      from the sorted start none do."""
    families, held_orders = spec.wreaths
    names = [g.name for g in spec.groups if g.name not in held_orders] if groups is None else \
        [n for n in groups if n not in held_orders]
    base = {g.name: torch.arange(g.size) for g in spec.groups}
    if init:
        spec.checked(init)  # validated once; the descent only makes permutations
        base.update({k: torch.as_tensor(v, dtype=torch.long).cpu().clone() for k, v in init.items()})
    scores = WeightScores(spec, state_a, state_b, names)
    rng = np.random.default_rng(seed)
    free = [n for n in names if not (init and n in init)]
    orders = {n: families[n] for n in names if n in families}
    # Groups replicated over other groups on one axis (heads x head dims): coordinate descent
    # from the identity pairs their replicas wrongly and stalls. First the other groups, then
    # these from a pairing-free start (each A replica's best match among B's), then all together.
    coupled = [n for n in free if scores.mixes(n)]

    def move_slots(perms: dict, name: str, pairing=None) -> bool:
        """One step for a Wreath family's order (``WreathFamily``): B's current slots (each with
        the permutation inside it) are assigned to A's slots as wholes, H maximising the summed
        inner products of A's slot a and B's current slot H(a); each part travels with its slot."""
        score = scores.score(name, perms, pairing)
        h = lap(score)
        same = torch.arange(len(h))
        if torch.equal(h, same) or not score[same, h].sum() > score[same, same].sum() + 1e-12:
            return False
        perms[name] = perms[name][h]
        for key in orders[name].parts:
            old = [perms[n] for n in key]
            for a, n in enumerate(key):
                perms[n] = old[int(h[a])]
        return True

    def descend(perms: dict, active: list[str]) -> None:
        for _ in range(max_iter):
            changed = False
            for gi in rng.permutation(len(active)):
                name = active[gi]
                if name in orders:
                    changed |= move_slots(perms, name)
                    continue
                score = scores.score(name, {k: v for k, v in perms.items() if k != name})
                size = score.shape[0]
                new = lap(score)
                old = perms[name]
                if (score[torch.arange(size), new].sum() > score[torch.arange(size), old].sum() + 1e-12
                        and not torch.equal(new, old)):
                    perms[name] = new
                    changed = True
            if not changed:
                return

    def run(perms: dict) -> dict:
        if coupled:
            descend(perms, [n for n in names if n not in coupled])
            held = {k: v for k, v in perms.items() if k not in coupled}
            for name in sorted(coupled, key=lambda n: n not in orders):  # orders first: parts read them
                if name in orders:
                    family = [name] + [p for key in orders[name].parts for p in key]
                    trial = {**held, **{k: perms[k] for k in family}}
                    move_slots(trial, name, _best_replicas)
                    perms.update({k: trial[k] for k in family})
                    held[name] = perms[name]
                    continue
                perms[name] = lap(scores.score(name, {k: v for k, v in held.items() if k != name},
                                               _best_replicas))
        descend(perms, names)
        return perms

    best = run(dict(base))
    start = dict(base)
    alone = [name for name in free if name not in coupled]  # each group's start from its own weights
    start.update(zip(alone, (perm for _, perm in lap_each(scores.score(name, {}, _sorted_values)
                                                          for name in alone))))
    if all(torch.equal(start[n], best[n]) for n in names):
        return best
    other = run(start)
    ob, oo = scores.objective(best), scores.objective(other)
    return other if oo > ob + 1e-12 * abs(ob) else best
