"""PermutationSpec: the frozen result of discovery, and the check that proves it.

A *group* is one free permutation variable: a set of (parameter, axis) and (node, axis) pairs that
must be reordered together, each through its axis expression (see ``axes.py``). Applying
permutations {group: P_g} to a model replaces every parameter and buffer W by

    W' = W.index_select(d, index(expr_d, P)) for every axis d,

which, by construction of the expressions, leaves the function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from graphrepair.discovery import axes as ax
from graphrepair.errors import CheckError, MismatchError
from graphrepair.discovery.trace import Traced, as_tuple, eval_mode, output_tensors


@dataclass(frozen=True)
class CheckedPerms:
    """Group permutations checked against a spec (``PermutationSpec.checked``)."""

    var_perms: dict[int, torch.Tensor]


@dataclass(frozen=True)
class Member:
    name: str  # state_dict key or node name
    axis: int
    layout: str  # "full" when the axis is exactly this group, else the axis expression


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    params: tuple[Member, ...]
    nodes: tuple[Member, ...]
    joins: tuple[str, ...] = ()  # "residual", "concat", "gate" when such ops join its members

    @property
    def layers(self) -> tuple[str, ...]:
        """Module paths of the parameters in the group, in graph order, without duplicates."""
        seen: dict[str, None] = {}
        for m in self.params:
            seen.setdefault(m.name.rsplit(".", 1)[0] if "." in m.name else m.name, None)
        return tuple(seen)


@dataclass(frozen=True)
class FixedAxis:
    name: str  # state_dict key or node name
    axis: int
    size: int  # number of positions that may not move
    reason: str
    kind: str  # "param" or "node"
    structural: bool = False  # e.g. a convolution's kernel axis: never a channel axis


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[Group, ...]
    fixed: tuple[FixedAxis, ...]
    param_axes: dict  # state_dict key -> tuple of axis expressions (resolved, frozen)
    node_axes: dict  # node name -> tuple of axis expressions (tensor-valued nodes)
    var_of_group: dict  # group name -> variable id in the expressions
    traced: Traced = field(repr=False, compare=False)
    model_name: str = ""
    node_joins: dict = field(default_factory=dict)  # node name -> "residual" | "concat" | "gate"

    # -- sizes and lookups ---------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Number of hidden channels that may move (sum of group sizes)."""
        return sum(g.size for g in self.groups)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group named {name!r}; groups: {[g.name for g in self.groups][:10]}")

    # -- permutations --------------------------------------------------------------------------
    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.randperm(g.size, generator=gen) for g in self.groups}

    def identity_permutations(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.arange(g.size) for g in self.groups}

    def _var_perms(self, perms: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        out = {}
        for name, p in perms.items():
            if name not in self.var_of_group:
                raise KeyError(f"no permutation group named {name!r} in this spec")
            g = self.group(name)
            p = torch.as_tensor(p, dtype=torch.long).cpu()
            if p.shape != (g.size,) or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
                raise ValueError(f"permutation for group {name!r} is not a permutation of {g.size} items")
            out[self.var_of_group[name]] = p
        return out

    def checked(self, perms: dict[str, torch.Tensor]) -> "CheckedPerms":
        """``perms`` validated once, for many ``param_index`` / ``node_index`` calls."""
        return perms if isinstance(perms, CheckedPerms) else CheckedPerms(self._var_perms(perms))

    def _vp(self, perms) -> dict[int, torch.Tensor]:
        return perms.var_perms if isinstance(perms, CheckedPerms) else self._var_perms(perms)

    def param_index(self, key: str, axis: int, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        return ax.index(self.param_axes[key][axis], self._vp(perms))

    def node_index(self, node: str, axis: int, perms: dict[str, torch.Tensor]) -> torch.Tensor:
        return ax.index(self.node_axes[node][axis], self._vp(perms))

    def permute_state_dict(self, state: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> dict:
        """A new state dict with every parameter and buffer reordered by ``perms``."""
        vp = self._vp(perms)
        out = {}
        for key, t in state.items():
            exprs = self.param_axes.get(key)
            if exprs is None or t.ndim == 0:
                out[key] = t
                continue
            if len(exprs) != t.ndim:
                raise MismatchError(
                    f"parameter {key!r} has {t.ndim} axes but the spec expects {len(exprs)}: "
                    f"the model does not match the architecture the spec was discovered on"
                )
            for d, e in enumerate(exprs):
                if ax.is_fixed(e):
                    continue
                if e.size != t.shape[d]:
                    raise MismatchError(
                        f"parameter {key!r} axis {d} has size {t.shape[d]} but the spec expects {e.size}"
                    )
                t = t.index_select(d, ax.index(e, vp).to(t.device))
            out[key] = t
        return out

    # -- the proof -----------------------------------------------------------------------------
    def check(self, model: nn.Module, example_inputs, *, seed: int = 0, rtol: float = 1e-4,
              atol: float = 1e-5) -> float:
        """Apply random permutations to every group and compare outputs; returns the largest
        absolute difference. Raises CheckError naming the group that breaks the function."""
        from graphrepair.discovery.permute import permute

        args = as_tuple(example_inputs)
        perms = self.random_permutations(seed)
        ref = _outputs(model, args)
        got = _outputs(permute(model, self, perms), args)
        worst = _compare(ref, got, rtol, atol)
        if worst is None:
            return max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
        # find the first group that breaks the function on its own, to name it
        for g in self.groups:
            single = {g.name: perms[g.name]}
            if _compare(ref, _outputs(permute(model, self, single), args), rtol, atol) is not None:
                raise CheckError(
                    f"permuting group {g.name!r} ({g.size} channels; layers {', '.join(g.layers[:4])}) "
                    f"changes the output of {self.model_name} (max abs diff {worst:.3g}). "
                    f"This is a discovery bug: please report it with the model."
                )
        raise CheckError(
            f"random permutations of all groups together change the output of {self.model_name} "
            f"(max abs diff {worst:.3g}), although each group alone does not"
        )


def _outputs(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        return [t.detach().float() if t.is_floating_point() else t for t in output_tensors(model(*args))]


def _compare(ref, got, rtol, atol) -> float | None:
    """None when all outputs agree, else the largest absolute difference."""
    if len(ref) != len(got):
        return float("inf")
    worst, bad = 0.0, False
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
            continue
        if a.numel() == 0:
            continue
        diff = (a - b).abs()
        scale = atol + rtol * a.abs().max()
        worst = max(worst, float(diff.max()))
        bad = bad or bool((diff > scale).any())
    return worst if bad else None
