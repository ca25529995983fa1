"""The solver of axis equations: unification of axis expressions, union-find over variables.

Discovery states every rule as "these two expressions are the same permutation" and the
:class:`AxisSolver` *unifies* them, like type inference. Unification only ever *restricts*
freedom: it binds a variable to a more specific expression (a Cat of fresh variables, a Kron of
fresh variables, a PerBlock of fresh variables, or Fixed), and when two layouts cannot be
reconciled it fixes every variable in both and records why. A variable unified with a PerBlock
takes it; a PerBlock of the same axis and block count unifies block by block; anything else makes
all its blocks equal. Restricting a set of allowed permutations can never make a permutation
wrong, so the solver is conservative by construction.

The expressions themselves (Var, Fixed, Cat, Kron, Wreath, PerBlock) and their algebra are in
:mod:`graphrepair.discovery.axes`.
"""

from __future__ import annotations

from graphrepair.discovery.axes import (
    Cat,
    Expr,
    Fixed,
    Kron,
    PerBlock,
    Var,
    Wreath,
    cat,
    kron,
    per_block,
    variables,
    wreath,
)


class AxisError(Exception):
    """Two axes that a rule asked to carry one permutation cannot (their sizes differ). Discovery
    turns it into fixed axes with this message as the reason; it never reaches the caller."""


