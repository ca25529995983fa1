"""Freed channels of networks with grouped convolutions: ``spec.num_free`` against the number of
conv and linear output channels (the final classifier's outputs are the model's output, so they
are counted apart).

    python -m scripts.free_channels

Covers the zoo's ResNeXt (``grouped_conv_net``) and ShuffleNet unit, and torchvision's resnet50,
resnext50_32x4d and regnet_y_400mf (untrained, 1x3x64x64 input) when torchvision imports.
"""

from __future__ import annotations

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


def report(name: str, model: nn.Module, x: torch.Tensor) -> None:
    spec = gr.discover(model.eval(), x)
    conv, linear = outputs(model)
    print(f"| {name} | {spec.num_free} | {len(spec.groups)} | {conv} | {linear} |", flush=True)


def main() -> int:
    torch.manual_seed(0)
    print("| model | freed channels | groups | conv output channels | linear output features |")
    print("|---|---:|---:|---:|---:|")
    for name in ("grouped_conv_net", "shufflenet_block"):
        entry = ZOO[name]
        report(name, entry.factory(), entry.example_inputs())
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - any failure to import means: not measured here
        print(f"torchvision does not import ({type(e).__name__}: {e}); its models are skipped", file=sys.stderr)
        return 0
    x = torch.randn(1, 3, 64, 64)
    for name in ("resnet50", "resnext50_32x4d", "regnet_y_400mf"):
        report(name, getattr(torchvision.models, name)(weights=None), x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
