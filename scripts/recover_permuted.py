"""How many units alignment gets wrong on a permuted copy of a randomly initialised model.

    python -m scripts.recover_permuted [resnet18:activation:weight mobilenet_v2:activation:weight densenet121]

For each torchvision model (random init, unperturbed: BatchNorm's constant parameters give weight
matching no signal of their own, and many ReLUs never fire), B is A with every group permuted at
random (seed 3); A and B are aligned on 48 random images at 64x64 by each method named after the
model (default: activation). Printed per method: units and groups whose permutation differs
from the true one; for activation matching also what the correlations alone get wrong (the
assignment before the weights break its ties), the dead units, the units matched without
activation signal and those the weights could not place either.
"""

from __future__ import annotations

import sys
import time
import warnings


def run(name: str, methods: list[str]) -> None:
    import torch

    import graphrepair as gr
    from fixtures.torchvision_compat import import_torchvision
    from graphrepair.merging.activation_match import activation_perms
    from graphrepair.merging.weight_match import weight_matching
    from graphrepair.merging.merge import prepare

    tv = import_torchvision()
    torch.manual_seed(0)
    a = tv.models.get_model(name, weights=None).eval()
    x = torch.randn(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    spec = gr.discover(a, (x[:2],))
    forward = spec.random_permutations(seed=3)
    truth = spec.inverse(forward)  # what undoes it (whole groups moved: see PermutationSpec.inverse)
    b = gr.permute(a, spec, forward)
    total = sum(g.size for g in spec.groups)

    def wrong(perms):
        return (sum(int((perms[g] != t).sum()) for g, t in truth.items()),
                sum(not torch.equal(perms[g], t) for g, t in truth.items()))

    for method in methods:
        start = time.perf_counter()
        extra = ""
        if method == "activation":
            prep = prepare([a, b], x, method="activation", statistics=False, states=False, num_examples=48,
                           batch_size=48, spec=spec)
            perms, stats = prep.perms[0], prep.stats[0]
            alone = wrong(activation_perms(spec, stats))
            extra = (f"; correlations alone: {alone[0]} units, {alone[1]} groups wrong; dead {sum(stats.dead.values())}, "
                     f"without signal {sum(stats.unsignalled.values())}, arbitrary {sum(stats.arbitrary.values())}")
        else:
            perms = weight_matching(spec, a.state_dict(), b.state_dict())
        units, groups = wrong(perms)
        print(f"{name} {method}: {units} of {total} units, {groups} of {len(spec.groups)} groups wrong{extra} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> None:
    warnings.simplefilter("ignore")
    for arg in sys.argv[1:] or ["resnet18:activation:weight", "mobilenet_v2:activation:weight", "densenet121"]:
        name, *methods = arg.split(":")
        run(name, methods or ["activation"])


if __name__ == "__main__":
    main()
