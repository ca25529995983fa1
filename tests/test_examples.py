"""graphrepair.io.examples: one data path for every pass.

Every form of data gives the same batches; every pass sees the same examples (held in memory, or
replayed and checked against the first pass); a shuffling loader that cannot be held is refused
before the first pass; keyword inputs reach the model; floating data take the model's dtype; data
without a batch axis are named as such.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import graphrepair as gr
from graphrepair.errors import DataError
from graphrepair.io.data import ArrayDataset
from graphrepair.io.examples import Batch, DifferentExamplesError, Examples, FewerExamplesWarning
from graphrepair.io.inputs import Inputs

X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(40) % 3


class Rows(Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return X[i], Y[i]


class Batches(IterableDataset):
    def __iter__(self):
        return iter([(X[i:i + 16], Y[i:i + 16]) for i in range(0, 40, 16)])


FORMS = {
    "tensor": lambda: X,
    "numpy": lambda: X.numpy(),
    "ArrayDataset": lambda: ArrayDataset(X, Y),
    "TensorDataset": lambda: TensorDataset(X, Y),
    "(x, y)": lambda: (X, Y),
    "dict with x": lambda: {"x": X, "y": Y},
    "map-style Dataset": lambda: Rows(),
    "DataLoader": lambda: DataLoader(TensorDataset(X, Y), batch_size=16),
    "list of batches": lambda: [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 40, 16)],
    "generator": lambda: ((X[i:i + 16], Y[i:i + 16]) for i in range(0, 40, 16)),
    "IterableDataset of batches": lambda: Batches(),
    "list of dict batches": lambda: [{"x": X[i:i + 16], "labels": Y[i:i + 16]} for i in range(0, 40, 16)],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_gives_the_same_batches(form):
    ex = Examples(FORMS[form](), 36, 16)
    for _ in range(2):  # every pass alike (a generator is read once and held)
        batches = list(ex)
        assert [b.size for b in batches] == [16, 16, 4]
        torch.testing.assert_close(torch.cat([b.inputs.first for b in batches]), X[:36], rtol=0, atol=0)
        if form not in ("tensor", "numpy"):
            assert torch.equal(torch.cat([b.labels for b in batches]), Y[:36])
    assert ex.count == 36
    assert torch.equal(ex.example().first, X[:2])


class Counting:
    """A re-iterable that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


class Reordering:
    """A re-iterable that gives its examples in another order every pass (as a shuffling loader)."""

    def __init__(self, x, batch=16):
        self.x, self.batch, self.passes = x, batch, 0

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.passes))
        return iter([self.x[order[i:i + self.batch]] for i in range(0, len(self.x), self.batch)])


def test_examples_within_the_budget_are_read_once_and_held():
    data = Counting([X[:16], X[16:32], X[32:]])
    ex = Examples(data)
    first = [b.inputs.first for b in ex]
    for _ in range(3):
        assert all(torch.equal(a, b.inputs.first) for a, b in zip(first, ex))
    assert data.reads == 1 and ex.held


def test_a_reordering_source_is_held_and_every_pass_sees_the_first():
    ex = Examples(Reordering(X))
    first = torch.cat([b.inputs.first for b in ex])
    again = torch.cat([b.inputs.first for b in ex])
    assert torch.equal(first, again) and ex.held


def test_beyond_the_budget_a_reordering_source_is_caught_in_its_second_pass():
    ex = Examples(Reordering(X), hold_bytes=200)
    list(ex)  # the first pass: fingerprints only
    assert not ex.held
    with pytest.raises(DifferentExamplesError, match=r"gave other examples in pass 2 than in pass 1 \(batch 0 "
                                                     r"holds other examples.*shuffle=False.*tensor.*fewer examples"):
        list(ex)


