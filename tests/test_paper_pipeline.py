"""The baseline of bench_merge (benchmarks/paper_pipeline.py): the paper's layer-by-layer merge."""

from __future__ import annotations

import copy

import torch

from benchmarks.paper_pipeline import paper_merge
from fixtures.zoo import mlp


def test_a_permuted_copy_merges_back_into_the_model():
    torch.manual_seed(0)
    a = mlp(depth=3, width=32).eval()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B: A with its hidden units shuffled (the same function)
        linears = [m for m in b if isinstance(m, torch.nn.Linear)]
        for cur, nxt in zip(linears, linears[1:]):
            p = torch.randperm(cur.out_features, generator=g)
            cur.weight.copy_(cur.weight[p])
            cur.bias.copy_(cur.bias[p])
            nxt.weight.copy_(nxt.weight[:, p])
    x = torch.randn(600, 1, 28, 28, generator=g)
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)
    merged = paper_merge(a, b, x, batch_size=200)
    torch.testing.assert_close(merged(x), a(x), rtol=1e-3, atol=1e-3)  # aligned, averaged, reset: A again


def test_the_merge_resets_every_layer_to_its_goal():
    torch.manual_seed(0)
    a, b = mlp(depth=3, width=32).eval(), mlp(depth=3, width=32).eval()
    x = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    before = [p.clone() for p in b.parameters()]
    merged = paper_merge(a, b, x, batch_size=100)
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))  # B is left as it was
    h = merged[:2](x)  # the first hidden layer's output: reset to a std between A's and B's
    std = h.std(0, unbiased=False)
    lo = torch.minimum(a[:2](x).std(0, unbiased=False), b[:2](x).std(0, unbiased=False)).min()
    hi = torch.maximum(a[:2](x).std(0, unbiased=False), b[:2](x).std(0, unbiased=False)).max()
    assert bool(((std >= lo * 0.99) & (std <= hi * 1.01)).all())
