"""Weight matching against activation matching on one LLaMA pair (issue 20, goal 5).

    python -m benchmarks.bench_weight_matching [--hidden 1024] [--layers 8] [--intermediate 2816]
                                               [--heads 16] [--kv-heads 4] [--vocab 32000]
                                               [--sequences 16] [--tokens 128] [--repair exact] [--pruned 0]

Two random-init ``LlamaForCausalLM`` of one ``LlamaConfig`` built here (nothing downloaded;
seeds 0 and 1), grouped-query attention, fed ``--sequences`` sequences of ``--tokens`` random
token ids as a dict of keyword tensors (``input_ids``, ``attention_mask``). The defaults are the
issue's pair: hidden 1024, 8 layers, MLP 2816, 16 heads over 4 key/value heads, vocabulary 32000
(156M parameters). Quick runs: ``--hidden 256 --layers 4 --intermediate 704 --vocab 1000``.
``--pruned 0.05``: 5% of each MLP's units have no weights (zeroed rows of ``gate_proj`` and
``up_proj``, columns of ``down_proj``), other units in A and in B, as structured pruning leaves them.

Printed, measured in one run on the same pair and data, and the machine's load average before
and after:

    ratio = time(graphrepair.merge_models([a, b], data, method="weight"))
            / time(graphrepair.merge_models([a, b], data, method="activation"))

beside the goal (<= 2x), and the time of ``weight_matching`` alone inside the weight merge. Both
merges carry the same ``--repair`` (default exact: REPAIR's passes are in both). Each merge is
timed once (at the issue's size a weight merge takes minutes); the activation merge runs first,
after one warm-up merge of a two-sequence slice so that tracing caches and allocator state do not
fall on either side alone.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphrepair as gr
from graphrepair.merging import prepare as prepare_module  # where ``prepare`` calls weight_matching


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pair(args) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from fixtures.torchvision_compat import import_torchvision

    try:  # transformers imports torchvision when it is installed: make that import work
        import_torchvision()
    except ImportError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.tokens, 128),
                         attn_implementation="sdpa")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config).eval())
    if args.pruned:  # a share of each MLP's units without weights, other units in A and in B
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for model in models:
                for layer in model.model.layers:
                    dead = torch.randperm(args.intermediate, generator=gen)[: round(args.pruned * args.intermediate)]
                    layer.mlp.gate_proj.weight[dead] = 0
                    layer.mlp.up_proj.weight[dead] = 0
                    layer.mlp.down_proj.weight[:, dead] = 0
    g = torch.Generator().manual_seed(2)
    data = {"input_ids": torch.randint(1, args.vocab, (args.sequences, args.tokens), generator=g),
            "attention_mask": torch.ones(args.sequences, args.tokens, dtype=torch.long)}
    return models[0], models[1], data


def timed_merge(a, b, data, method: str, repair, batch_size: int) -> tuple[float, float]:
    """(seconds of the whole merge, seconds inside weight_matching)."""
    inside = [0.0]
    original = prepare_module.weight_matching

    def counted(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t

    prepare_module.weight_matching = counted
    try:
        t = time.perf_counter()
        gr.merge_models([a, b], data, method=method, repair=repair, num_examples=len(data["input_ids"]),
                        batch_size=batch_size)
        return time.perf_counter() - t, inside[0]
    finally:
        prepare_module.weight_matching = original


def main(argv=None) -> tuple[float, float, float]:
    """Prints the figures; returns (activation merge, weight merge, weight_matching) in seconds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: LLaMA's 8/3 x hidden, "
                                                                  "rounded up to 256; 2816 at 1024)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repair", default="exact", choices=["exact", "approx", "reset", "none"])
    p.add_argument("--pruned", type=float, default=0.0,
                   help="the share of each MLP's units whose weights are zeroed, other units in A and in B "
                        "(structured pruning: units without weights; default 0)")
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = -(-(8 * args.hidden // 3) // 256) * 256
    repair = None if args.repair == "none" else args.repair
    a, b, data = pair(args)
    n = sum(t.numel() for t in a.parameters())
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, {args.heads} heads / "
          f"{args.kv_heads} kv heads, vocabulary {args.vocab}: {n / 1e6:.1f}M parameters; "
          f"{args.sequences} sequences of {args.tokens} tokens; repair {args.repair}; "
          f"{'' if not args.pruned else f'{args.pruned:.0%} of each MLP pruned; '}"
          f"{torch.get_num_threads()} threads; load average {load()}", flush=True)
    warm = {k: v[:2] for k, v in data.items()}
    timed_merge(a, b, warm, "activation", repair, args.batch_size)
    t_act, _ = timed_merge(a, b, data, "activation", repair, args.batch_size)
    print(f"activation merge {t_act:8.2f}s  (load average {load()})", flush=True)
    t_w, t_wm = timed_merge(a, b, data, "weight", repair, args.batch_size)
    print(f"weight merge     {t_w:8.2f}s  of which weight_matching {t_wm:.2f}s  (load average {load()})")
    print(f"weight / activation = {t_w / t_act:.2f}x   goal (issue 20, goal 5): <= 2x")
    return t_act, t_w, t_wm


if __name__ == "__main__":
    main()
