"""What the joint pass's design leaves to gain: its parts per batch of the paper MLP (issue 20, goal 1).

    python -m benchmarks.bench_design [--depth 20] [--width 128] [--batch-size 500] [--batches 10]
                                      [--repeats 5] [--compile]

Goal 1 asks for the paper MLP's merge in <= 3x the plain passes of A, B and the merged model.
Most of the merge is the joint pass of A and B (``graphrepair.merging.stats.run_pair``: the paired
graph of ``passes.pair`` with a ``passes.pair_tap.PairTap`` at every observed node and reset
point). This times, per batch, in one process: the best of ``--repeats`` rounds of ``--batches``
calls each, the parts alternated round by round:

- ``plain A + B``: both models' own forward, as a user runs them;
- ``A and B as one model``: the same two models run as one, their parameters stacked
  (``torch.func.stack_module_state``, ``torch.func.vmap`` of ``torch.func.functional_call``), and
  for the MLP written by hand as one ``torch.baddbmm`` per layer: what running A and B "side by
  side as one model" could save on the models' own part;
- ``paired graph, taps that do nothing``: the joint pass's graph with every tap a no-op (the cost
  of pairing the graph);
- ``paired graph, the merge's taps``: the joint pass as a merge runs it (the real tap plan of an
  activation-matching merge with exact REPAIR; the taps' sums kept across batches as in a merge),
  and the same taps keeping no per-batch moments at the reset points (what exact REPAIR's
  per-batch goals cost the joint pass);
- with ``--compile``: the statistics the taps take, written as one function of the batch (A and
  B layer by layer; per hidden layer the sums and sums of squares of the pre- and post-activation
  of A and of B, and A's and B's post-activation cross product), eager and compiled by
  ``torch.compile`` (fused kernels; its compile time printed, from an empty cache): what kernel
  fusion would save, and what it costs first. Where torch.compile cannot run (inductor's CPU
  kernels need a C++ compiler) it says why and times the eager statistics only.

Each figure is also given for a merge of ``--batches`` batches (5,000 examples at 500).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

import graphrepair as gr
from graphrepair.merging.points import observation_points, reset_points
from graphrepair.merging.stats import pair_roots, plan_taps
from passes.pair import pair_graph
from fixtures.zoo import mlp
from benchmarks.bench_merge import load
from benchmarks.paper_pipeline import _hidden  # the hidden Linear layers (each before a ReLU)


class Skip(nn.Module):
    """A tap that takes A's and B's values and does nothing with them."""

    def forward(self, a, b):
        return None


def _best(fns: dict, repeats: int, calls: int) -> dict[str, float]:
    """Seconds per call of each of ``fns``: the best of ``repeats`` rounds of ``calls`` calls
    each, the functions alternated round by round (so that a change of the machine's speed falls
    on all of them)."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / calls)
    return best


def _linears(model: nn.Sequential) -> list[nn.Linear]:
    """The MLP's hidden Linear layers (``paper_pipeline._hidden``'s), in order."""
    return [model[i] for i in _hidden(model)]


def by_hand_stacked(a: nn.Sequential, b: nn.Sequential):
    """A and B's hidden layers as one batched model, one ``baddbmm`` and one ReLU per layer."""
    la, lb = _linears(a), _linears(b)
    weights = [torch.stack([p.weight.T, q.weight.T]).contiguous() for p, q in zip(la, lb)]
    biases = [torch.stack([p.bias, q.bias])[:, None] for p, q in zip(la, lb)]
    head = torch.stack([a[-1].weight.T, b[-1].weight.T]).contiguous(), torch.stack([a[-1].bias, b[-1].bias])[:, None]

    def run(x):
        h = torch.flatten(x, 1).expand(2, -1, -1)
        for w, c in zip(weights, biases):
            h = torch.relu(torch.baddbmm(c, h, w))
        return torch.baddbmm(head[1], h, head[0])

    return run


def statistics_step(a: nn.Sequential, b: nn.Sequential):
    """The joint pass's statistics of the MLP written as one function of a batch (see the module
    doc): per hidden layer, [S1, S2] of the pre- and post-activation of A and of B, and A's and B's
    post-activation cross product."""
    la, lb = _linears(a), _linears(b)

    def step(x):
        xa = xb = torch.flatten(x, 1)
        out = []
        for p, q in zip(la, lb):
            za, zb = F.linear(xa, p.weight, p.bias), F.linear(xb, q.weight, q.bias)
            ra, rb = torch.relu(za), torch.relu(zb)
            for t in (za, zb, ra, rb):
                out.append(t.sum(0))
                out.append((t * t).sum(0))
            out.append(ra.T @ rb)
            xa, xb = ra, rb
        return out

    return step


