"""The algebra of axis permutations that discovery solves.

Every axis of every tensor in the graph (activations, parameters, buffers) is described by an
*axis expression*: how a permutation of that axis is built from the permutation groups.

    Var(v)        a free permutation variable v of |v| channels            idx = P_v
    Fixed(n)      the identity on n positions (the axis must not move)     idx = arange(n)
    Cat(e1..ek)   block-diagonal: e1 on the first |e1| positions, ...      idx = [idx1, |e1| + idx2, ...]
    Kron(o, i)    position a*|i| + b goes to o(a)*|i| + i(b)                idx = (idx_o[:, None]*|i| + idx_i).ravel()
    Wreath(o, (e0..ek-1))  k slots of |e_j| positions: slot a of the new axis holds old slot o(a),
                  reordered inside by e_a                   idx = [o(a)*s + idx_{e_a} for each slot a]
    PerBlock(a, (e0..ek-1))  parameters only: the permutation of this axis depends on the row's
                  block along axis a (R rows cut into k blocks of R/k)     idx[r, p] = idx_{e_j}[p], j = r // (R/k)

A permutation is applied to a tensor axis by ``x.index_select(axis, idx)``: position p of the new
tensor holds position idx[p] of the old one. A PerBlock axis d is applied after the other axes, as
``W.gather(d, idx[r, p] broadcast over the remaining axes)``; this is valid because the expression
of axis a keeps every row inside its block (``keeps_blocks``), so the new row r and the old row it
holds lie in the same block. Examples of where each form arises:

    conv output channels                      Var(v)
    torch.cat([a, b], dim=1)                  Cat(e_a, e_b)
    (N, C, H, W).flatten(1)                   Kron(e_C, Fixed(H*W))     channel permutation in blocks of H*W
    (N, T, H*D).view(N, T, H, D)              Kron(h, d)                heads and the dims inside a head
    grouped conv (g groups), input channels   Wreath(G, (p1..pg))       whole groups move (G), and each
                                                                        is permuted on its own inside
      its weight (out, in/g, *k), axis 0      Wreath(G, (q1..qg))       the output groups move with them
      its weight, axis 1                      PerBlock(0, (p1..pg))     output group j's rows read group j
    transposed grouped conv weight (in, out/g, *k): axis 0 Wreath(G, (p1..pg)), axis 1 PerBlock(0, (q1..qg))
    GroupNorm (g groups)                      Wreath(G, (p1..pg))       statistics per group travel with it

A Wreath's parts belong to the *new* slots: slot a of the result is old slot o(a), reordered by
e_a (so with o the identity it is Cat(e0..ek-1), and with every e_a equal it is Kron(o, e)).
Its outer permutation stays a plain variable: any layout that cannot carry it whole (a slice, a
concatenation, a split into blocks of another size) fixes the outer permutation (``degrade``),
which leaves exactly the Cat of its parts.

PerBlock is the grouped conv's weight only: W'[o, i] = W[tau(o), P_(o // (out/g))(i)], where tau
moves output channels in whole groups (its row axis is the Wreath above, or keeps every row in its
block). The gather takes the part of the row's *new* block, as a Wreath's parts do: new output
group a holds old group G(a), and reads new input group a, which is old input group G(a)
reordered by p_a. It never describes an activation (a per-row
permutation of an activation axis would not commute with the ops that read it): where it would
reach one (a weight computed by ops, reshaped or shared with another op) discovery sets all its
blocks equal, the single permutation shared by every group, and ``PerBlock(a, (e, .., e)) == e``.

Discovery states every rule as "these two expressions are the same permutation"; the solver that
unifies them is :mod:`graphrepair.discovery.solver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

import torch


@dataclass(frozen=True)
class Var:
    id: int
    size: int


@dataclass(frozen=True)
class Fixed:
    size: int
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class Cat:
    parts: tuple

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class Kron:
    outer: "Expr"
    inner: "Expr"

    @property
    def size(self) -> int:
        return self.outer.size * self.inner.size


@dataclass(frozen=True)
class PerBlock:
    """A parameter axis whose permutation depends on the block of another axis of the same tensor
    (``axis``, cut into ``len(parts)`` equal blocks): rows in block j are permuted by ``parts[j]``."""

    axis: int
    parts: tuple

    @property
    def size(self) -> int:
        return self.parts[0].size


@dataclass(frozen=True)
class Wreath:
    """Whole slots move by ``outer`` and slot a of the result is reordered by ``parts[a]``: position
    a*s + b holds old position outer(a)*s + parts[a](b), s = |parts[a]| (the same for all)."""

    outer: "Expr"
    parts: tuple

    @property
    def slot(self) -> int:
        return self.parts[0].size

    @property
    def size(self) -> int:
        return self.outer.size * self.parts[0].size


Expr = Union[Var, Fixed, Cat, Kron, PerBlock, Wreath]


def cat(parts) -> Expr:
    """Normalised block-diagonal concatenation (nested Cats flattened, adjacent Fixed merged)."""
    flat: list = []
    for p in parts:
        for q in (p.parts if isinstance(p, Cat) else (p,)):
            if q.size == 0:
                continue
            if flat and isinstance(q, Fixed) and isinstance(flat[-1], Fixed):
                flat[-1] = Fixed(flat[-1].size + q.size, flat[-1].reason or q.reason)
            else:
                flat.append(q)
    if not flat:
        return Fixed(0)
    return flat[0] if len(flat) == 1 else Cat(tuple(flat))


def kron(outer: Expr, inner: Expr) -> Expr:
    """Normalised Kronecker layout (size-1 factors dropped, Fixed x Fixed merged)."""
    if outer.size == 1:
        return inner
    if inner.size == 1:
        return outer
    if isinstance(outer, Fixed) and isinstance(inner, Fixed):
        return Fixed(outer.size * inner.size, outer.reason or inner.reason)
    # re-associate fixed factors: kron(kron(x, fixed a), fixed b) == kron(x, fixed ab)
    if isinstance(inner, Fixed) and isinstance(outer, Kron) and isinstance(outer.inner, Fixed):
        return kron(outer.outer, Fixed(outer.inner.size * inner.size, outer.inner.reason))
    if isinstance(outer, Fixed) and isinstance(inner, Kron) and isinstance(inner.outer, Fixed):
        return kron(Fixed(outer.size * inner.outer.size, outer.reason), inner.inner)
    return Kron(outer, inner)


def per_block(axis: int, parts) -> Expr:
    """Normalised PerBlock: one permutation shared by every block is that permutation."""
    parts = tuple(parts)
    return parts[0] if all(p == parts[0] for p in parts[1:]) else PerBlock(axis, parts)


def wreath(outer: Expr, parts) -> Expr:
    """Normalised Wreath: one permutation in every slot is a Kron, slots that cannot move a Cat."""
    parts = tuple(parts)
    if outer.size == 1:
        return parts[0]
    if all(p == parts[0] for p in parts[1:]):
        return kron(outer, parts[0])
    if is_fixed(outer):
        return cat(parts)
    return Wreath(outer, parts)


def children(e: Expr) -> tuple:
    """The sub-expressions of ``e`` (a Kron's outer then inner, a Wreath's outer then parts)."""
    if isinstance(e, (Cat, PerBlock)):
        return e.parts
    if isinstance(e, Kron):
        return (e.outer, e.inner)
    if isinstance(e, Wreath):
        return (e.outer,) + e.parts
    return ()


def variables(e: Expr) -> Iterator[Var]:
    if isinstance(e, Var):
        yield e
    for p in children(e):
        yield from variables(p)


def mixes(e: Expr) -> bool:
    """Whether a Kronecker factor of ``e`` holds variables on both sides (heads x head dims): the
    positions of one variable are then replicated over another's."""
    if isinstance(e, Kron):
        return (not is_fixed(e.outer) and not is_fixed(e.inner)) or mixes(e.outer) or mixes(e.inner)
    if isinstance(e, Wreath):  # the slots' positions move with the outer permutation
        return (not is_fixed(e.outer) and not all(is_fixed(p) for p in e.parts)) or any(
            mixes(p) for p in children(e))
    if isinstance(e, (Cat, PerBlock)):
        return any(mixes(p) for p in e.parts)
    return False


