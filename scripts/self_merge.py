"""Exact REPAIR of a model with a permuted copy of itself must give the model back.

    python -m scripts.self_merge [--only NAME ...] [--examples 48] [--batch 48 16]

For each model (``fixtures.public``: torchvision and timm entries, randomly initialised and
perturbed), B is A with every group permuted at random; ``graphrepair.merge(A, B)`` with
activation matching and exact REPAIR over ``--examples`` random inputs, once per batch size.
Printed: whether alignment recovered the permutation, and the merged model's relative output
change ||f_merged(x) - f_A(x)|| / ||f_A(x)|| on fresh inputs (0 is exact; float rounding is
about 1e-7 to 1e-6).
"""

from __future__ import annotations

import argparse
import warnings

DEFAULT = ["vit_tiny_patch16_224", "regnet_y_400mf", "swin_t", "resnet18", "mobilenet_v2", "convnext_tiny",
           "densenet121", "efficientnet_b0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=DEFAULT)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="*", default=[48, 16])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    import graphrepair as gr
    from fixtures.public import PUBLIC, perturb, torchvision_entry
    from graphrepair.merging.merge import merge_prepared, prepare

    print("model | batches | permutation recovered | relative output change")
    for name in args.only:
        entry = PUBLIC.get(name) or torchvision_entry(name)
        a = perturb(entry.model(0))
        x, test = entry.example(args.examples, seed=0), entry.example(8, seed=1)
        spec = gr.discover(a, (x[:2],))
        forward = spec.random_permutations(seed=3)
        b = gr.permute(a, spec, forward)
        with torch.no_grad():
            ref = a(test)
        undo = spec.inverse(forward)
        for bs in args.batch:  # one preparation: the permutations found and the merge from them
            prep = prepare([a, b], x, num_examples=args.examples, batch_size=bs, spec=spec)
            recovered = all(torch.equal(prep.perms[0][g], p) for g, p in undo.items())
            merged = merge_prepared(prep, [0.5, 0.5], "exact").model
            with torch.no_grad():
                out = merged(test)
            rel = float((out - ref).norm() / ref.norm())
            print(f"{name} | {-(-args.examples // bs)} | {'yes' if recovered else 'no'} | {rel:.1e}", flush=True)


if __name__ == "__main__":
    main()
