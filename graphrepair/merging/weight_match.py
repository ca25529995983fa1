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

What a step costs, and what it need not (a 156M LLaMA: 453 s before, most of it re-doing steps
whose answer was known):
- g's score is a sum over the tensors it touches, and each term reads only the groups on that
  tensor's other axes. The terms are summed in parts, one per set of neighbours they read
  (``WeightScores.parts``: a residual stream's embedding, head and norms read nothing else, each
  block's weights read that block's groups), and a part is kept and made again only when one of
  its groups moved: the stream's score after a step of one block remakes that block's part only.
- A step is a function of g's neighbours' permutations and g's own: a group whose neighbours and
  own permutation are those after its last step would find what it found, and is not scored or
  solved again.
- The groups of one sweep that do not read each other (a LLaMA's MLP groups read only the
  stream) have their assignments solved side by side (``assign.lap_each``), in the sweep's order,
  each through its reduced form (``assign.lap_each(reduced=True)``: every row and column starts
  with a zero; a LLaMA MLP group's solve 0.50-0.58 s -> 0.35-0.40 s).
- The sorted start's matrices are near rank one, where the solver's paths run long: it gets them
  less exact column constants, which keep its answer (``_eased``, whose power iteration stops
  once its vector settles: after 3 steps on such a matrix, not 30).
- The inner products, the sorted start's and the heads' best replicas (``_best_replicas``) are
  taken in the weights' own precision, at least float32 (``WeightScores(products="own")``,
  ``_own_precision``), as Git Re-Basin takes them, and summed in float64: float64 products of
  float32 weights cost twice the time and a widened copy of every view (the LLaMA:
  ``weight_matching`` 32.8 -> 28.7 s for the descent's products; 35.6 -> 29.4 s for the sorted
  start's and the best replicas', with the reduced solves). The sorted start's near rank-one
  matrices are full of near-ties: on two independently initialised LLaMAs, whose weights hold
  no pairing to find, float32 products move 26 of their 33 groups (objective 19182.30 ->
  19186.27, a little higher), while the zoo's permutations, by weight and by activation
  matching, and torchvision's by weight matching, are the same. The objective that picks
  between the two starts stays float64.
The permutations are those of the plain descent: the same steps decide the same way (a part sum
adds the same terms in another order, and a float32 product rounds where a float64 one would
not: a score's last bits may differ, which matters for ties only; the zoo's reference
permutations, ``tests/test_weight_match_speed.py``, are those of float64 products).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from graphrepair.discovery import axes as ax
from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import GraphRepairError
from graphrepair.merging.assign import lap, lap_each, workers


def _replicas(t: torch.Tensor, axis: int, pos: torch.Tensor, rows: tuple | None = None,
              widen: bool = True, keep_layout: bool = False, to: torch.dtype = torch.float64) -> torch.Tensor:
    """(|g|, R, everything else): channel c's R positions pos[c] along ``axis``, each with all
    other axes flattened; ``rows`` = (row axis, start, length) first narrows to one row block.
    ``widen``: in float64; ``keep_layout``: in the strides it has, in dtype ``to`` (see ``_block``)."""
    if rows is not None:
        t = t.narrow(*rows)
    m = t.movedim(axis, 0)
    if not (pos.shape[1] == 1 and _identity(pos[:, 0], m.shape[0])):  # else: every channel, in order
        m = m[pos.to(t.device)]
    return _block(m, pos.shape[0], pos.shape[1], widen, keep_layout, to)


# A's views of a few units are kept per group up to this many float64 numbers (32 MB; a few units
# of a residual stream read the whole embedding)
_KEEP_ROWS = 1 << 22


def _identity(index: torch.Tensor, n: int) -> bool:
    """Whether ``index`` is 0, 1, ..., n - 1 (a gather by it would only copy)."""
    return index.shape[0] == n and bool((index == torch.arange(n, device=index.device)).all())


# a tensor of at most this many elements is gathered without asking whether the index is the
# identity first: the question (three ops and a wait for the answer) costs more than the copy
_ASK_IDENTITY = 1 << 16


