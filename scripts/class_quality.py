"""What giving the user's class back costs REPAIR: the merge as a GraphModule against the
class-preserving treatments of the resets that cannot fold.

    python -m scripts.class_quality [--pairs vit,vit_bias,mlp10,mlp20,resnet20] [--epochs 2]
                                    [--num-examples 5000] [--threads N] [--json FILE]

Pairs:

* ``vit`` and ``vit_bias``: a small pre-LayerNorm vision transformer (``TinyViT`` below: MNIST
  28x28 in 7x7 patches, 16 tokens + [CLS], width 48, 4 heads, 2 blocks, MLP 96), trained here from
  seeds 0 and 1 (``--epochs`` of AdamW over the 60,000 training images; a minute or two each on
  one CPU thread, nothing is written). ``vit``'s linear layers have no bias (as LLaMA's, T5's):
  their resets cannot take REPAIR's shift; ``vit_bias``'s do. In both, the resets on the residual
  stream (the adds, read by LayerNorms) cannot fold into one layer.
* the shipped pairs (``fixtures.pairs``): every reset of theirs folds; the table says so, and
  whether output="class" and output="graph" give bit-identical weights.

Per pair, one alignment (``prepare``, activation matching on the first ``--num-examples`` training
examples), then at alpha = 0.5 the test accuracy (%) and loss of:

    A, B                the endpoints
    plain               interpolation of the aligned models, no REPAIR
    graph               exact REPAIR, output="graph": a GraphModule, every correction kept
    class               exact REPAIR, output="class" (the default): resets planned against the
                        class before the merged pass, scale-only where the layer has no bias,
                        left out where they cannot fold
    class, no scale     as class, but the resets without a bias are left out too
    post-hoc drop       the graph merge, then the corrections that do not fold dropped after the
                        fact (kept affines removed, created biases zeroed: scale folded, shift
                        lost) with the statistics the pass measured with them in place
    graph + refit       graph, then one sweep of the least-squares refit (``refit=1``)
    class + refit       class, then ``refit=1``

and for each row the merged class and the number of treated resets. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from fixtures.datasets import mnist
from fixtures.pairs import PAIRS, load_pair
from fixtures.train import train_pair
from graphrepair.merging.merge import merge_prepared, prepare
from graphrepair.merging.repair import batch_goals, goal_statistics, repair_merged
from graphrepair.study.metrics import evaluate
from passes.reset import ChannelAffine

ROWS = ("A", "B", "plain", "graph", "class", "class, no scale", "post-hoc drop", "graph + refit",
        "class + refit")


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, bias: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, bias)
        self.fc1, self.fc2 = nn.Linear(d, hidden, bias=bias), nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Pre-LayerNorm ViT for 1x28x28 images: 7x7 patches, [CLS], learned positions."""

    def __init__(self, bias: bool = False, d: int = 48, heads: int = 4, hidden: int = 96, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(49, d, bias=bias)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, d))
        self.blocks = nn.Sequential(*(Block(d, heads, hidden, bias) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(b, 16, 49)
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


def trained_vit(bias: bool, epochs: int, threads: int):
    x, y = mnist("train")
    models = train_pair(lambda: TinyViT(bias), (x, y), seeds=(0, 1), epochs=epochs, lr=2e-3, optimizer="adam",
                        weight_decay=0.01, batch_size=128, threads=threads)
    return models, (x, y), mnist("test")


def posthoc_drop(res) -> nn.Module:
    """The graph merge with the corrections that do not fold dropped after the fact."""
    gm = res.model
    if not isinstance(gm, torch.fx.GraphModule):
        return gm
    created = [line.split("created parameter ", 1)[1] for line in res.kept if "created parameter " in line]
    with torch.no_grad():
        for name in created:
            gm.get_parameter(name).zero_()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ChannelAffine):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def class_no_scale(prep, weights):
    """output="class" with the resets of bias-less layers left out instead of scale-only."""
    goals = goal_statistics(prep.spec, prep.points, prep.stats, prep.perms, weights)
    per_batch = batch_goals(prep.spec, prep.points, prep.stats, prep.perms, weights)
    done = repair_merged(prep.spec, prep.models[0], _interpolated(prep, weights), goals, prep.points, fit=prep.fit,
                         per_batch=per_batch, output="class", scale_only=False)
    return done.model, done.treated


def _interpolated(prep, weights):
    from graphrepair.merging.merge import interpolate_states

    return interpolate_states([prep.models[0].state_dict()] + prep.aligned, weights)


def run_pair(name: str, args) -> dict:
    if name in ("vit", "vit_bias"):
        (a, b), (x, y), test = trained_vit(name == "vit_bias", args.epochs, args.threads)
    else:
        a, b = load_pair(name)
        x, y = PAIRS[name].data("train")
        test = PAIRS[name].data("test")
    fit = x[: args.num_examples]
    prep = prepare([a, b], fit, statistics=True, num_examples=args.num_examples)
    w = [0.5, 0.5]
    rows = {"A": (a, {}), "B": (b, {})}
    rows["plain"] = (merge_prepared(prep, w, None).model, {})
    graph = merge_prepared(prep, w, "exact", output="graph")
    cls = merge_prepared(prep, w, "exact")
    rows["graph"] = (graph.model, {})
    rows["class"] = (cls.model, cls.treated)
    rows["class, no scale"] = class_no_scale(prep, w)
    rows["graph + refit"] = (merge_prepared(prep, w, "exact", output="graph", refit=1).model, {})
    rows["class + refit"] = (merge_prepared(prep, w, "exact", refit=1).model, cls.treated)
    rows["post-hoc drop"] = (posthoc_drop(merge_prepared(prep, w, "exact", output="graph")), {})
    out = {"pair": name, "resets": cls.resets, "graph_kept": len(graph.kept), "rows": {}}
    same = type(cls.model) is type(graph.model) and all(
        torch.equal(v, graph.model.state_dict()[k]) for k, v in cls.model.state_dict().items())
    out["class_equals_graph"] = same
    for label in ROWS:
        model, treated = rows[label]
        acc, loss = evaluate(model, test)
        scaled = sum(v.startswith("scale only") for v in treated.values())
        out["rows"][label] = {"accuracy": 100 * acc, "loss": loss, "class": type(model).__name__,
                              "scale_only": scaled, "left_out": len(treated) - scaled}
    return out


def table(results: list[dict]) -> str:
    lines = ["| pair | merge | test acc. % | loss | class | resets scale-only / left out |",
             "|---|---|---:|---:|---|---|"]
    for r in results:
        for label, v in r["rows"].items():
            treated = f"{v['scale_only']} / {v['left_out']}" if label.startswith("class") else ""
            lines.append(f"| {r['pair']} | {label} | {v['accuracy']:.2f} | {v['loss']:.4f} | {v['class']} "
                         f"| {treated} |")
    lines.append("")
    for r in results:
        lines.append(f"{r['pair']}: {r['resets']} resets, {r['graph_kept']} not folded into the class by "
                     f"output='graph'; output='class' bit-identical to output='graph': {r['class_equals_graph']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="vit,vit_bias,mlp10,mlp20,resnet20")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-examples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [run_pair(name, args) for name in args.pairs.split(",")]
    print(table(results))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