def test_a_merge_over_a_reordering_source_beyond_the_budget_refuses_in_its_second_pass():
    a, b = _mlp(1), _mlp(2)
    with pytest.raises(DifferentExamplesError, match="in pass 2 than in pass 1"):  # the REPAIR pass
        gr.merge(a, b, Examples(Reordering(X), 40, 16, hold_bytes=200))
    ex = Examples(Reordering(X), 40, 16)
    merged = gr.merge(a, b, ex)  # held: every pass sees the examples of the first, in its order
    held = torch.cat([batch.inputs.first for batch in ex])
    same = gr.merge(a, b, held, num_examples=40, batch_size=16)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), same(X), rtol=1e-6, atol=1e-6)


def test_beyond_the_budget_a_stable_source_is_replayed():
    data = Counting([X[:16], X[16:32], X[32:]])
    ex = Examples(data, hold_bytes=200)
    a, b = (torch.cat([t.inputs.first for t in ex]) for _ in range(2))
    assert torch.equal(a, b) and data.reads == 2 and not ex.held


def test_a_shorter_second_pass_is_caught():
    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([X[:16], X[16:32]] if self.passes == 1 else [X[:16]])

    ex = Examples(Shrinking(), hold_bytes=200)
    list(ex)
    with pytest.raises(DifferentExamplesError, match="ended after 1 batches, pass 1 after 2"):
        list(ex)


def test_take_reads_the_first_examples_of_the_same_batches():
    ex = Examples(Counting([X[:16], X[16:32], X[32:]]), hold_bytes=200)
    list(ex)
    taken = list(ex.take(20))
    assert [b.size for b in taken] == [16, 4] and torch.equal(torch.cat([b.inputs.first for b in taken]), X[:20])
    ex = Examples(Reordering(X), hold_bytes=200)
    list(ex)
    with pytest.raises(DifferentExamplesError):  # the source reordered: a partial pass is checked too
        list(ex.take(20))