def _gather(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(axis, index)``; ``t`` itself where the index is the identity and ``t`` is
    large enough for that to be worth asking (the same values either way)."""
    if t.numel() > _ASK_IDENTITY and _identity(index, t.shape[axis]):
        return t
    return t.index_select(axis, index.to(t.device))


def _block(m: torch.Tensor, n: int, r: int, widen: bool, keep_layout: bool = False,
           to: torch.dtype = torch.float64) -> torch.Tensor:
    """``m`` (n r leading positions, then the other axes; any strides) as a contiguous
    (n, r, everything else) tensor, converted to float64 in the same copy when ``widen``; else as
    it is where a view can give it.

    ``keep_layout`` (for a matrix product only): widened in the layout ``m`` has where the
    (n, r, everything else) shape is a view of it, so that a transposed view stays transposed.
    Widening and transposing in one copy is the slow part of a view: a LLaMA MLP weight's
    transpose, 2816 x 1024, 10.1 ms against 0.85 ms widened as it lies. BLAS reads either layout
    (its packing lays the operands out alike: the products are the same here, bit for bit, and
    as fast); a sum along the rows (a norm) would not be. With ``keep_layout`` the view is in
    dtype ``to`` (``WeightScores``' products: float64, or the weights' own precision, where a
    float32 ``m`` is not copied at all unless the shape needs it)."""
    if not widen:
        return m.reshape(n, r, -1)
    if keep_layout:
        # the strides of a dense ``m`` are kept; a shape that is no view of them is laid out
        # contiguous by the reshape, from the widened copy (or from ``m`` itself in its own dtype)
        return (m if m.dtype == to else m.to(to, copy=True)).reshape(n, r, -1)
    out = torch.empty(m.shape, dtype=torch.float64, device=m.device)
    out.copy_(m)
    return out.reshape(n, r, -1)


def _inner(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """<A's channel i, B's channel j> over all their replicas: (|g|, |g|)."""
    return wa.flatten(1) @ wb.flatten(1).T


def _own_precision(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pairing-free scores multiply views of ``dtype`` in: the weights' own
    precision, at least float32, as the descent's products (``WeightScores(products="own")``);
    float64 where the caller lets float32 products run in TF32 or bfloat16."""
    if dtype == torch.float64 or torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    return torch.float32


def _best_replicas(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Each replica of A's channel i against its best match among B's channel j's: (|g|, |g|).
    The views come in the weights' own dtype (``views(widen=False)``), multiplied in
    ``_own_precision``; summed in float64."""
    to = _own_precision(wa.dtype)
    return torch.einsum("irk,jsk->ijrs", wa.to(to), wb.to(to)).max(-1).values.double().sum(-1)


class WeightScores:
    """The weights' side of alignment: for a group g, the (|g|, |g|) matrix of summed inner
    products of A's and B's weights that g touches (see the module doc), with B's other groups
    permuted as given; ``groups`` restricts it to some groups. Weight matching maximises it;
    activation matching breaks its ties with its cosine form (``cosine``)."""

    def __init__(self, spec: PermutationSpec, state_a: dict, state_b: dict, groups=None,
                 keep_bytes: int | None = None, products: str = "float64"):
        if products not in ("float64", "own"):
            raise GraphRepairError(f"products must be 'float64' or 'own', got {products!r}")
        self.spec = spec
        # the dtype of the inner products ``score`` sums: float64, or "own": the weights' own
        # precision, at least float32 (``weight_matching``'s descent; see the module doc)
        self.products = products
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
        self._read_sets: dict[str, list[frozenset[str]]] = {}  # ``_reads``, per group
        # per group, the last block of cosines (rows, cols, the permutations it read, the block)
        self._last: dict[str, tuple] = {}
        self._rows_a: dict[str, tuple] = {}  # per group, A's views of the last few units asked for (``_score``)
        # per group, the terms of the last block of a few of A's units against a few of B's: (A's
        # units, B's units, per tensor (the permutations it read, its inner products, B's squared norms))
        self._terms: dict[str, tuple] = {}
        self._plain: dict[str, bool] = {}  # ``plain``, per group
        self._few: dict[str, _FewUnits] = {}  # per group, the last block of a few units (``_few_block``)
        self._parts: dict[str, list[tuple[tuple[str, ...], list[int]]]] = {}  # see ``parts``
        # parts of scores kept, per (group, part): (the permutations they read, the part); at most
        # ``keep_bytes`` in all (default: one byte per weight touched, 64 MiB at least)
        self._kept: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}
        if keep_bytes is None:
            keys = {key for items in self.touches.values() for key, _, _, _ in items}
            keep_bytes = max(64 << 20, sum(state_a[k].numel() for k in keys))
        self._room = keep_bytes
        self.made = 0  # parts made (not taken from the kept ones): what the keeping saved shows here

    def mixes(self, name: str) -> bool:
        """Whether group ``name`` is replicated over other groups on one of its axes."""
        return any(ax.mixes(self.spec.param_axes[key][axis]) for key, axis, _, _ in self.touches[name])

    def views(self, name: str, held: dict, units_a=None, units_b=None, items=None, widen: bool = True,
              known_a: list | None = None, keep_layout: bool = False):
        """(A's g-view, B's g-view) of every tensor group ``name`` touches, in float64, B's
        groups in ``held`` permuted as given there; ``units_a``, ``units_b``: only those units of
        A's and of B's view (the tie-break scores a few units of a wide layer). Only the touched
        channels are gathered and widened (no float64 copy of either model is kept), and B's are
        gathered through the axis's own index before its other axes are permuted, not after
        permuting the whole tensor: the same values, at |g| R / n of the cost (ViT-B/16's 288
        attention groups: 10.8 s -> 0.8 s). ``items``: only those of the tensors (indices into
        ``touches[name]``); not ``widen``: in the weights' own dtype. ``known_a``: A's views of
        ``units_a``, one per tensor, as an earlier call gave them (they do not depend on ``held``).
        ``keep_layout``: in the layout they have (``_block``) and in the products' dtype
        (``products``), for matrix products only."""
        vp = {self.spec.var_of_group[k]: v for k, v in held.items()}
        touched = self.touches[name]
        for k, (key, axis, pos, rows) in enumerate(touched if items is None else [touched[i] for i in items]):
            a, b, exprs = self.state_a[key].detach(), self.state_b[key].detach(), self.spec.param_axes[key]
            pos_a = pos if units_a is None else pos[units_a]
            pos_b = pos if units_b is None else pos[units_b]
            to = self._product_dtype(a) if keep_layout else torch.float64
            wa = known_a[k] if known_a is not None else _replicas(a, axis, pos_a, rows, widen, keep_layout, to)
            if rows is not None or any(isinstance(e, ax.PerBlock) for e in exprs):
                yield wa, _replicas(ax.permute_tensor(b, exprs, vp), axis, pos_b, rows, widen, keep_layout, to)
                continue
            # (|g| R) positions in B's own order: the positions themselves where the axis is g's
            # alone and g's permutation is not held (its index is then the identity)
            own = exprs[axis]
            idx = (pos_b if isinstance(own, ax.Var) and own.id not in vp else ax.index(own, vp)[pos_b]).reshape(-1)
            sub = _gather(b, axis, idx)
            for d, e in enumerate(exprs):  # the other axes, as ``axes.permute_tensor``; no gather by the identity
                if d != axis and not ax.is_fixed(e):
                    sub = _gather(sub, d, ax.index(e, vp))
            yield wa, _block(sub.movedim(axis, 0), pos_b.shape[0], pos_b.shape[1], widen, keep_layout, to)

    def _product_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype a view of ``t`` is multiplied in (``products``). Float32 only while float32
        matrix products are full float32 ones (``torch.set_float32_matmul_precision("highest")``,
        torch's default): where the caller allows TF32 or bfloat16 products, float64
        (``_own_precision``)."""
        return torch.float64 if self.products == "float64" else _own_precision(t.dtype)

    def score(self, name: str, held: dict, pairing=None, rows=None, cols=None) -> torch.Tensor:
        """(|g|, |g|) summed ``pairing`` (default: inner products) of A's and B's weights that
        group ``name`` touches, with the groups in ``held`` permuted as given there; ``rows``,
        ``cols``: only A's units ``rows`` against B's units ``cols`` (|rows|, |cols|). The
        whole inner-product score is summed part by part (``parts``), each part kept while the
        groups it reads hold the same permutations."""
        if pairing is None and rows is None and cols is None and len(self.parts(name)) > 1:
            return self._by_parts(name, held)
        return self._score(name, held, pairing, rows, cols, norms=False)[0]

    def _score(self, name: str, held: dict, pairing=None, rows=None, cols=None, items=None, norms=True):
        """(``score``, the squared norms of B's units ``cols`` in the same views, or None when not
        ``norms``); ``items``: only those of the tensors (``views``)."""
        pairing = pairing or _inner
        size = self.spec.group(name).size
        total = torch.zeros(size if rows is None else len(rows), size if cols is None else len(cols),
                            dtype=torch.float64)
        norms_b = torch.zeros(total.shape[1], dtype=torch.float64) if norms else None
        # only the units asked for are gathered (not the whole group, then a few of its rows)
        units_a = None if rows is None else rows.cpu()
        units_b = None if cols is None else cols.cpu()
        # B's units are multiplied in increasing order, then put in the order asked for: a GEMM's
        # last bits may depend on where a column lies (MKL's on AMD EPYC), and a block asked for
        # again with the same units in another order must be the block made afresh, bit for bit
        gathered_b, back = units_b, None
        if units_b is not None and len(units_b) > 1 and not bool((units_b[1:] > units_b[:-1]).all()):
            rank = units_b.argsort()
            gathered_b, back = units_b[rank], rank.argsort()
        widen = pairing is not _sorted_values and pairing is not _best_replicas  # (own dtype: see each)
        # A's views of a few units (the tie-break's rows, asked for again round after round with
        # other permutations held) are kept: they read no permutation
        known = self._rows_a.get(name) if units_a is not None and items is None and widen else None
        known_a = known[1] if known is not None and torch.equal(known[0], units_a) else None
        # a block of A's units against B's asked for again (the tie-break's next round, or the same
        # units in another order): each tensor's term whose other groups hold the permutations they
        # held is taken as made then (its columns reordered)
        few = units_a is not None and units_b is not None and items is None and norms and pairing is _inner
        terms = self._terms.get(name) if few else None
        order = None  # B's units as kept, where they are the units asked for in another order
        if terms is not None and torch.equal(terms[0], units_a):
            order = slice(None) if torch.equal(terms[1], units_b) else _positions(terms[1], units_b)
        if order is None:
            terms = None
        now = [{h: held.get(h) for h in (*reads, name)} for reads in self._reads(name)] if few else None
        todo = (list(range(len(now))) if terms is None else
                [k for k, perms in enumerate(now) if not _same_perms(terms[2][k][0], perms)]) if few else None
        if todo is not None and len(todo) < len(now):  # (a kept block: A's views are kept too)
            gen = self.views(name, held, units_a, gathered_b, todo,
                             known_a=None if known_a is None else [known_a[k] for k in todo])
        else:
            # inner products alone (no norm summed from B's views) read the views in any layout
            gen = self.views(name, held, units_a, gathered_b, items, widen=widen, known_a=known_a,
                             keep_layout=pairing is _inner and not norms)
        made_a, made = [], {}
        for k, (wa, wb) in enumerate(gen):
            made_a.append(wa)
            term = pairing(wa, wb).cpu()
            norm = wb.flatten(1).square().sum(1).cpu() if norms else None
            if back is not None:
                term, norm = term[:, back], None if norm is None else norm[back]
            if todo is not None:  # summed below, in the tensors' order (the same sums, bit for bit)
                made[todo[k]] = (term, norm)
                continue
            total += term
            if norms:
                norms_b += norm
        if todo is not None:
            held_terms = []
            for k, perms in enumerate(now):
                term, norm = made[k] if k in made else (terms[2][k][1][:, order], terms[2][k][2][order])
                total += term
                norms_b += norm
                held_terms.append((perms if k in made else terms[2][k][0], term, norm))
            if sum(t.numel() for _, t, _ in held_terms) <= _KEEP_ROWS:
                # the permutations read: replaced by the caller, never changed in place (``_same_perms``
                # compares them whole where they are other tensors)
                self._terms[name] = (units_a.clone(), units_b.clone(), held_terms)
        # (float64 views only: a view in the weights' own precision, ``products="own"``, would meet
        # a cosine's float64 views of B)
        if (units_a is not None and items is None and widen and known_a is None
                and (todo is None or len(todo) == len(now)) and sum(w.numel() for w in made_a) <= _KEEP_ROWS
                and all(w.dtype == torch.float64 for w in made_a)):
            self._rows_a[name] = (units_a.clone(), made_a)
        return total, norms_b

    def parts(self, name: str) -> list[tuple[tuple[str, ...], list[int]]]:
        """Group ``name``'s score in parts: (the other groups a part reads, the indices of its
        tensors in ``touches[name]``), in the order of their first tensor. A tensor reads the
        groups on its axes; tensors that read a common group are in one part, and those that read
        none (an embedding, a norm's weight) in one part of their own."""
        if name not in self._parts:
            reads = [set(found) or {None} for found in self._reads(name)]  # None: reads no other group
            up = list(range(len(reads)))

            def root(i: int) -> int:
                while up[i] != i:
                    up[i] = up[up[i]]
                    i = up[i]
                return i

            first: dict = {}
            for i, found in enumerate(reads):
                for h in found:
                    if h in first:
                        up[root(i)] = root(first[h])
                    else:
                        first[h] = i
            members: dict[int, list[int]] = {}
            for i in range(len(reads)):
                members.setdefault(root(i), []).append(i)
            self._parts[name] = [(tuple(sorted({h for i in items for h in reads[i]} - {None})), items)
                                 for items in members.values()]
        return self._parts[name]

    def _by_parts(self, name: str, held: dict) -> torch.Tensor:
        size = self.spec.group(name).size
        total = torch.zeros(size, size, dtype=torch.float64)
        for k, (reads, items) in enumerate(self.parts(name)):
            now = {h: held.get(h) for h in reads}
            kept = self._kept.get((name, k))
            if kept is not None and _same_perms(kept[0], now):
                part = kept[1]
            else:
                part = self._score(name, held, items=items, norms=False)[0]
                self.made += 1
                if kept is not None or self._room >= part.numel() * part.element_size():
                    if kept is None:
                        self._room -= part.numel() * part.element_size()
                    self._kept[(name, k)] = ({h: None if p is None else p.clone() for h, p in now.items()}, part)
            total += part
        return total

    def objective(self, perms: dict) -> float:
        """The summed inner products of A's and B's weights (B permuted by ``perms``) over every
        tensor the groups touch."""
        vp = {self.spec.var_of_group[k]: v for k, v in perms.items()}
        keys = {key for items in self.touches.values() for key, _, _, _ in items}
        total = 0.0
        for k in sorted(keys):
            # A's float64 copy times B (each product exact in float64, as with both widened), in
            # place: one fresh float64 tensor per weight, not three (a 32000 x 1024 embedding's
            # are 262 MB each, every page of them faulted in anew)
            prod = self.state_a[k].detach().double()
            prod.mul_(ax.permute_tensor(self.state_b[k].detach(), self.spec.param_axes[k], vp))
            total += float(prod.sum())
        return total

    def depends(self, name: str) -> tuple[str, ...]:
        """The other groups whose permutations group ``name``'s views read (every group on an
        axis of a tensor it touches)."""
        if name not in self._deps:
            self._deps[name] = tuple(sorted(set().union(*self._reads(name))))
        return self._deps[name]

    def _reads(self, name: str) -> list[frozenset[str]]:
        """Per tensor group ``name`` touches (``touches[name]``), the other groups on its axes."""
        if name in self._read_sets:
            return self._read_sets[name]
        name_of = {v: k for k, v in self.spec.var_of_group.items()}
        found = self._read_sets[name] = [
            frozenset(name_of[v.id] for e in self.spec.param_axes[key] for v in ax.variables(e) if v.id in name_of) - {name}
            for key, _, _, _ in self.touches[name]]
        return found

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
        if rows is not None and cols is not None and held.get(name) is None and self.plain(name):
            found = self._few_block(name, rows, cols)
            if found is not None:
                return self._cos(name, rows, *found.score({self.spec.var_of_group[k]: v for k, v in held.items()}))
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
        return self._cos(name, rows, *self._score(name, held, rows=rows, cols=cols))  # on the CPU, as the norms

    def _cos(self, name: str, rows, s: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        """The cosines of the score ``s`` of A's units ``rows`` (all where None) against B's units
        whose squared norms are ``nb``."""
        if name not in self._norms:
            na = 0.0
            for key, axis, pos, block in self.touches[name]:  # A's views alone (as ``views`` makes them)
                wa = _replicas(self.state_a[key].detach(), axis, pos, block)
                na = na + wa.flatten(1).square().sum(1).cpu()
            self._norms[name] = torch.as_tensor(na).sqrt()
        na = self._norms[name]
        na = na if rows is None else na[rows]
        denom = na[:, None] * nb.sqrt()[None, :]
        return torch.where(denom > 0, s / denom.clamp_min(1e-300), torch.zeros_like(s)).clamp(-1.0, 1.0)

    def plain(self, name: str) -> bool:
        """Whether every tensor group ``name`` touches holds its units along an axis of their own
        (the group's variable alone: one position per unit, no row block, no PerBlock axis), as
        a linear or conv layer does: a few units' rows are then gathered once, and only the
        tensors' other axes are permuted when the other groups move (``_FewUnits``)."""
        if name not in self._plain:
            self._plain[name] = all(
                rows is None and isinstance(self.spec.param_axes[key][axis], ax.Var)
                and not any(isinstance(e, ax.PerBlock) for e in self.spec.param_axes[key])
                for key, axis, _, rows in self.touches[name])
        return self._plain[name]

    def _few_block(self, name: str, rows: torch.Tensor, cols: torch.Tensor) -> "_FewUnits | None":
        """The kept ``_FewUnits`` of a ``plain`` group for A's units ``rows`` and B's units ``cols``
        (in any order), made anew where the units differ from the last block's; None where the
        rows would hold more than ``_KEEP_ROWS`` numbers (``_score`` then makes the block)."""
        rows, cols = rows.cpu(), cols.cpu()
        found = self._few.get(name)
        if found is not None and found.holds(rows, cols):
            return found
        width = sum(self.state_a[key].numel() // max(self.state_a[key].shape[axis], 1)
                    for key, axis, _, _ in self.touches[name])  # numbers per unit
        if (len(rows) + len(cols)) * width > _KEEP_ROWS:
            return None
        found = self._few[name] = _FewUnits(self, name, rows, cols)
        return found


class _FewUnits:
    """A ``plain`` group's block of A's units ``rows`` against B's units ``cols``, as the
    tie-break asks for it round after round while the other groups move: what ``_score`` reads
    for it that no permutation changes is gathered and widened once (A's rows; B's rows, along
    the group's own axis, in increasing order of unit), and per call only the other axes of B's
    rows are gathered by their groups' permutations, for the tensors that read a group that moved
    since the last call (each tensor's term and B's squared norms kept with the permutations
    they read). The same numbers as ``_score``'s, in the same operations on the same layouts
    (contiguous float64 rows, B's units multiplied in increasing order, the terms summed in the
    tensors' order): the same block, bit for bit. A block of the paper MLP with one neighbour
    moved: 160-170 us against 225-325 us through ``_score``; its ``activation_perms`` 42-45 ->
    39-40 ms on 5,000 examples, 67-70 -> 61-64 ms on 8 (54 and 91 blocks). The group's own
    permutation is not read: ``cosine`` comes here only where ``held`` does not hold it."""

    __slots__ = ("rows", "cols", "back", "tensors", "kept")

    def __init__(self, scores: WeightScores, name: str, rows: torch.Tensor, cols: torch.Tensor):
        self.rows = rows.clone()
        self.cols = cols.sort().values  # B's units are multiplied in increasing order (``_score``)
        self.back = None  # their order as asked for (``holds``): positions in ``cols``
        self.holds(rows, cols)
        self.tensors = []  # per tensor: A's rows, B's rows, B's other axes (axis, expression, variables)
        for key, axis, pos, _ in scores.touches[name]:
            a, b = scores.state_a[key].detach(), scores.state_b[key].detach()
            wa = _replicas(a, axis, pos[rows], None, True)  # as ``views`` makes A's
            gb = b.index_select(axis, pos[self.cols].reshape(-1).to(b.device)).movedim(axis, 0)
            wb = torch.empty(gb.shape, dtype=torch.float64, device=gb.device)
            wb.copy_(gb)
            others = tuple((d + 1 if d < axis else d, e, tuple(v.id for v in ax.variables(e)))
                           for d, e in enumerate(scores.spec.param_axes[key]) if d != axis and not ax.is_fixed(e))
            self.tensors.append((wa, wb, others))
        self.kept: list = [None] * len(self.tensors)

    def holds(self, rows: torch.Tensor, cols: torch.Tensor) -> bool:
        """Whether this block is of A's units ``rows`` (in that order) and B's units ``cols`` (in
        any order), and if so, remembers the order ``cols`` asks for (``_positions``)."""
        back = _positions(self.cols, cols) if torch.equal(self.rows, rows) else None
        if back is None:
            return False
        self.back = back
        return True

    def score(self, vp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the summed inner products, B's units' squared norms) with B's other axes permuted by
        ``vp`` (variable id -> permutation), in the order of B's units asked for last."""
        total = torch.zeros(len(self.rows), len(self.cols), dtype=torch.float64)
        norms = torch.zeros(len(self.cols), dtype=torch.float64)
        for k, (wa, wb, others) in enumerate(self.tensors):
            now = {i: vp.get(i) for _, _, ids in others for i in ids}
            kept = self.kept[k]
            if kept is None or not _same_perms(kept[0], now):
                sub = wb
                for d, e, ids in others:  # as ``views``: contiguous float64 rows either way
                    if any(vp.get(i) is not None for i in ids):  # (else the identity: nothing moves)
                        sub = sub.index_select(d, ax.index(e, vp).to(sub.device))
                sub = sub.reshape(len(self.cols), 1, -1)
                kept = self.kept[k] = (now, _inner(wa, sub).cpu(), sub.flatten(1).square().sum(1).cpu())
            total += kept[1]
            norms += kept[2]
        return total[:, self.back], norms[self.back]


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
    whatever the other groups' permutations (the pairing-free start of ``weight_matching``).
    The views come in the weights' own dtype (``views(widen=False)``): sorted there and
    multiplied in ``_own_precision`` (``_score`` sums the products in float64)."""
    to = _own_precision(wa.dtype)
    return _sorted_rows(wa.flatten(1), to) @ _sorted_rows(wb.flatten(1), to).T


def _sorted_rows(w: torch.Tensor, to: torch.dtype = torch.float64) -> torch.Tensor:
    """Each row of ``w`` sorted, in dtype ``to`` (float32 or float64; widening keeps the order,
    so the values are those of ``w`` sorted in ``to``). On the CPU by numpy (a 512 x 32000
    float32 block: 0.4 s against torch's 1.3-1.4 s), in row blocks side by side on
    ``assign.workers()`` threads (numpy's sort releases the GIL; a row's sort does not depend
    on the others, so the values are the same: a 1024 x 32000 block 52 -> 88 M values/s on 2
    cores), each block converted as it is written; half-precision rows through float32 first."""
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    if w.device.type != "cpu":
        return w.sort(1).values.to(to)
    # a strided block sorts at half the speed; torch lays it out again (a transposed 1024 x 32000
    # block: 0.09 s, against numpy's ``ascontiguousarray`` 0.34 s)
    rows = w.contiguous().numpy()
    out = np.empty(rows.shape, np.float64 if to == torch.float64 else np.float32)

    def sort(block: slice) -> None:
        out[block] = np.sort(rows[block], axis=1)

    threads = min(workers(), len(rows)) if rows.size >= _SORT_SPLIT else 1
    if threads <= 1:
        sort(slice(None))
    else:
        step = -(-len(rows) // threads)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="graphrepair-sort") as pool:
            list(pool.map(sort, [slice(i, i + step) for i in range(0, len(rows), step)]))
    return torch.from_numpy(out)


# a block of at least this many values is sorted on several threads (``_sorted_rows``)
_SORT_SPLIT = 1 << 18


def _eased(score: torch.Tensor) -> torch.Tensor:
    """``score`` less a constant per column, for the solver, where that subtraction is exact.

    The sorted start's matrices are close to rank one, S_ij ~ sigma_i tau_j (every unit's sorted
    weights look alike), and there the solver's augmenting paths run long: 4.7 - 6.3 s for a
    LLaMA MLP group of 1536 units, against 0.4 s for the descent's scores of the same group.
    Subtracting v_j from column j changes every assignment's sum by the same sum_j v_j: the same
    assignments are optimal, and the closer v is to the optimum's column duals the shorter the
    solver's paths. v starts from the duals of the rank-one matrix's optimal pairing
    (``_rank_one_duals``: 5.9 s -> 0.8 s), tightened on S itself (``_tightened``: a 2816-unit
    LLaMA MLP group 1.3 - 1.6 s -> 0.9 - 1.1 s). All of v is moved by one constant into the
    columns' range, so that every S_ij - v_j is exact (Sterbenz: 0 < v_j / 2 <= S_ij <= 2 v_j, or
    S_ij = 0: a unit without weights, whose row or column is all 0, and 0 - v_j is -v_j exactly,
    whatever v_j's sign; before, such a unit sent the whole matrix to the solver as it is: a LLaMA
    MLP group of 2,816 units with 20 such units on each side 1.4 s -> 22 s); where the tightened v allows no
    such subtraction the rank-one v is tried, and where neither does (mixed signs) the score goes
    to the solver as it is."""
    v = _rank_one_duals(score)
    if v is None:
        return score
    for w in (_tightened(score, v), v):
        if ((score == 0) | ((w > 0) & (score >= w / 2) & (score <= 2 * w))).all():
            return score - w
    return score


def _in_range(score: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Column constants ``v`` moved by one constant into the middle of the columns' range."""
    return v + (score.mean(0) - v).median()


def _rank_one_duals(score: torch.Tensor) -> torch.Tensor | None:
    """Column constants from the first singular pair, S ~ sigma tau^T: the column duals of the
    rank-one matrix's optimal pairing (sigma and tau sorted alike, unit (k) with unit (k)),

        v_(k) = sum_{m=2..k} sigma_(m) (tau_(m) - tau_(m-1)),   u_i = S_i,pi(i) - v_pi(i)

    (u_i + v_j >= sigma_i tau_j for all i, j), moved into the columns' range; None for a matrix
    too small or not finite, or without a singular pair."""
    if score.numel() < 4 or not torch.isfinite(score).all():
        return None
    x = torch.ones(score.shape[1], dtype=score.dtype)
    for _ in range(30):  # the first singular pair, S ~ sigma tau^T
        y = score @ x
        last, x = x, score.T @ y
        if not x.norm() > 0:
            return None
        x = x / x.norm()
        if (x - last).abs().max() <= _SETTLED:  # (a sorted start's matrix: after 3 steps)
            break
    sigma, tau = score @ x, x
    if tau.sum() < 0:
        sigma, tau = -sigma, -tau
    order = tau.argsort()
    steps = sigma.sort().values[1:] * tau[order].diff()
    v = torch.empty_like(tau)
    v[order] = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    return _in_range(score, v)


# the power iteration of ``_rank_one_duals`` stops once no entry of the unit vector moves by more
_SETTLED = 1e-15


def _tightened(score: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Column constants ``v`` tightened on ``score``: with each row's u_i = max_j S_ij - v_j (the
    duals (u, v) then bound every assignment's sum), each column's w_j = max_i S_ij - u_i, the
    least that keeps the bound. w <= v, and the bound sum_j w_j + sum_i max_j (S_ij - w_j) is at
    most that of v (each row's max S_ij - w_j is at most u_i): closer to the optimum's duals.
    Moved into the columns' range like v."""
    u = (score - v).max(1).values
    return _in_range(score, (score - u[:, None]).max(0).values)


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
    scores = WeightScores(spec, state_a, state_b, names, products="own")
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

    # per group, its neighbours' permutations and its own after its last step: a step from the
    # same ones would find the same, and is not taken again (see the module doc)
    done: dict[str, tuple[dict, torch.Tensor]] = {}

    def around(perms: dict, name: str) -> dict:
        return {h: perms.get(h) for h in scores.depends(name)}

    def settled(perms: dict, name: str) -> bool:
        last = done.get(name)
        return last is not None and torch.equal(last[1], perms[name]) and _same_perms(last[0], around(perms, name))

    def apart(name: str, batch: list[str]) -> bool:
        """Whether ``name`` neither reads nor is read by a group of ``batch``."""
        return all(name not in scores.depends(m) and m not in scores.depends(name) for m in batch)

    def steps(perms: dict, batch: list[str]) -> bool:
        """One step of each group of ``batch``, in order; no group of it reads another's
        permutation, so their scores do not depend on each other's steps and their assignments
        are solved side by side."""
        todo = [name for name in batch if not settled(perms, name)]
        made = (scores.score(name, {k: v for k, v in perms.items() if k != name}) for name in todo)
        changed = False
        for name, (score, new) in zip(todo, lap_each(made, reduced=True)):
            size = score.shape[0]
            old = perms[name]
            if (score[torch.arange(size), new].sum() > score[torch.arange(size), old].sum() + 1e-12
                    and not torch.equal(new, old)):
                perms[name] = new
                changed = True
            done[name] = (around(perms, name), perms[name])
        return changed

    def descend(perms: dict, active: list[str]) -> None:
        for _ in range(max_iter):
            changed = False
            batch: list[str] = []
            for gi in list(rng.permutation(len(active))) + [None]:
                name = None if gi is None else active[gi]
                if batch and (name is None or name in orders or not apart(name, batch)):
                    changed |= steps(perms, batch)
                    batch = []
                if name in orders:
                    changed |= move_slots(perms, name)
                elif name is not None:
                    batch.append(name)
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
    # each group's start from its own weights; the solver's threads take them two by two (``lap_each``),
    # so the widest go first, side by side: a LLaMA's 2816-unit MLP groups (1.3-1.6 s each to solve)
    # do not each wait beside its stream's 1024 units (0.05 s) or alone at the end. Each answer
    # depends on its group alone: the order changes none
    alone = sorted((name for name in free if name not in coupled), key=lambda n: -spec.group(n).size)
    start.update(zip(alone, (perm for _, perm in lap_each(_eased(scores.score(name, {}, _sorted_values))
                                                          for name in alone))))
    if all(torch.equal(start[n], best[n]) for n in names):
        return best
    other = run(start)
    ob, oo = scores.objective(best), scores.objective(other)
    return other if oo > ob + 1e-12 * abs(ob) else best