def is_fixed(e: Expr) -> bool:
    return next(variables(e), None) is None


def index(e: Expr, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """The gather index of ``e`` when each variable id takes its permutation from ``perms``
    (missing ids stay the identity). A PerBlock has one index per block: ``block_index``."""
    if isinstance(e, PerBlock):
        raise ValueError("a PerBlock axis has one index per row block: use block_index / permute_tensor")
    if isinstance(e, Var):
        p = perms.get(e.id)
        return torch.arange(e.size) if p is None else p
    if isinstance(e, Fixed):
        return torch.arange(e.size)
    if isinstance(e, Cat):
        out, offset = [], 0
        for p in e.parts:
            out.append(index(p, perms) + offset)
            offset += p.size
        return torch.cat(out)
    if isinstance(e, Wreath):  # new slot a: old slot o(a), reordered by part a
        o = index(e.outer, perms)
        inner = torch.stack([index(p, perms) for p in e.parts])
        return (o[:, None] * e.slot + inner).reshape(-1)
    o, i = index(e.outer, perms), index(e.inner, perms)
    return (o[:, None] * e.inner.size + i[None, :]).reshape(-1)


def block_index(e: PerBlock, rows: int, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """(rows, |e|): row r's gather index along a PerBlock axis (``rows`` = size of axis e.axis)."""
    k = len(e.parts)
    return torch.stack([index(p, perms) for p in e.parts]).repeat_interleave(rows // k, dim=0)


def permute_tensor(t: torch.Tensor, exprs, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` with every axis d reordered by ``exprs[d]``: ``index_select`` for the ordinary axes,
    then a gather for each PerBlock axis (its row axis already reordered; rows stay in their
    block, see the module docstring)."""
    blocked = []
    for d, e in enumerate(exprs):
        if is_fixed(e):
            continue
        if isinstance(e, PerBlock):
            blocked.append((d, e))
            continue
        t = t.index_select(d, index(e, perms).to(t.device))
    for d, e in blocked:
        idx = block_index(e, t.shape[e.axis], perms).to(t.device)  # (rows, |e|)
        moved = t.movedim((e.axis, d), (0, 1))
        idx = idx.reshape(idx.shape + (1,) * (moved.ndim - 2)).expand(moved.shape)
        t = moved.gather(1, idx).movedim((0, 1), (e.axis, d))
    return t


def keeps_blocks(e: Expr, block: int, offset: int = 0) -> bool:
    """Whether every permutation ``e`` allows keeps each position inside its block of ``block``
    positions (``e`` lying at ``offset``). Conservative: False when it cannot tell."""
    if e.size <= 1 or is_fixed(e) or offset // block == (offset + e.size - 1) // block:
        return True
    if isinstance(e, Cat):
        starts = [offset + sum(p.size for p in e.parts[:i]) for i in range(len(e.parts))]
        return all(keeps_blocks(p, block, s) for p, s in zip(e.parts, starts))
    if isinstance(e, Kron):
        s = e.inner.size
        if is_fixed(e.outer):  # chunks stay: each must keep its own positions in their blocks
            return all(keeps_blocks(e.inner, block, offset + a * s) for a in range(e.outer.size))
        if block % s == 0 and offset % s == 0:  # whole chunks move, inside one block each
            return keeps_blocks(e.outer, block // s, offset // s)
    if isinstance(e, Wreath) and is_fixed(e.outer):
        return keeps_blocks(cat(e.parts), block, offset)
    return False


def moves_whole_blocks(e: Expr, block: int) -> bool:
    """Whether every permutation ``e`` allows moves positions in whole blocks of ``block`` (each
    new block is one old block, reordered inside): a PerBlock's row axis then decides, by its new
    block, which part a row reads (see the module docstring)."""
    return keeps_blocks(e, block) or (isinstance(e, Wreath) and e.slot == block)


def positions(e: Expr, var_id: int) -> torch.Tensor | None:
    """Where variable ``var_id`` lives along an axis laid out as ``e`` (all variables at identity):
    a LongTensor (|v|, R) whose row j lists the R positions that hold channel j of the variable, or
    None if the variable does not occur. R > 1 when the layout repeats the variable (a flattened
    feature map repeats each channel over the spatial positions). For a PerBlock axis, take the
    positions in each of its parts (the rows of that block): ``PerBlock.parts``."""
    if isinstance(e, PerBlock):
        raise ValueError("positions along a PerBlock axis depend on the row block: use its parts")
    if isinstance(e, Var):
        return torch.arange(e.size)[:, None] if e.id == var_id else None
    if isinstance(e, Fixed):
        return None
    if isinstance(e, Cat):
        found, offset = [], 0
        for p in e.parts:
            q = positions(p, var_id)
            if q is not None:
                found.append(q + offset)
            offset += p.size
        return torch.cat(found, dim=1) if found else None
    if isinstance(e, Wreath):  # the outer like a Kron's, each part like a Cat's block
        s = e.slot
        found = []
        q = positions(e.outer, var_id)
        if q is not None:
            found.append((q[:, :, None] * s + torch.arange(s)).reshape(q.shape[0], -1))
        for a, p in enumerate(e.parts):
            q = positions(p, var_id)
            if q is not None:
                found.append(q + a * s)
        return torch.cat(found, dim=1) if found else None
    q_out, q_in = positions(e.outer, var_id), positions(e.inner, var_id)
    n_in = e.inner.size
    found = []
    if q_out is not None:  # var in the outer factor: every inner position is a replica
        found.append((q_out[:, :, None] * n_in + torch.arange(n_in)).reshape(q_out.shape[0], -1))
    if q_in is not None:  # var in the inner factor: every outer position is a replica
        base = torch.arange(e.outer.size) * n_in
        found.append((q_in[:, :, None] + base).reshape(q_in.shape[0], -1))
    return torch.cat(found, dim=1) if found else None


def describe(e: Expr, names: dict[int, str] | None = None) -> str:
    """Short human form, e.g. ``cat(layer1.0, fixed[64])`` or ``kron(g3, fixed[16])``."""
    names = names or {}
    if isinstance(e, Var):
        return names.get(e.id, f"v{e.id}")
    if isinstance(e, Fixed):
        return f"fixed[{e.size}]"
    if isinstance(e, Cat):
        return "cat(" + ", ".join(describe(p, names) for p in e.parts) + ")"
    if isinstance(e, PerBlock):
        return f"per_block(axis {e.axis}: " + ", ".join(describe(p, names) for p in e.parts) + ")"
    if isinstance(e, Wreath):
        return f"wreath({describe(e.outer, names)}: " + ", ".join(describe(p, names) for p in e.parts) + ")"
    return f"kron({describe(e.outer, names)}, {describe(e.inner, names)})"