@torch.no_grad()
def run(depth: int = 20, width: int = 128, batch_size: int = 500, batches: int = 10, repeats: int = 5,
        compile: bool = False) -> dict[str, float]:
    """Seconds per batch of each part (see the module doc); prints them."""
    torch.manual_seed(0)
    a, b = mlp(depth=depth, width=width).eval(), mlp(depth=depth, width=width).eval()
    x = torch.randn(batch_size, 1, 28, 28)
    spec = gr.discover(a, (x[:2],))
    cpu = torch.device("cpu")
    plan = plan_taps(spec, observation_points(spec), reset_points(spec, "all"), cross_at_resets=False, device=cpu)
    root_a, root_b = pair_roots(spec, a, b, cpu)
    taps = plan.taps
    for node, i in plan.at_reset.values():  # as a merge's pass keeps them
        taps[node].keep_batches(i)
    real = pair_graph(spec.traced.gm, root_a, root_b, taps, outputs=False).graph_module
    unkept = plan_taps(spec, observation_points(spec), reset_points(spec, "all"), cross_at_resets=False,
                       device=cpu).taps  # the same taps keeping no per-batch rows
    lean = pair_graph(spec.traced.gm, root_a, root_b, unkept, outputs=False).graph_module
    skip = pair_graph(spec.traced.gm, root_a, root_b, {n: Skip() for n in taps}, outputs=False).graph_module
    params, buffers = torch.func.stack_module_state([a, b])
    base = mlp(depth=depth, width=width).to("meta")

    def one(p, bufs, inp):
        return torch.func.functional_call(base, (p, bufs), (inp,))

    vmapped = torch.func.vmap(one, in_dims=(0, 0, None))
    stacked = by_hand_stacked(a, b)
    fns = {
        "plain A + B": lambda: (a(x), b(x)),
        "A and B as one model (vmap)": lambda: vmapped(params, buffers, x),
        "A and B as one model (baddbmm)": lambda: stacked(x),
        "paired graph, taps that do nothing": lambda: skip(x),
        "paired graph, the merge's taps": lambda: real(x),
        "the same, no per-batch moments kept": lambda: lean(x),
    }
    if not (torch.allclose(stacked(x)[0], a(x), atol=1e-5) and torch.allclose(vmapped(params, buffers, x)[1], b(x), atol=1e-5)):
        raise RuntimeError("A and B as one model do not compute what A and B compute")
    compile_s = None
    if compile:
        step = statistics_step(a, b)
        fns["statistics, eager ops"] = lambda: step(x)
        try:  # from an empty cache: what a model's first merge would pay
            with tempfile.TemporaryDirectory() as cache, temporary_cache_dir(cache):
                t = time.perf_counter()
                compiled = torch.compile(step)
                got = compiled(x)
                compile_s = time.perf_counter() - t
        except Exception as e:  # e.g. no C++ compiler for inductor's CPU kernels
            print(f"torch.compile could not compile the statistics here ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); timing them eager only")
        else:
            want = step(x)
            if not all(torch.allclose(g, w, rtol=1e-4, atol=1e-3) for g, w in zip(got, want)):
                raise RuntimeError("the compiled statistics differ from the eager ones")
            fns["statistics, compiled (torch.compile)"] = lambda: compiled(x)
    for f in fns.values():  # warm-up (allocator, the taps' waiting buffers)
        f()
        f()
    best = _best(fns, repeats, batches)
    plain = best["plain A + B"]
    print(f"paper MLP {depth} x {width}, batches of {batch_size}, best of {repeats} rounds of {batches} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {load()})")
    for k, s in best.items():
        print(f"  {k:40s} {s * 1e3:7.3f} ms per batch = {s / plain:5.2f} x plain A + B; "
              f"{s * batches * 1e3:6.1f} ms per merge of {batches} batches")
    if compile_s is not None:
        print(f"  (torch.compile took {compile_s:.1f} s before the first batch, its cache empty)")
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the statistics compiled by torch.compile")
    args = p.parse_args()
    run(args.depth, args.width, args.batch_size, args.batches, args.repeats, args.compile)


if __name__ == "__main__":
    main()
