"""merging.weight_match made cheaper (issue 20, goal 5) finds the permutations it found before.

The expected permutations (``weight_match_reference.json``) were computed by the descent as it
was before the speed-ups (commit 71fc252: every step scored from scratch, every step solved),
on pairs of zoo models where the descent has work to do: two independently randomised models
(many steps, many changes) and a permuted copy with noise on every weight (the truth is near,
nothing tied). Regenerate only on purpose, from a checkout whose answers are the reference:

    PYTHONPATH=$PWD python -m tests.test_weight_match_speed --write

The other tests check the bookkeeping that makes it cheaper: a score made of cached parts equals
the score made from scratch, and a step skipped or batched decides what the step would have.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import graphrepair as gr
from fixtures.zoo import ZOO
from graphrepair.merging import weight_match
from graphrepair.merging.assign import lap
from graphrepair.merging.weight_match import WeightScores, weight_matching
from tests.helpers import randomize_

REFERENCE = Path(__file__).with_name("weight_match_reference.json")

# (model, pair): zoo models covering plain chains, residual streams, grouped convs and GroupNorm
# (Wreath families, moved as wholes), attention (heads x head dims, coupled groups) and a LLaMA
# with grouped-query attention
CASES = [("mlp3", "independent"), ("mlp10", "independent"), ("mlp10", "noisy"),
         ("resnet20_ln", "independent"), ("resnet20_bn", "noisy"), ("transformer_tiny", "independent"),
         ("transformer_tiny", "noisy"), ("vit_tiny_custom", "independent"), ("grouped_conv_net", "noisy"),
         ("groupnorm_cnn", "independent"), ("gpt2_tiny", "independent"), ("llama_gqa", "independent"),
         ("llama_gqa", "noisy")]


def _llama() -> tuple[torch.nn.Module, tuple]:
    from fixtures import hf_natural  # noqa: F401 (makes transformers importable next to torchvision)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
                         attn_implementation="sdpa")
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _model(name: str, seed: int) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    if name == "llama_gqa":
        model, example = _llama()
    else:
        entry = ZOO[name]
        model, example = entry.factory().eval(), entry.example_inputs()
    return randomize_(model, seed=seed + 1), example


def pair(name: str, kind: str):
    """(spec, A's state dict, B's state dict) for one case."""
    if name in ("gpt2_tiny", "llama_gqa"):
        pytest.importorskip("transformers")
    a, example = _model(name, 0)
    spec = gr.discover(a, example)
    if kind == "independent":
        b, _ = _model(name, 10)
    else:
        b = gr.permute(a, spec, spec.random_permutations(seed=3))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for t in b.state_dict().values():
                if t.is_floating_point() and t.numel() > 1:
                    t.add_(0.5 * t.std() * torch.randn(t.shape, generator=gen))
    return spec, a.state_dict(), b.state_dict()


def _key(name: str, kind: str) -> str:
    return f"{name}/{kind}"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name,kind", CASES)
def test_the_permutations_of_the_descent_before_the_speed_ups(reference, name, kind):
    spec, sa, sb = pair(name, kind)
    found = weight_matching(spec, sa, sb)
    expected = reference[_key(name, kind)]
    assert found.keys() == expected.keys()
    assert any(p != list(range(len(p))) for p in expected.values())  # the descent moved something
    for g, p in found.items():
        assert p.tolist() == expected[g], g


@pytest.mark.parametrize("name,kind", [("llama_gqa", "independent"), ("resnet20_ln", "independent")])
def test_a_score_of_cached_parts_is_the_score_from_scratch(name, kind):
    """The residual stream reads every block: its score keeps one part per set of groups its
    tensors read, and a part is remade only when one of those groups moved."""
    spec, sa, sb = pair(name, kind)
    cached = WeightScores(spec, sa, sb)
    big = max(spec.groups, key=lambda g: len(cached.parts(g.name))).name
    assert len(cached.parts(big)) > 2
    held = {g.name: torch.arange(g.size) for g in spec.groups if g.name != big}
    gen = torch.Generator().manual_seed(0)
    for moved in [None] + [g.name for g in spec.groups if g.name != big][:4]:
        if moved is not None:
            held[moved] = torch.randperm(spec.group(moved).size, generator=gen)
        fresh = WeightScores(spec, sa, sb)
        made = cached.made
        got = cached.score(big, held)
        torch.testing.assert_close(got, fresh.score(big, held), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got, fresh.score(big, held, weight_match._inner), rtol=1e-12, atol=1e-9)
        # at most the part that reads the moved group is made again
        assert cached.made - made <= (len(cached.parts(big)) if moved is None else 1)


def _generic(scores: WeightScores) -> WeightScores:
    """``scores`` taking every block through ``_score`` (no group ``plain``)."""
    scores.plain = lambda name: False
    return scores


@pytest.mark.parametrize("lean", [True, False], ids=["plain groups' own path", "_score"])
@pytest.mark.parametrize("name,kind", [("resnet20_ln", "independent"), ("transformer_tiny", "independent"),
                                       ("mlp10", "independent")])
def test_a_block_of_kept_terms_is_the_block_from_scratch_bit_for_bit(monkeypatch, name, kind, lean):
    """The tie-break asks a group's cosines of a few of A's units against a few of B's again and
    again, the other groups moving between: each tensor's term is kept and made again only when
    a group that tensor reads moved (the same units in another order reorder the kept terms).
    Each block equals a fresh ``WeightScores``' block exactly. Both ways a block is made: a
    ``plain`` group's (``_FewUnits``) and ``_score``'s."""
    spec, sa, sb = pair(name, kind)
    made = []
    inner = weight_match._inner
    monkeypatch.setattr(weight_match, "_inner", lambda wa, wb: made.append(1) or inner(wa, wb))
    kept = WeightScores(spec, sa, sb) if lean else _generic(WeightScores(spec, sa, sb))
    g = max(spec.groups, key=lambda h: (len(kept.touches[h.name]), len(kept.depends(h.name)))).name
    reads = kept._reads(g)
    neighbours = list(kept.depends(g))
    assert len(kept.touches[g]) >= 3 and neighbours
    gen = torch.Generator().manual_seed(0)
    size = spec.group(g).size
    rows = torch.randperm(size, generator=gen)[: max(2, size // 3)].sort().values
    cols = torch.randperm(size, generator=gen)[: len(rows)]
    held = {h.name: torch.randperm(h.size, generator=gen) for h in spec.groups if h.name != g}
    steps = [(None, cols), (neighbours[0], cols), (None, cols.flip(0)), (neighbours[-1], cols[torch.randperm(len(cols), generator=gen)])]
    for moved, c in steps:
        if moved is not None:
            held = {**held, moved: torch.randperm(spec.group(moved).size, generator=gen)}
        before = len(made)
        kept._last.clear()  # (the whole block kept: not what is tested here)
        got = kept.cosine(g, held, rows=rows, cols=c)
        n = len(made) - before
        fresh = WeightScores(spec, sa, sb)
        expected = (fresh if lean else _generic(fresh)).cosine(g, held, rows=rows, cols=c)
        assert torch.equal(got, expected)
        assert bool(kept._few) == (lean and kept.plain(g))  # (the way asked for)
        if moved is None and c is cols:
            assert n == len(reads)  # the first block: every term
        elif moved is None:
            assert n == 0  # the same units in another order: every term kept
        else:  # only the terms of the tensors that read the moved group
            assert n == sum(moved in r for r in reads) < len(reads)


@pytest.mark.parametrize("name", ["mlp10", "resnet20_bn", "resnet20_ln", "grouped_conv_net", "transformer_tiny",
                                  "vit_tiny_custom", "llama_gqa"])
def test_a_plain_groups_block_is_scores_block_bit_for_bit(monkeypatch, name):
    """A ``plain`` group's block of a few units (a linear or conv layer's: each tensor holds the
    units along an axis of their own) gathers its rows once and permutes only their other axes
    when other groups move (``_FewUnits``): every block, asked for round after round as the
    tie-break asks (other groups moving, B's units in other orders), equals ``_score``'s block
    bit for bit; a block wider than ``_KEEP_ROWS`` numbers is ``_score``'s. The tie-break's
    ties are exact on the rounded cosines, so the same bits are the same permutations."""
    spec, sa, sb = pair(name, "independent")
    lean, generic = WeightScores(spec, sa, sb), _generic(WeightScores(spec, sa, sb))
    plain = [g.name for g in spec.groups if lean.plain(g.name)]
    assert plain
    if name in ("transformer_tiny", "vit_tiny_custom", "llama_gqa"):
        assert len(plain) < len(spec.groups)  # heads x head dims are read through a Kron: not plain
    gen = torch.Generator().manual_seed(0)
    held = {h.name: torch.randperm(h.size, generator=gen) for h in spec.groups}
    for g in plain:
        size = spec.group(g).size
        k = max(2, size // 4)
        rows = torch.randperm(size, generator=gen)[:k]
        cols = torch.randperm(size, generator=gen)[:k]
        others = {h: p for h, p in held.items() if h != g}
        neighbour = next(iter(lean.depends(g)), None)
        for step in range(4):
            if step == 1:
                cols = cols.flip(0)
            elif step == 2 and neighbour is not None:
                others = {**others, neighbour: torch.randperm(spec.group(neighbour).size, generator=gen)}
            elif step == 3:
                rows, cols = rows.sort().values, cols.sort().values
            got = lean.cosine(g, others, rows=rows, cols=cols)
            assert torch.equal(got, generic.cosine(g, others, rows=rows, cols=cols)), (g, step)
            assert g in lean._few
            assert got.abs().max() > 0
    g = plain[0]  # a group whose own permutation is held: read through its own axis, as _score reads it
    rows = torch.arange(min(3, spec.group(g).size))
    assert torch.equal(lean.cosine(g, held, rows=rows, cols=rows.flip(0)), generic.cosine(g, held, rows=rows, cols=rows.flip(0)))
    monkeypatch.setattr(weight_match, "_KEEP_ROWS", 1)
    wide = WeightScores(spec, sa, sb)
    g = plain[0]
    rows = torch.arange(min(3, spec.group(g).size))
    got = wide.cosine(g, {}, rows=rows, cols=rows.flip(0))
    assert not wide._few
    assert torch.equal(got, generic.cosine(g, {}, rows=rows, cols=rows.flip(0)))


def test_a_settled_group_is_not_scored_again(monkeypatch):
    """A step is a function of the group's neighbours' permutations and its own: a group is scored
    again only when a neighbour moved since its last step, or when the second start reset its own
    permutation (mlp10 has no Wreath family, so nothing else moves a group)."""
    spec, sa, sb = pair("mlp10", "independent")
    calls = []
    score = WeightScores.score

    def counted(self, name, held, pairing=None, *args, **kwargs):
        if pairing is None:
            calls.append((name, {h: held[h].clone() for h in self.depends(name)}))
        return score(self, name, held, pairing, *args, **kwargs)

    monkeypatch.setattr(WeightScores, "score", counted)
    weight_matching(spec, sa, sb)
    assert len(calls) > 2 * len(spec.groups)  # the descent took several sweeps
    last: dict[str, dict] = {}
    repeats = dict.fromkeys(last, 0)
    for name, deps in calls:
        if name in last and all(torch.equal(deps[h], last[name][h]) for h in deps):
            repeats[name] = repeats.get(name, 0) + 1
        last[name] = deps
    assert all(n <= 1 for n in repeats.values()), repeats


def test_the_sorted_start_hands_the_solver_its_score_less_exact_column_constants():
    """The sorted start's matrices are near rank one (each unit's sorted weights look alike): the
    solver gets them less one constant per column, subtracted exactly, and finds the same
    assignment; a matrix where no such exact subtraction exists goes to the solver as it is."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 400, generator=gen) * (1 + 0.05 * torch.randn(300, 1, generator=gen))
    b = torch.randn(300, 400, generator=gen) * (1 + 0.05 * torch.randn(300, 1, generator=gen))
    score = weight_match._sorted_values(a.double()[:, None], b.double()[:, None])
    eased = weight_match._eased(score)
    assert eased is not score
    shift = score - eased
    assert torch.equal(shift, shift[:1].expand_as(shift))  # one constant per column, exactly
    assert torch.equal(shift + eased, score)
    assert torch.equal(lap(eased), lap(score))
    dead = score.clone()
    dead[7] = 0.0  # units without weights: all-zero rows and columns, 0 - v_j is exact
    dead[:, 11] = 0.0
    eased_dead = weight_match._eased(dead)
    assert eased_dead is not dead
    shift = dead - eased_dead
    assert torch.equal(shift, shift[:1].expand_as(shift)) and torch.equal(shift + eased_dead, dead)
    best = lap(dead)
    got = lap(eased_dead)
    rows = torch.arange(len(got))
    assert dead[rows, got].sum() == pytest.approx(float(dead[rows, best].sum()), rel=1e-12)
    mixed = torch.randn(50, 50, generator=gen, dtype=torch.float64)
    assert weight_match._eased(mixed) is mixed