def test_a_shuffling_loader_that_cannot_be_held_is_refused_before_the_first_pass():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    ex = Examples(loader, hold_bytes=100)
    seen = []
    with pytest.raises(DataError, match=r"shuffles \(its sampler is a RandomSampler\).*more than can be held "
                                        r"in memory.*shuffle=False"):
        for batch in ex:
            seen.append(batch)
    assert seen == []
    # a merge refuses before its model ever runs on a batch
    a, b = _mlp(1), _mlp(2)
    calls = []
    a[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with pytest.raises(DataError, match="RandomSampler"):
        gr.merge(a, b, Examples(loader, 40, 16, hold_bytes=100))
    assert calls == []


def test_a_shuffling_loader_within_the_budget_is_held():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    ex = Examples(loader)
    first = torch.cat([b.inputs.first for b in ex])
    assert torch.equal(first, torch.cat([b.inputs.first for b in ex]))
    assert sorted(first[:, 0].tolist()) == sorted(X[:, 0].tolist())  # the examples, in the loader's order


def test_evaluation_does_not_need_one_order():
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    model = _mlp(1)
    assert gr.evaluate(model, loader) == pytest.approx(gr.evaluate(model, (X, Y)), abs=1e-6)


def test_a_generator_is_held_whatever_its_size():
    ex = Examples((X[i:i + 16] for i in range(0, 40, 16)), hold_bytes=10)
    assert [b.size for b in ex] == [16, 16, 8] == [b.size for b in ex]


def test_fewer_examples_warn_once():
    ex = Examples([X[:16], X[16:20]], 100)
    with pytest.warns(FewerExamplesWarning, match="only 20 examples, fewer than the 100 requested"):
        list(ex)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(ex)
    assert ex.count == 20


def test_user_failures_name_the_batch():
    def failing():
        yield X[:16]
        raise ValueError("disk gone")

    with pytest.raises(DataError, match="reading batch 1 raised ValueError: disk gone"):
        list(Examples(failing()))


def test_inputs_named_differently_from_the_first_batch_are_refused():
    data = [{"input_ids": X[:4].long(), "attention_mask": X[:4]}, {"input_ids": X[:4].long()}]
    with pytest.raises(DataError, match="batch 1 has inputs input_ids where the first batch has "
                                        "input_ids, attention_mask"):
        list(Examples(data))


def test_shard_gives_contiguous_blocks_of_whole_batches():
    ex = Examples(Reordering(X, batch=8))  # read once (one pass, held), then split by batch
    parts = [ex.shard(r, 2) for r in range(2)]
    assert [p.count for p in parts] == [16, 24]
    joined = torch.cat([b.inputs.first for p in parts for b in p])
    assert torch.equal(joined, torch.cat([b.inputs.first for b in ex]))


# -- the models' dtype and several inputs ----------------------------------------------------------

def _mlp(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_of_another_floating_dtype_takes_float32_data(dtype):
    a = _mlp(1, dtype)
    merged = gr.merge(a, copy.deepcopy(a), X, num_examples=40, batch_size=16)
    assert next(merged.parameters()).dtype == dtype
    with torch.no_grad():
        diff = float((merged(X.to(dtype)).double() - a(X.to(dtype)).double()).abs().max())
    assert diff < (1e-5 if dtype == torch.float64 else 0.05)  # REPAIR's resets hold float32 goals
    assert gr.evaluate(a, (X, Y))[0] == pytest.approx(gr.evaluate(a, (X.to(dtype), Y))[0])
    ex = Examples(X, dtype=dtype)
    assert {b.inputs.first.dtype for b in ex} == {dtype}


def test_an_iterable_dataset_of_single_examples_is_named():
    class Single(IterableDataset):
        def __iter__(self):
            return iter(X)  # one example (6,) at a time: no batch axis

    with pytest.raises(DataError, match=r"yields single examples without a batch axis.*DataLoader\(dataset, "
                                        r"batch_size=256\)"):
        gr.merge(_mlp(1), _mlp(2), Single(), num_examples=40)


class Masked(nn.Module):
    """A model of two inputs whose output depends on both: features, and a mask over them."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.b(torch.relu(self.a(x * mask)))


def _masked_batches(mask, form):
    out = []
    for i in range(0, 40, 16):
        x, m, y = X[i:i + 16], mask[i:i + 16], Y[i:i + 16]
        out.append({"x": x, "mask": m, "labels": y} if form == "dict" else ((x, m), y))
    return out


def test_both_inputs_reach_the_model_in_every_pass():
    a, b = Masked(1), Masked(2)
    ones = torch.ones_like(X)
    half = (torch.arange(6) < 3).float().expand(40, 6).contiguous()
    merged = [gr.merge(a, b, _masked_batches(m, "tuple"), num_examples=40, refit=1) for m in (ones, half)]
    with torch.no_grad():
        assert not torch.allclose(merged[0](X, ones), merged[1](X, ones))  # the mask was used
    # evaluation calls the model with every keyword input too
    batches = [{"x": X[i:i + 16], "mask": ones[i:i + 16], "labels": Y[i:i + 16]} for i in range(0, 40, 16)]
    masked = [{**d, "mask": half[:len(d["x"])]} for d in batches]
    assert gr.evaluate(a, batches)[1] != pytest.approx(gr.evaluate(a, masked)[1])


def test_dict_batches_give_the_model_every_keyword_input():
    a, b = Masked(1), Masked(2)
    ones = torch.ones_like(X)
    half = (torch.arange(6) < 3).float().expand(40, 6).contiguous()
    merged = [gr.merge(a, b, _masked_batches(m, "dict"), num_examples=40) for m in (ones, half)]
    with torch.no_grad():
        assert not torch.allclose(merged[0](X, ones), merged[1](X, ones))


def test_batch_to_and_head():
    batch = Batch(Inputs.of({"ids": torch.arange(8).reshape(4, 2), "w": torch.ones(4, 2)}), Y[:4])
    small = batch.head(3).to("cpu", torch.float64)
    assert small.size == 3 and small.labels.tolist() == Y[:3].tolist()
    assert small.inputs.kwargs["ids"].dtype == torch.int64 and small.inputs.kwargs["w"].dtype == torch.float64
    assert isinstance(np.asarray(small.labels), np.ndarray)
