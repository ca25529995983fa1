"""The user's models: unwrap, check, snapshot and restore.

- ``copy_with_state(module, state)``: a copy of a model carrying other weights, made without
  copying its own first; ``graph_for(spec, state)``: the traced graph carrying a model's weights.
- ``check_finite(state, who)``: a NumericError naming the first parameter with a NaN or Inf.
- ``eval_mode(*models)``: the models in eval mode inside a ``with`` block, every module's flag
  restored after it; ``full_precision()``: IEEE float32 products on CUDA inside a block (the
  proofs of permutations and the ONNX check compare two computations). Both are
  ``passes.modules``' (the ONNX export uses them; ``passes`` cannot import ``graphrepair``).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch import nn

from passes.modules import eval_mode, full_precision

from graphrepair.errors import MismatchError, NumericError

if TYPE_CHECKING:
    from graphrepair.discovery.spec import PermutationSpec

__all__ = ["check_finite", "copy_with_state", "eval_mode", "full_precision", "graph_for", "with_metadata"]


def copy_with_state(module: nn.Module, state: dict[str, torch.Tensor], *, own: bool = False,
                    device: torch.device | None = None) -> nn.Module:
    """A copy of ``module`` carrying ``state`` (every key of the module's state dict), made without
    copying the module's own weights first: the tensors of its state dict are left out of the deep
    copy and the copy is given the tensors of ``state`` (cast to the module's dtypes, on ``device``
    or the module's devices). ``own=True``: ``state``'s tensors belong to the caller and are taken
    as they are where no cast is needed, else they are copied. Everything else (non-persistent
    buffers, the graph of a GraphModule) is deep-copied as usual."""
    current = module.state_dict(keep_vars=True)
    missing = [k for k in current if k not in state]
    if missing:
        raise MismatchError(f"no weights given for parameter {missing[0]!r} of the model ({len(missing)} "
                            f"missing); are they from the architecture the spec was made for?")
    memo = {id(t): t for t in current.values()}  # shared until replaced below
    with warnings.catch_warnings():
        # GraphModules from torch.export carry pytree specs whose copy warns about a deprecation
        # inside torch itself; nothing the caller can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        clone = copy.deepcopy(module, memo)
    new, first = {}, {}
    for k, t in current.items():
        if id(t) in first:  # tied: one tensor under two names stays one tensor
            new[k] = new[first[id(t)]]
            continue
        first[id(t)] = k
        v = state[k].detach()
        if v.shape != t.shape:
            raise MismatchError(f"parameter {k!r} has shape {tuple(v.shape)}, but the model's is {tuple(t.shape)}")
        v = v.to(device=device if device is not None else t.device, dtype=t.dtype, copy=not own)
        new[k] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v

    # with the module's own metadata: modules whose _load_from_state_dict reads their version
    # from it (torchvision's MNASNet) refuse a state dict without one
    clone.load_state_dict(with_metadata(new, current), strict=True, assign=True)
    if device is not None:
        clone.to(device)
    return clone


def graph_for(spec: PermutationSpec, state: dict[str, torch.Tensor] | nn.Module,
              device: torch.device | None = None, own: bool = False) -> torch.fx.GraphModule:
    """A copy of the traced graph carrying the weights of ``state`` (a model or a state dict;
    ``own``: see ``copy_with_state``)."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    gm = spec.traced.gm
    # the graph's own tensors (``Traced.graph_own``: trace constants, non-persistent buffers, in
    # no state dict of the model, e.g. timm Swin's index tensors, MaxViT's log coordinates) come
    # along as traced
    mine = {k: v for k, v in gm.state_dict().items() if k in spec.traced.graph_own and k not in sd}
    return copy_with_state(gm, {**mine, **sd} if mine else sd,
                           own=own and not isinstance(state, nn.Module), device=device).eval()


def check_finite(state: dict[str, torch.Tensor], who: str) -> None:
    """A NumericError naming the first parameter with a NaN or Inf. The sums of all tensors on one
    device are checked together (one wait for the device instead of one per tensor): a NaN or Inf
    makes its tensor's sum non-finite, and a sum that overflows only sends the check to the
    per-tensor test, which then finds nothing."""
    by_device: dict = {}
    for k, t in state.items():
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((k, t))
    for group in by_device.values():
        sums = torch.stack([t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None).float()
                            for _, t in group])
        if bool(torch.isfinite(sums).all()):
            continue
        for k, t in group:
            if not torch.isfinite(t).all():
                raise NumericError(f"{who}: parameter {k!r} contains NaN or Inf; the model cannot be merged")


def with_metadata(state: dict, like: dict) -> dict:
    """``state`` as an OrderedDict carrying ``like``'s ``_metadata`` (the per-module versions a
    state dict records and ``_load_from_state_dict`` reads, e.g. torchvision's MNASNet refuses a
    state dict without one). A state dict rebuilt as a plain dict loses them."""
    from collections import OrderedDict

    out = OrderedDict(state)
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return out