def test_the_objective_is_the_float64_sum_of_the_products_of_every_weight_touched():
    """The objective that picks between the two starts: per weight, A's against B's permuted,
    every product exact in float64 and summed as one float64 tensor, then over the weights in
    order; the same number, bit for bit, as widening both and multiplying."""
    from graphrepair.discovery import axes as ax

    spec, sa, sb = pair("llama_gqa", "independent")
    scores = WeightScores(spec, sa, sb)
    gen = torch.Generator().manual_seed(0)
    perms = {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups}
    vp = {spec.var_of_group[k]: v for k, v in perms.items()}
    keys = sorted({key for items in scores.touches.values() for key, _, _, _ in items})
    assert len(keys) > 10
    want = sum(float((sa[k].double() * ax.permute_tensor(sb[k], spec.param_axes[k], vp).double()).sum())
               for k in keys)
    assert scores.objective(perms) == want
    ident = {g.name: torch.arange(g.size) for g in spec.groups}
    assert scores.objective(ident) == sum(float((sa[k].double() * sb[k].double()).sum()) for k in keys)


def test_the_sorted_start_is_solved_widest_first(monkeypatch):
    """The sorted start's assignments go to the solver's threads two by two, the widest first
    (a wide group's solve does not wait beside a narrow one's); the permutations are the same."""
    spec, sa, sb = pair("llama_gqa", "independent")
    sizes = []
    eased = weight_match._eased

    def spy(score):
        sizes.append(score.shape[0])
        return eased(score)

    want = weight_matching(spec, sa, sb)
    monkeypatch.setattr(weight_match, "_eased", spy)
    got = weight_matching(spec, sa, sb)
    assert len(set(sizes)) > 1 and sizes == sorted(sizes, reverse=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_view_for_products_is_widened_where_it_lies():
    """A group on a weight's input axis reads the weight transposed. For inner products alone its
    view is widened in the weight's own layout (no transposing copy): the same values, a view of
    that layout; anything that cannot be such a view is laid out as before."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(280, 96, generator=gen)  # (out, in): the group on axis 1
    m = w.movedim(1, 0)
    want = weight_match._block(m, 96, 1, True)
    assert want.is_contiguous()
    got = weight_match._block(m, 96, 1, True, keep_layout=True)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert (got.stride()[0], got.stride()[2]) == (1, 96) and got.data_ptr() != w.data_ptr()  # transposed; a copy
    other = torch.randn(280, 96, generator=gen)
    wb = weight_match._block(other.movedim(1, 0), 96, 1, True, keep_layout=True)
    torch.testing.assert_close(weight_match._inner(got, wb),
                               weight_match._inner(want, weight_match._block(other.movedim(1, 0), 96, 1, True)),
                               rtol=1e-13, atol=1e-12)
    # trailing axes that no view can flatten in this layout: laid out as before
    odd = torch.randn(4, 6, 8, generator=gen).transpose(1, 2)
    kept = weight_match._block(odd, 2, 2, True, keep_layout=True)
    assert kept.is_contiguous() and torch.equal(kept, weight_match._block(odd, 2, 2, True))
    assert weight_match._block(w, 28, 10, True, keep_layout=True).is_contiguous()  # a view of a contiguous one


def test_only_inner_products_read_views_widened_where_they_lie(monkeypatch):
    """A score of inner products reads views in their own layout; a cosine, which sums B's norms
    along the views' rows, reads them laid out as always (a sum in another order is not the same
    sum), and either is the score from contiguous views."""
    spec, sa, sb = pair("llama_gqa", "independent")
    seen = []
    block = weight_match._block

    def spy(m, n, r, widen, keep_layout=False, to=torch.float64):
        seen.append(keep_layout)
        return block(m, n, r, widen, keep_layout, to)

    monkeypatch.setattr(weight_match, "_block", spy)
    name = max(spec.groups, key=lambda g: g.size).name
    held = {g.name: torch.arange(g.size) for g in spec.groups if g.name != name}
    got = WeightScores(spec, sa, sb).score(name, held, weight_match._inner)
    assert seen and all(seen)
    seen.clear()
    rows = torch.arange(0, spec.group(name).size, 3)
    WeightScores(spec, sa, sb).cosine(name, held, rows, rows.flip(0))
    assert seen and not any(seen)
    monkeypatch.setattr(weight_match, "_block", lambda m, n, r, widen, keep_layout=False, to=torch.float64: block(m, n, r, widen))
    torch.testing.assert_close(got, WeightScores(spec, sa, sb).score(name, held, weight_match._inner),
                               rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_rows_sorted_side_by_side_are_each_row_sorted_alone(monkeypatch, dtype):
    """The sorted start sorts a large block's rows on several threads: every row is the row
    sorted on its own, widened exactly, whatever the block's strides and however many threads."""
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(700, 1031, generator=gen).to(dtype).T  # strided rows, an uneven split
    want = torch.from_numpy(np.sort(w.float().numpy().astype(np.float64), axis=1))
    for threads in (1, 2, 3):
        monkeypatch.setattr(weight_match, "workers", lambda: threads)
        got = weight_match._sorted_rows(w)
        assert got.dtype == torch.float64 and got.shape == w.shape
        assert torch.equal(got, want)
    monkeypatch.setattr(weight_match, "_SORT_SPLIT", 1 << 30)  # one thread: the same values
    assert torch.equal(weight_match._sorted_rows(w), want)