class AxisSolver:
    """Union-find over permutation variables, with variables bound to structured expressions.

    ``binding[v]`` is the expression variable v was unified with; ``resolve`` substitutes bindings
    all the way down. ``reasons[v]`` says why a variable ended up fixed.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.binding: dict[int, Expr] = {}
        self.reasons: dict[int, str] = {}

    # -- construction -------------------------------------------------------------------------
    def fresh(self, size: int) -> Expr:
        if size <= 1:
            return Fixed(size)  # no reason: a lone position never needs one (and never hides another's)
        self.sizes.append(size)
        return Var(len(self.sizes) - 1, size)

    # -- substitution --------------------------------------------------------------------------
    def head(self, e: Expr) -> Expr:
        """Follow bindings of a top-level variable (with path compression)."""
        if not isinstance(e, Var) or e.id not in self.binding:
            return e
        seen = []
        while isinstance(e, Var) and e.id in self.binding:
            seen.append(e.id)
            e = self.binding[e.id]
        for v in seen[:-1]:
            self.binding[v] = e
        return e

    def resolve(self, e: Expr) -> Expr:
        e = self.head(e)
        if isinstance(e, Cat):
            return cat(self.resolve(p) for p in e.parts)
        if isinstance(e, Kron):
            return kron(self.resolve(e.outer), self.resolve(e.inner))
        if isinstance(e, PerBlock):
            return per_block(e.axis, (self.resolve(p) for p in e.parts))
        if isinstance(e, Wreath):
            return wreath(self.resolve(e.outer), (self.resolve(p) for p in e.parts))
        return e

    def _bind(self, v: Var, e: Expr) -> None:
        assert v.size == e.size, (v, e)
        self.binding[v.id] = e
        if isinstance(e, Fixed):
            self.reasons.setdefault(v.id, e.reason)

    def fix(self, e: Expr, reason: str) -> None:
        """Fix every variable occurring in ``e``."""
        for v in list(variables(self.resolve(e))):
            self._bind(v, Fixed(v.size, reason))

    # -- unification ---------------------------------------------------------------------------
    def unify(self, a: Expr, b: Expr, why: str) -> None:
        if a.size != b.size:
            raise AxisError(f"axis sizes differ ({a.size} vs {b.size}) at {why}")
        a, b = self.head(a), self.head(b)
        if a == b:
            return
        if isinstance(a, Var) or isinstance(b, Var):
            v, e = (a, b) if isinstance(a, Var) else (b, a)
            if isinstance(e, Var):
                self._bind(v, e)
            elif any(w.id == v.id for w in variables(self.resolve(e))):
                self.fix(v, f"a channel axis would have to equal a layout containing itself ({why})")
                self.fix(e, f"a channel axis would have to equal a layout containing itself ({why})")
            else:
                self._bind(v, e)
            return
        if isinstance(a, PerBlock) or isinstance(b, PerBlock):
            if (isinstance(a, PerBlock) and isinstance(b, PerBlock) and a.axis == b.axis
                    and len(a.parts) == len(b.parts)):
                for x, y in zip(a.parts, b.parts):
                    self.unify(x, y, why)
                return
            # anything else reads this axis the same way in every block: one shared permutation
            self.unify(self.shared(a, why), self.shared(b, why), why)
            return
        if isinstance(a, Fixed) or isinstance(b, Fixed):
            f, e = (a, b) if isinstance(a, Fixed) else (b, a)
            self.fix(e, f.reason or why)
            return
        if isinstance(a, Wreath) or isinstance(b, Wreath):
            self._unify_wreath(a, b, why)
            return
        if isinstance(a, Kron) and isinstance(b, Kron):
            if a.inner.size == b.inner.size:
                self.unify(a.outer, b.outer, why)
                self.unify(a.inner, b.inner, why)
                return
            small = min(a.inner.size, b.inner.size)
            fa, fb = self.factor(a, small, why), self.factor(b, small, why)
            self.unify(fa[0], fb[0], why)
            self.unify(fa[1], fb[1], why)
            return
        # at least one Cat (the other a Cat or a Kron): compare block by block
        bounds = sorted(set(self.boundaries(a)) | set(self.boundaries(b)))
        pa, pb = self.split(a, bounds, why), self.split(b, bounds, why)
        for x, y in zip(pa, pb):
            self.unify(x, y, why)

    def _unify_wreath(self, a: Expr, b: Expr, why: str) -> None:
        """A Wreath against another of the same slots (outers and parts unified), against a Kron
        of the same inner size with a plain outer (the outers unified, every part with the inner),
        or else with its outer fixed (``degrade``) and compared as the Cat of its parts."""
        w, e = (a, b) if isinstance(a, Wreath) else (b, a)
        if isinstance(e, Wreath) and len(e.parts) == len(w.parts) and e.slot == w.slot:
            self.unify(w.outer, e.outer, why)
            for x, y in zip(w.parts, e.parts):
                self.unify(x, y, why)
            return
        if (isinstance(e, Kron) and e.inner.size == w.slot
                and isinstance(self.head(e.outer), (Var, Fixed))):
            self.unify(w.outer, e.outer, why)
            for p in w.parts:
                self.unify(p, e.inner, why)
            return
        self.degrade(w, why)
        if isinstance(e, Wreath):
            self.degrade(e, why)
        self.unify(self.resolve(a), self.resolve(b), why)

    def degrade(self, e: Expr, why: str) -> Expr:
        """``e`` with the outer permutation of a top-level Wreath fixed: the Cat of its parts."""
        e = self.head(e)
        if isinstance(e, Wreath):
            self.fix(e.outer, f"whole groups of channels cannot move here ({why})")
            return self.resolve(e)
        return e

    def shared(self, e: Expr, why: str) -> Expr:
        """``e`` with one permutation in every block if it is a PerBlock (its parts unified)."""
        e = self.head(e)
        if not isinstance(e, PerBlock):
            return e
        for p in e.parts[1:]:
            self.unify(e.parts[0], p, why)
        return self.resolve(e.parts[0])

    def boundaries(self, e: Expr) -> list[int]:
        e = self.resolve(e)
        if isinstance(e, Cat):
            out, offset = [], 0
            for p in e.parts[:-1]:
                offset += p.size
                out.append(offset)
            return out
        return []

    def split(self, e: Expr, bounds: list[int], why: str) -> list[Expr]:
        """Cut ``e`` at the given positions (binding variables to Cats of fresh ones as needed)."""
        out, start = [], 0
        rest = self.resolve(e)
        for b in bounds + [e.size]:
            left, rest = self.split_at(rest, b - start, why)
            out.append(left)
            start = b
        return out

    def split_at(self, e: Expr, k: int, why: str) -> tuple[Expr, Expr]:
        e = self.degrade(self.shared(e, why), why)
        n = e.size
        if k == n:
            return e, Fixed(0)
        if k == 0:
            return Fixed(0), e
        if isinstance(e, Var):
            left, right = self.fresh(k), self.fresh(n - k)
            self._bind(e, cat((left, right)))
            return left, right
        if isinstance(e, Fixed):
            return Fixed(k, e.reason), Fixed(n - k, e.reason)
        if isinstance(e, Cat):
            offset = 0
            for i, p in enumerate(e.parts):
                if offset + p.size >= k:
                    l, r = self.split_at(p, k - offset, why)
                    return cat(e.parts[:i] + (l,)), cat((r,) + e.parts[i + 1:])
                offset += p.size
        assert isinstance(e, Kron)
        s = e.inner.size
        if k % s == 0:
            lo, ro = self.split_at(e.outer, k // s, why)
            return kron(lo, e.inner), kron(ro, e.inner)
        # the cut falls inside a block: the blocks themselves must stay in place
        self.fix(e.outer, f"a split inside repeated blocks ({why})")
        expanded = cat([e.inner] * e.outer.size)
        return self.split_at(expanded, k, why)

    def factor(self, e: Expr, s: int, why: str) -> tuple[Expr, Expr]:
        """Write ``e`` as kron(outer, inner) with |inner| == s (restricting variables if needed)."""
        e = self.shared(e, why)
        n = e.size
        if n % s:
            raise AxisError(f"an axis of {n} cannot be split into blocks of {s} ({why})")
        if isinstance(e, Var):
            o, i = self.fresh(n // s), self.fresh(s)
            self._bind(e, kron(o, i))
            return o, i
        if isinstance(e, Fixed):
            return Fixed(n // s, e.reason), Fixed(s, e.reason)
        if isinstance(e, Wreath):
            if e.slot == s and isinstance(self.head(e.outer), (Var, Fixed)):  # one permutation in every slot
                for p in e.parts[1:]:
                    self.unify(e.parts[0], p, why)
                return self.resolve(e.outer), self.resolve(e.parts[0])
            return self.factor(self.degrade(e, why), s, why)
        if isinstance(e, Kron):
            si = e.inner.size
            if si == s:
                return e.outer, e.inner
            if si % s == 0:
                io, ii = self.factor(e.inner, s, why)
                return kron(e.outer, io), ii
            if s % si == 0:
                oo, oi = self.factor(e.outer, s // si, why)
                return oo, kron(oi, e.inner)
        if isinstance(e, Cat) and all(p.size % s == 0 for p in e.parts):
            factored = [self.factor(p, s, why) for p in e.parts]
            inner = factored[0][1]
            for _, other in factored[1:]:
                self.unify(inner, other, why)
            return cat(o for o, _ in factored), inner
        self.fix(e, f"incompatible channel layouts ({why})")
        return Fixed(n // s, f"incompatible channel layouts ({why})"), Fixed(s, "")
