"""One rank of the distributed tests (``tests/test_distributed.py``).

    python -m tests.dist_worker OUT_DIR CASE [CASE ...]

joins the process group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what
torchrun sets), runs each case over this rank's share of the data (``Examples.shard``)
and saves what it found to OUT_DIR/CASE.rank{R}.pt. ``build(case)`` makes the same models and data
in every process, so that the test can compute the one-process answer itself. The case ``fail``
makes rank 1's data bad half way through its pass; every worker then saves the error it ended
with and exits with status 2.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

import graphrepair as gr
from fixtures.zoo import mlp, resnet20
from tests.helpers import randomize_


class SplitHeadLM(nn.Module):
    """A one-block transformer whose attention splits heads by hand (view, transpose, matmul):
    heads and head dims meet in one tensor, so their groups are aligned jointly."""

    def __init__(self, vocab: int = 40, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, t, d = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, d // h).transpose(1, 2)
        y = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1) @ v
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(x)
        return self.head(x)


def _mlp_pair():
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mlp(depth=3, width=32, in_features=64, classes=10)
        with torch.no_grad():  # dead units (their ReLU never fires): rows of zero correlation, ties
            m[1].bias[seed * 3:seed * 3 + 4] = -30.0
        models.append(m.eval())
    return models


def _grouped_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def build(case: str):
    """(models, inputs, labels or None, examples used, batch size, merge keyword arguments)."""
    g = torch.Generator().manual_seed(7)
    if case in ("mlp", "mlp_one_batch", "align_weight", "barrier", "study", "fail", "refit"):
        a, b = _mlp_pair()
        n = {"mlp": 200, "mlp_one_batch": 20, "align_weight": 20, "barrier": 120, "study": 120, "fail": 40000,
             "refit": 200}[case]
        x = torch.randn(n, 64, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        kwargs = {"repair": "approx"} if case == "mlp_one_batch" else {"refit": 1} if case == "refit" else {}
        return [a, b], x, y, n, 32, kwargs
    if case in ("resnet", "resnet_reset"):
        torch.manual_seed(0)
        a, b = (randomize_(resnet20("bn", width=1).eval(), s) for s in (1, 2))
        kwargs = {"repair": "reset"} if case == "resnet_reset" else {}
        return [a, b], torch.randn(40, 3, 16, 16, generator=g), None, 40, 16, kwargs
    if case == "groups":  # GroupNorm and a grouped conv: whole groups of channels move (Wreath families)
        torch.manual_seed(0)
        a, b = (randomize_(_grouped_net().eval(), s) for s in (1, 2))
        return [a, b], torch.randn(48, 3, 8, 8, generator=g), None, 48, 16, {}
    if case == "heads":
        torch.manual_seed(0)
        a, b = SplitHeadLM().eval(), SplitHeadLM().eval()
        return [a, b], torch.randint(0, 40, (60, 12), generator=g), None, 60, 16, {}
    raise ValueError(case)


def answer(case: str, data, labels=None, num_examples=None):
    """What a case computes on ``data`` (this rank's share, or all of it in one process)."""
    models, x, y, n, bs, kwargs = build(case)
    n = num_examples if num_examples is not None else n
    if case == "barrier":
        from torch.utils.data import TensorDataset

        curve = gr.barrier(*models, eval_data=TensorDataset(data, labels), fit_data=data, alphas=3,
                           num_examples=n, batch_size=bs)
        return {"accuracy": curve.accuracy, "loss": curve.loss}
    if case == "align_weight":  # one batch: rank 1 has no data, only the spec's tracing needs it
        return {"perms": gr.align(*models, data, method="weight", num_examples=n, batch_size=bs)}
    if case == "study":  # the per-layer measurements (observers summed across ranks)
        from torch.utils.data import TensorDataset

        from graphrepair.study.runner import run_study

        study = run_study(*models, fit_data=data, eval_data=TensorDataset(data, labels), alphas=3,
                          num_examples=n, batch_size=bs, layers=True)
        return {"layers": [(r["variance_ratio"], r["llfc_cosine"]) for r in study.layers]}
    res = gr.merge_models(models, data, num_examples=n, batch_size=bs, **kwargs)
    return {"perms": res.perms[0], "state": res.model.state_dict(), "examples": res.examples,
            "dead": res.dead_channels}


class _Failing:
    """Rank 1's share in the case ``fail``: one good batch, then bad data."""

    def __init__(self, x) -> None:
        self.x = x

    def __iter__(self):
        yield self.x[:32]
        raise gr.DataError("batch 2 of rank 1 is bad on purpose")


def _share(t, n, bs, rank, world):
    """This rank's share of the first ``n`` rows of ``t`` (``Examples.shard``) and its size."""
    from graphrepair.io.examples import Examples

    part = Examples(t, n, bs).shard(rank, world)
    return (torch.cat([b.inputs.first for b in part]) if part.count else t[:0]), part.count


def main() -> None:
    import torch.distributed as dist

    out, cases = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = dist.get_rank()
    status = 0
    for case in cases:
        models, x, y, n, bs, _ = build(case)
        t = time.perf_counter()
        try:
            if case == "fail" and rank == 1:
                result = answer(case, _Failing(x), num_examples=n)
            else:
                mine, count = _share(x, n, bs, rank, dist.get_world_size())
                labels = None if y is None else _share(y, n, bs, rank, dist.get_world_size())[0]
                result = answer(case, mine, labels, num_examples=count)
        except Exception as e:  # the failure cases end here, on every rank
            result = {"error": f"{type(e).__name__}: {e}"}
            status = 2
        result["seconds"] = time.perf_counter() - t
        torch.save(result, os.path.join(out, f"{case}.rank{rank}.pt"))
    if status == 0:
        dist.destroy_process_group()
        sys.exit(status)
    # after a failure the group is left as it is, and the process ends at once, as the command
    # line ends (``graphrepair.cli.launch.end``): a gloo group whose other process may be gone can
    # abort in C++ when the interpreter tears it down ('terminate called without an active
    # exception', exit -6), whatever the case answered
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