def test_the_benchmark_times_both_merges_of_one_llama_pair(capsys):
    pytest.importorskip("transformers")
    from benchmarks import bench_weight_matching

    t_act, t_w, t_wm = bench_weight_matching.main(["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                                                   "--vocab", "50", "--sequences", "4", "--tokens", "8"])
    out = capsys.readouterr().out
    assert "LLaMA hidden 32, 1 layers, MLP 256" in out and "load average" in out
    assert 0 < t_wm < t_w and t_act > 0
    printed = float(re.search(r"weight / activation = ([\d.]+)x", out).group(1))
    assert abs(printed - t_w / t_act) < 0.01 and "goal (issue 20, goal 5): <= 2x" in out


def test_the_benchmark_prunes_other_units_in_a_and_in_b(capsys):
    """``--pruned``: a share of each MLP's units without weights (rows of gate and up, columns of
    down all zero), other units in A and in B; the merges run and the line says so."""
    pytest.importorskip("transformers")
    import argparse

    from benchmarks import bench_weight_matching

    args = argparse.Namespace(vocab=50, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2,
                              tokens=8, sequences=4, pruned=0.25)
    a, b, _ = bench_weight_matching.pair(args)
    dead = []
    for model in (a, b):
        for layer in model.model.layers:
            rows = (layer.mlp.gate_proj.weight == 0).all(1)
            assert torch.equal(rows, (layer.mlp.up_proj.weight == 0).all(1))
            assert torch.equal(rows, (layer.mlp.down_proj.weight == 0).all(0))
            assert int(rows.sum()) == 16
            dead.append(rows)
    assert not torch.equal(dead[0], dead[2])  # other units in A and in B
    bench_weight_matching.main(["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                                "--vocab", "50", "--sequences", "4", "--tokens", "8", "--pruned", "0.25"])
    assert "25% of each MLP pruned" in capsys.readouterr().out


def write() -> None:
    out = {}
    for name, kind in CASES:
        spec, sa, sb = pair(name, kind)
        out[_key(name, kind)] = {g: p.tolist() for g, p in weight_matching(spec, sa, sb).items()}
        print(name, kind, file=sys.stderr)
    REFERENCE.write_text(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()


@pytest.mark.parametrize("dtype,want", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                        (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_descent_products_are_in_the_weights_own_precision(dtype, want):
    """``WeightScores(products="own")`` (the descent's scores) multiplies views in the weights'
    own precision, at least float32: a float32 weight read as it lies is not copied at all, a
    half-precision one is widened to float32 only. Its scores are the float64 ones to within
    float32 rounding; the default keeps float64 products."""
    spec, sa, sb = pair("mlp10", "independent")
    sa = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sa.items()}
    sb = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sb.items()}
    name = max(spec.groups, key=lambda g: g.size).name
    held = {g.name: torch.randperm(g.size, generator=torch.Generator().manual_seed(1))
            for g in spec.groups if g.name != name}
    own, exact = WeightScores(spec, sa, sb, products="own"), WeightScores(spec, sa, sb)
    views = list(own.views(name, held, keep_layout=True))
    assert views and all(wa.dtype == wb.dtype == want for wa, wb in views)
    assert all(wa.dtype == torch.float64 for wa, _ in exact.views(name, held, keep_layout=True))
    if dtype == torch.float32:  # A's views of a weight as it lies: the weight's own memory
        key = own.touches[name][0][0]
        assert views[0][0].data_ptr() == sa[key].data_ptr()
    got, ref = own.score(name, held), exact.score(name, held)
    assert got.dtype == ref.dtype == torch.float64
    assert not torch.equal(got, ref) or dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-12)
    with pytest.raises(gr.GraphRepairError, match="products"):
        WeightScores(spec, sa, sb, products="float16")


@pytest.mark.parametrize("name,kind", [("resnet20_bn", "noisy"), ("transformer_tiny", "independent"),
                                       ("llama_gqa", "noisy")])
def test_descent_in_the_weights_precision_finds_the_float64_permutations(monkeypatch, name, kind):
    """The descent's float32 products decide as float64 ones do (they differ only where two
    assignments' sums are within float32 rounding of each other)."""
    spec, sa, sb = pair(name, kind)
    got = weight_matching(spec, sa, sb)
    made = []
    real = WeightScores.__init__

    def exact(self, *args, products="float64", **kwargs):
        made.append(products)
        real(self, *args, products="float64", **kwargs)

    monkeypatch.setattr(WeightScores, "__init__", exact)
    want = weight_matching(spec, sa, sb)
    assert made == ["own"]  # weight_matching asks for its own precision
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_descent_products_stay_float64_where_float32_products_are_reduced():
    """Where the caller lets float32 matrix products run in TF32 or bfloat16
    (``torch.set_float32_matmul_precision``), the descent's products are float64."""
    spec, sa, sb = pair("mlp3", "independent")
    name = spec.groups[0].name
    before = torch.get_float32_matmul_precision()
    try:
        for precision, want in (("high", torch.float64), ("medium", torch.float64), ("highest", torch.float32)):
            torch.set_float32_matmul_precision(precision)
            views = list(WeightScores(spec, sa, sb, products="own").views(name, {}, keep_layout=True))
            assert views and all(wa.dtype == wb.dtype == want for wa, wb in views), precision
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_sorted_starts_column_constants_are_tightened_on_the_matrix_itself():
    """The rank-one duals are tightened on the score: the dual bound on every assignment's sum
    (sum_j w_j + sum_i max_j (S_ij - w_j)) drops, stays above the optimum, and the solver is
    handed the score less the tightened constants, exactly, with the same answer."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 400, generator=gen) * (1 + 0.05 * torch.randn(300, 1, generator=gen))
    b = torch.randn(300, 400, generator=gen) * (1 + 0.05 * torch.randn(300, 1, generator=gen))
    score = weight_match._sorted_values(a.double()[:, None], b.double()[:, None])

    def bound(w):
        return float(w.sum() + (score - w).max(1).values.sum())

    v = weight_match._rank_one_duals(score)
    w = weight_match._tightened(score, v)
    best = lap(score)
    optimum = float(score[torch.arange(300), best].sum())
    assert optimum - 1e-9 <= bound(w) < bound(v) - 1e-6
    eased = weight_match._eased(score)
    assert torch.equal(score - eased, w.expand_as(score))  # the tightened constants were taken
    assert torch.equal(eased + w, score)  # subtracted exactly
    assert torch.equal(lap(eased), best)


def test_a_few_units_scored_in_their_own_precision_leave_no_views_for_a_cosine():
    """A's views of a few units are kept for the tie-break's next cosine only when they are
    float64: a block scored in the weights' own precision first, then its cosine, gives the
    cosine of fresh scores."""
    spec, sa, sb = pair("mlp10", "independent")
    name = max(spec.groups, key=lambda g: g.size).name
    held = {g.name: torch.arange(g.size) for g in spec.groups if g.name != name}
    rows = torch.arange(0, spec.group(name).size, 3)
    own = WeightScores(spec, sa, sb, products="own")
    block = own.score(name, held, rows=rows, cols=rows.flip(0))
    torch.testing.assert_close(block, WeightScores(spec, sa, sb).score(name, held, rows=rows, cols=rows.flip(0)),
                               rtol=1e-5, atol=1e-6)
    got = own.cosine(name, held, rows, rows.flip(0))
    torch.testing.assert_close(got, WeightScores(spec, sa, sb).cosine(name, held, rows, rows.flip(0)),
                               rtol=1e-12, atol=1e-12)


def test_the_pairing_free_scores_multiply_in_the_weights_own_precision():
    """The sorted start's products and the heads' best replicas: float32 weights are multiplied
    in float32, float64 ones in float64, and float32 ones in float64 where the caller lets float32
    products run in TF32 or bfloat16 (``torch.set_float32_matmul_precision``)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 1, 300, generator=gen), torch.randn(40, 1, 300, generator=gen)
    want = a.flatten(1).sort(1).values @ b.flatten(1).sort(1).values.T
    got = weight_match._sorted_values(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    got64 = weight_match._sorted_values(a.double(), b.double())
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want.double(), rtol=1e-5, atol=1e-4)
    ra, rb = torch.randn(8, 4, 50, generator=gen), torch.randn(8, 4, 50, generator=gen)
    best = weight_match._best_replicas(ra, rb)
    want_best = torch.einsum("irk,jsk->ijrs", ra, rb).max(-1).values.double().sum(-1)
    assert best.dtype == torch.float64 and torch.equal(best, want_best)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert weight_match._sorted_values(a, b).dtype == torch.float64
        wide = torch.einsum("irk,jsk->ijrs", ra.double(), rb.double()).max(-1).values.sum(-1)
        assert torch.equal(weight_match._best_replicas(ra, rb), wide)
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_rank_one_power_iteration_stops_once_it_settles(monkeypatch):
    """The sorted start's column constants come from the first singular pair, found by power
    iteration; on a near rank-one matrix its vector settles within a few steps, where it stops:
    the constants are those of thirty steps up to rounding, and the eased matrix's optimum is the same."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 400, generator=gen) * (1 + 0.05 * torch.randn(200, 1, generator=gen))
    b = torch.randn(200, 400, generator=gen) * (1 + 0.05 * torch.randn(200, 1, generator=gen))
    score = weight_match._sorted_values(a.double()[:, None], b.double()[:, None])
    steps = []
    matmul = torch.Tensor.__matmul__

    class Counted(torch.Tensor):
        pass

    def counted(self, other):
        steps.append(1)
        return matmul(torch.Tensor(self), other)

    monkeypatch.setattr(Counted, "__matmul__", counted)
    v = weight_match._rank_one_duals(score.as_subclass(Counted)).as_subclass(torch.Tensor)
    assert 4 <= len(steps) <= 2 * 6  # (two products a step, and the last singular pair's)
    monkeypatch.setattr(weight_match, "_SETTLED", -1.0)  # never settled: all thirty steps
    steps.clear()
    full = weight_match._rank_one_duals(score.as_subclass(Counted)).as_subclass(torch.Tensor)
    assert len(steps) == 2 * 30 + 1
    torch.testing.assert_close(v, full, rtol=0, atol=1e-12 * float(score.abs().max()))
    assert torch.equal(lap(weight_match._eased(score)), lap(score))
