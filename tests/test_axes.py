"""The axis-expression algebra and its solver."""

from __future__ import annotations

import pytest
import torch

from graphrepair.discovery import axes as ax
from graphrepair.discovery.solver import AxisError as LayoutError, AxisSolver


def test_index_of_layouts():
    perms = {0: torch.tensor([1, 0]), 1: torch.tensor([2, 0, 1])}
    v0, v1 = ax.Var(0, 2), ax.Var(1, 3)
    assert ax.index(ax.cat([v0, v1]), perms).tolist() == [1, 0, 4, 2, 3]
    assert ax.index(ax.kron(v0, ax.Fixed(3)), perms).tolist() == [3, 4, 5, 0, 1, 2]
    assert ax.index(ax.kron(ax.Fixed(2), v1), perms).tolist() == [2, 0, 1, 5, 3, 4]
    assert ax.index(ax.kron(v0, v1), perms).tolist() == [5, 3, 4, 2, 0, 1]


def test_index_matches_reshape_semantics():
    """Permuting channels then flattening equals flattening then permuting by kron(v, fixed)."""
    x = torch.randn(2, 4, 3, 3)
    p = torch.randperm(4)
    e = ax.kron(ax.Var(0, 4), ax.Fixed(9))
    assert torch.equal(x.index_select(1, p).flatten(1), x.flatten(1).index_select(1, ax.index(e, {0: p})))


def test_positions_list_every_replica():
    e = ax.kron(ax.Var(0, 2), ax.Fixed(3))
    assert ax.positions(e, 0).tolist() == [[0, 1, 2], [3, 4, 5]]
    e = ax.kron(ax.Fixed(2), ax.Var(1, 3))
    assert ax.positions(e, 1).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert ax.positions(ax.cat([ax.Fixed(2), ax.Var(5, 2)]), 5).tolist() == [[2], [3]]
    assert ax.positions(ax.Fixed(4), 0) is None


def test_unify_vars_and_fixed():
    s = AxisSolver()
    a, b, c = s.fresh(4), s.fresh(4), s.fresh(4)
    s.unify(a, b, "t")
    assert s.resolve(a) == s.resolve(b)
    s.unify(b, ax.Fixed(4, "pinned"), "t")
    assert isinstance(s.resolve(a), ax.Fixed) and s.resolve(a).reason == "pinned"
    assert isinstance(s.resolve(c), ax.Var)


def test_unify_cat_against_var_splits_the_var():
    s = AxisSolver()
    v = s.fresh(6)
    p, q = s.fresh(2), s.fresh(4)
    s.unify(v, ax.cat([p, q]), "cat")
    assert s.resolve(v) == ax.Cat((s.resolve(p), s.resolve(q)))


def test_unify_cats_with_different_boundaries_refines_both():
    s = AxisSolver()
    a, b = s.fresh(4), s.fresh(4)
    c, d = s.fresh(2), s.fresh(6)
    s.unify(ax.cat([a, b]), ax.cat([c, d]), "t")
    ra = s.resolve(ax.cat([a, b]))
    rc = s.resolve(ax.cat([c, d]))
    assert ra == rc
    assert [p.size for p in ra.parts] == [2, 2, 4]


def test_unify_kron_with_different_factors():
    s = AxisSolver()
    h, d = s.fresh(4), s.fresh(8)
    w = s.fresh(32)
    s.unify(ax.kron(w, ax.Fixed(1)), ax.kron(h, d), "t")
    s.unify(ax.kron(h, d), ax.kron(s.fresh(2), s.fresh(16)), "t")
    r = s.resolve(w)
    # still a product layout with some freedom left
    assert any(True for _ in ax.variables(r))
    assert r.size == 32


def test_split_inside_repeated_blocks_pins_the_blocks():
    s = AxisSolver()
    o, i = s.fresh(3), s.fresh(4)
    s.unify(ax.kron(o, i), ax.cat([s.fresh(6), s.fresh(6)]), "odd split")
    assert isinstance(s.resolve(o), ax.Fixed)


def test_occurs_check_fixes():
    s = AxisSolver()
    v = s.fresh(4)
    s.unify(v, ax.kron(ax.Fixed(1), v), "self")  # normalises to v itself: no-op
    assert isinstance(s.resolve(v), ax.Var)
    w, u = s.fresh(4), s.fresh(2)
    s.unify(w, ax.cat([u, s.fresh(2)]), "t")
    s.unify(u, ax.Fixed(2, "x"), "t")
    assert s.resolve(w).parts[0] == ax.Fixed(2)


