"""Discovery and merge cost on public models of real size (10 M to ~100 M parameters).

    python -m benchmarks.bench_real [--models resnet18 resnet50 convnext_tiny convnext_base vit_s vit_b]
                                    [--examples 48] [--batch 16] [--size 224] [--device auto|cpu|cuda]

Every model is randomly initialised (torchvision; ViT-S from timm) and runs in its own process.
Printed per model, measured in that process:

    discover s            tracing and discovery on a batch of two
    merge s / plain s     a whole merge (activation matching, exact REPAIR, folding) against the
                          three plain eval passes of A, B and the merged model over the same
                          examples it cannot avoid
    peak / weights        the merge's peak memory over the weights of A, B and the merged model
    goal                  the goal for the peak: the three models' weights + the statistics
                          (O(sum of squared group widths), float64) + one batch's activations of
                          A and B, over the same weights

Peak memory is the process's resident set growth during the merge on CPU (from just before the
merge, with A and B already built), ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
import warnings

BUILD = {
    "resnet18": ("torchvision", "resnet18"), "resnet50": ("torchvision", "resnet50"),
    "convnext_tiny": ("torchvision", "convnext_tiny"), "convnext_base": ("torchvision", "convnext_base"),
    "vit_s": ("timm", "vit_small_patch16_224"), "vit_b": ("torchvision", "vit_b_16"),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(name: str, seed: int):
    import torch

    from fixtures.torchvision_compat import import_torchvision

    torch.manual_seed(seed)
    package, arch = BUILD[name]
    tv = import_torchvision()
    if package == "timm":
        import timm
        return timm.create_model(arch, pretrained=False).eval()
    return tv.models.get_model(arch, weights=None).eval()


def _plain(model, batches) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - start


def run(name: str, args, out) -> None:
    warnings.simplefilter("ignore")
    import torch

    import graphrepair as gr
    from graphrepair.runtime import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    a, b = _build(name, 0).to(device), _build(name, 1).to(device)
    weights = sum(t.numel() * t.element_size() for t in a.state_dict().values())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 3, args.size, args.size, generator=g).to(device)
    batches = list(x.split(args.batch))
    t = time.perf_counter()
    spec = gr.discover(a, (x[:2],))
    discover_s = time.perf_counter() - t
    stats_bytes = sum(8 * g_.size * g_.size for g_ in spec.groups) * 2  # X_A X_B^T and moments
    with torch.no_grad():  # one batch's activations of A and B: every leaf module output's bytes
        sizes = []
        handles = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size())
                                           if isinstance(o, torch.Tensor) else None)
                   for m in a.modules() if len(list(m.children())) == 0]
        a(batches[0])
        for h in handles:
            h.remove()
        act = 2 * sum(sizes)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    t = time.perf_counter()
    merged = gr.merge(a, b, x, num_examples=args.examples, batch_size=args.batch, repair="exact")
    if device.type == "cuda":
        torch.cuda.synchronize()
    merge_s = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    plain = _plain(a, batches) + _plain(b, batches) + _plain(merged, batches)
    out.put(dict(model=name, params_M=weights / 4e6, discover_s=discover_s, merge_s=merge_s,
                 plain_s=plain, ratio=merge_s / plain, peak_over_weights=(peak + 2 * weights) / (3 * weights),
                 goal_over_weights=(3 * weights + stats_bytes + act) / (3 * weights)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(BUILD))
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print("model | params M | discover s | merge s | plain s | merge/plain | peak/weights | goal/weights")
    for name in args.models:
        q = ctx.Queue()
        p = ctx.Process(target=run, args=(name, args, q))
        p.start()
        p.join()
        if q.empty():
            print(f"{name} | failed (exit {p.exitcode})")
            continue
        r = q.get()
        print(f"{r['model']} | {r['params_M']:.1f} | {r['discover_s']:.2f} | {r['merge_s']:.1f} | "
              f"{r['plain_s']:.1f} | {r['ratio']:.2f} | {r['peak_over_weights']:.2f} | "
              f"{r['goal_over_weights']:.2f}", flush=True)


if __name__ == "__main__":
    main()
