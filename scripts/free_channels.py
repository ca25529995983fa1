"""Freed channels of networks with grouped convolutions and GroupNorm: ``spec.num_free`` against the
number of conv and linear output channels (the final classifier's outputs are the model's output,
so they are counted apart), and how many of the freed channels are whole groups moving (the order
groups of ``axes.Wreath`` layouts: one position per grouped conv group or GroupNorm group).

    python -m scripts.free_channels          # the zoo's and three torchvision models
    python -m scripts.free_channels --all    # every torchvision classification model with whole groups

"without whole groups" is the count when every group stays in its place (each still permuted
inside), as before whole groups could move. Covers the zoo's ResNeXt (``grouped_conv_net``),
ShuffleNet unit and GroupNorm CNN, and torchvision's resnet50, resnext50_32x4d and
regnet_y_400mf (untrained, 1x3x64x64 input, or the size the model needs) when torchvision imports.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import graphrepair as gr
from fixtures.zoo import ZOO


def outputs(model: nn.Module) -> tuple[int, int]:
    """(conv output channels, linear output features)."""
    conv = sum(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    linear = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return conv, linear


def report(name: str, model: nn.Module, x: torch.Tensor, only_whole: bool = False) -> None:
    spec = gr.discover(model.eval(), x)
    families, held = spec.wreaths
    orders = [spec.group(o) for o in [*families, *held]]
    whole = sum(g.size for g in orders)
    if only_whole and not orders:
        return
    conv, linear = outputs(model)
    print(f"| {name} | {spec.num_free} | {whole} | {spec.num_free - whole} | {len(spec.groups)} "
          f"| {len(orders)} | {conv} | {linear} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every torchvision classification model with whole groups")
    args = p.parse_args()
    torch.manual_seed(0)
    print("| model | freed channels | of them whole groups | without whole groups | groups | order groups "
          "| conv output channels | linear output features |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    if not args.all:
        for name in ("grouped_conv_net", "shufflenet_block", "groupnorm_cnn"):
            entry = ZOO[name]
            report(name, entry.factory(), entry.example_inputs())
    try:
        from fixtures.public import torchvision_entry, torchvision_models
        names = torchvision_models() if args.all else ["resnet50", "resnext50_32x4d", "regnet_y_400mf"]
    except Exception as e:  # noqa: BLE001 - any failure to import means: not measured here
        print(f"torchvision does not import ({type(e).__name__}: {e}); its models are skipped", file=sys.stderr)
        return 0
    for name in names:
        entry = torchvision_entry(name)
        report(name, entry.model(0), entry.example(1), only_whole=args.all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
