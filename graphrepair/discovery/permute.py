"""Apply permutations to a model: a new model, same class and state_dict keys, same function."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the spec calls permute() in its check; permute only reads the spec
    from graphrepair.discovery.spec import PermutationSpec


def permute(model: nn.Module, spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> nn.Module:
    """Return a copy of ``model`` whose parameters and buffers (BatchNorm running statistics
    included) are reordered by ``perms`` ({group name: permutation}). ``model`` is untouched."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        # permute_state_dict keeps the state dict's _metadata (module versions), which
        # _load_from_state_dict may read
        state = spec.permute_state_dict(new.state_dict(), perms)
        new.load_state_dict(state)
    return new