# -- PerBlock: a grouped conv weight's per-group axis --------------------------------------------


def test_permute_tensor_gathers_a_per_block_axis_per_row_block():
    """W'[o, i] = W[tau(o), P_(o // m)(i)]: rows keep their block, each block its own index."""
    w = torch.randn(6, 4, 3)  # 3 row blocks of 2 rows, axis 1 permuted per block
    perms = {0: torch.tensor([1, 0]), 2: torch.tensor([3, 0, 2, 1]), 3: torch.tensor([2, 3, 1, 0]),
             4: torch.tensor([1, 2, 3, 0])}
    rows = ax.cat([ax.Var(0, 2), ax.Fixed(2), ax.Var(1, 2)])
    exprs = (rows, ax.per_block(0, (ax.Var(2, 4), ax.Var(3, 4), ax.Var(4, 4))), ax.Fixed(3))
    got = ax.permute_tensor(w, exprs, perms)
    tau = ax.index(rows, perms)
    want = torch.stack([w[tau[o], perms[2 + o // 2]] for o in range(6)])
    assert torch.equal(got, want)
    assert ax.block_index(exprs[1], 6, perms).shape == (6, 4)
    with pytest.raises(ValueError, match="PerBlock"):
        ax.index(exprs[1], perms)


def test_per_block_with_one_permutation_in_every_block_is_that_permutation():
    v = ax.Var(0, 3)
    assert ax.per_block(0, (v, v, v)) == v
    assert ax.per_block(1, (ax.Fixed(3, "a"), ax.Fixed(3, "b"))) == ax.Fixed(3)


def test_keeps_blocks():
    assert ax.keeps_blocks(ax.cat([ax.Var(0, 4), ax.Var(1, 4)]), 4)
    assert not ax.keeps_blocks(ax.Var(0, 8), 4)
    assert not ax.keeps_blocks(ax.cat([ax.Var(0, 2), ax.Var(1, 4), ax.Var(2, 2)]), 4)  # straddles
    assert ax.keeps_blocks(ax.kron(ax.Fixed(2), ax.Var(0, 4)), 4)  # the same permutation per block
    assert not ax.keeps_blocks(ax.kron(ax.Var(0, 4), ax.Var(1, 2)), 4)  # pairs move across blocks
    assert ax.keeps_blocks(ax.kron(ax.cat([ax.Var(0, 2), ax.Var(2, 2)]), ax.Var(1, 2)), 4)  # pairs stay
    assert ax.keeps_blocks(ax.cat([ax.kron(ax.Var(0, 2), ax.Var(1, 2)), ax.Fixed(4)]), 4)  # inside block 0


def test_unify_per_block_partwise_or_shared():
    s = AxisSolver()
    ps, qs = [s.fresh(3) for _ in range(2)], [s.fresh(3) for _ in range(2)]
    w = s.fresh(3)
    s.unify(w, ax.per_block(0, ps), "conv")  # a weight's axis variable takes the PerBlock
    s.unify(w, ax.per_block(0, qs), "the same weight read again")  # partwise
    assert s.resolve(ps[0]) == s.resolve(qs[0]) and s.resolve(ps[1]) == s.resolve(qs[1])
    assert s.resolve(ps[0]) != s.resolve(ps[1])
    v = s.fresh(3)
    s.unify(v, w, "a variable")  # takes the PerBlock (discovery confines it to parameters)
    assert s.resolve(v) == s.resolve(w)
    s.unify(w, ax.Fixed(3, "pinned"), "fixed")  # anything else: the same in every block
    assert all(isinstance(s.resolve(p), ax.Fixed) for p in ps + qs) and s.resolve(w) == ax.Fixed(3)
    t = AxisSolver()
    rs = [t.fresh(4) for _ in range(2)]
    u = t.fresh(4)
    t.unify(u, ax.per_block(0, rs), "conv")
    t.unify(ax.cat([t.fresh(2), t.fresh(2)]), u, "split")
    assert not isinstance(t.resolve(u), ax.PerBlock) and t.resolve(rs[0]) == t.resolve(rs[1])


# -- Wreath: whole slots move, each slot reordered by its own part --------------------------------


def test_wreath_index_moves_whole_slots_then_reorders_each_new_slot():
    e = ax.wreath(ax.Var(0, 3), (ax.Var(1, 2), ax.Var(2, 2), ax.Var(3, 2)))
    assert isinstance(e, ax.Wreath) and e.size == 6 and e.slot == 2
    perms = {0: torch.tensor([2, 0, 1]), 1: torch.tensor([1, 0]), 3: torch.tensor([1, 0])}
    # new slot 0 = old slot 2 reordered by part 0; new slot 1 = old slot 0 as is (part 1 missing:
    # the identity); new slot 2 = old slot 1 reordered by part 2
    assert ax.index(e, perms).tolist() == [5, 4, 0, 1, 3, 2]
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(ax.permute_tensor(x, (ax.Fixed(2), e), perms), x[:, [5, 4, 0, 1, 3, 2]])


def test_wreath_normalises_to_kron_or_cat():
    v, p, q = ax.Var(0, 3), ax.Var(1, 2), ax.Var(2, 2)
    assert ax.wreath(v, (p, p, p)) == ax.Kron(v, p)  # one permutation in every slot
    assert ax.wreath(ax.Fixed(3), (p, q, p)) == ax.Cat((p, q, p))  # slots that cannot move
    assert ax.wreath(ax.Fixed(1), (p,)) == p


def test_wreath_positions_and_mixing():
    e = ax.wreath(ax.Var(0, 2), (ax.Var(1, 3), ax.Var(2, 3)))
    assert ax.positions(e, 0).tolist() == [[0, 1, 2], [3, 4, 5]]  # the order: every slot's positions
    assert ax.positions(e, 2).tolist() == [[3], [4], [5]]  # a part: its slot
    assert ax.mixes(e) and not ax.mixes(ax.cat([ax.Var(1, 3), ax.Var(2, 3)]))
    assert [v.id for v in ax.variables(e)] == [0, 1, 2]
    assert ax.describe(e, {0: "G"}) == "wreath(G: v1, v2)"
    # a PerBlock's row axis may move whole blocks when it is a Wreath of blocks of that size
    assert ax.moves_whole_blocks(e, 3) and not ax.moves_whole_blocks(e, 2)
    assert not ax.keeps_blocks(e, 3)


def _wreath(s: AxisSolver, k: int, n: int):
    return ax.wreath(s.fresh(k), [s.fresh(n) for _ in range(k)])


def test_unify_wreaths_of_one_shape_slot_by_slot():
    s = AxisSolver()
    a, b = _wreath(s, 3, 2), _wreath(s, 3, 2)
    s.unify(a, b, "residual")
    assert s.resolve(a) == s.resolve(b) and isinstance(s.resolve(a), ax.Wreath)


def test_wreath_against_kron_of_its_slot_size_keeps_the_order():
    s = AxisSolver()
    w = _wreath(s, 3, 2)
    s.unify(w, ax.kron(s.fresh(3), s.fresh(2)), "view as (3, 2)")
    r = s.resolve(w)
    assert isinstance(r, ax.Kron) and isinstance(r.outer, ax.Var) and isinstance(r.inner, ax.Var)


def test_factor_wreath_by_its_slot_shares_one_part():
    s = AxisSolver()
    w = _wreath(s, 4, 2)
    o, i = s.factor(w, 2, "view as (4, 2)")
    assert isinstance(o, ax.Var) and o.size == 4 and i.size == 2
    assert s.resolve(w) == ax.Kron(o, i)


@pytest.mark.parametrize("other", ["cat", "split", "other wreath", "kron of another size", "factor"])
def test_wreath_degrades_to_the_cat_of_its_parts_with_the_reason(other):
    """Anything else that cannot carry whole slots moving fixes the order (with the reason) and
    leaves the Cat of the parts: exactly the freedom of each slot permuted in place."""
    s = AxisSolver()
    w = _wreath(s, 2, 4)
    order = w.outer
    if other == "cat":
        s.unify(w, ax.cat([s.fresh(4), s.fresh(4)]), "torch.cat")
    elif other == "split":
        s.split_at(w, 4, "chunk")
    elif other == "other wreath":
        s.unify(w, _wreath(s, 4, 2), "a GroupNorm of 4 groups")
    elif other == "kron of another size":
        s.unify(w, ax.kron(s.fresh(4), s.fresh(2)), "view as (4, 2)")
    else:
        s.factor(w, 2, "view as (4, 2)")
    assert isinstance(s.resolve(order), ax.Fixed)
    assert "whole groups of channels cannot move" in s.reasons[order.id]
    r = s.resolve(w)
    assert not isinstance(r, ax.Wreath) and not ax.is_fixed(r)


def test_solver_mismatches_raise_layout_errors():
    s = AxisSolver()
    with pytest.raises(LayoutError):
        s.unify(s.fresh(3), s.fresh(4), "test")
    with pytest.raises(LayoutError):
        s.factor(s.fresh(6), 4, "test")
