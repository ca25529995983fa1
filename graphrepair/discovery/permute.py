"""Apply permutations to a model: a new model, same class and state_dict keys, same function."""

from __future__ import annotations

import torch
from torch import nn

from graphrepair.discovery.spec import PermutationSpec
from graphrepair.models import check_module


def permute(model: nn.Module, spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> nn.Module:
    """Return a copy of ``model`` whose parameters and buffers (BatchNorm running statistics
    included) are reordered by ``perms`` ({group name: permutation}). ``model`` is untouched."""
    check_module(model)
    return spec.permute_model(model, perms)
