"""The demo's architecture: the REPAIR paper's MLP (``fixtures.zoo``'s mlp3/mlp10/mlp20 build on it)."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(depth: int = 10, width: int = 128, in_features: int = 784, classes: int = 10) -> nn.Sequential:
    """The REPAIR paper's MLP: Flatten, ``depth`` hidden Linear+ReLU layers, a Linear head.

    Weights are He-normal (fan-in, ReLU gain); biases keep PyTorch's default uniform init.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else in_features, classes))
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model
