"""PermutationSpec: the frozen result of discovery, and the check that proves it.

A *group* is one free permutation variable: a set of (parameter, axis) and (node, axis) pairs that
must be reordered together, each through its axis expression (see ``axes.py``). Applying
permutations {group: P_g} to a model replaces every parameter and buffer W by

    W' = W.index_select(d, index(expr_d, P)) for every axis d,

then, for a grouped conv's per-group axis d (a PerBlock over row axis a), W' = W'.gather(d, idx)
with idx[r, p] = index(expr_d's block of row r, P)[p] (``axes.permute_tensor``); which, by
construction of the expressions, leaves the function unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from passes.base import deepcopy_quietly

from graphrepair.discovery import axes as ax
from graphrepair.discovery.trace import Traced, example_inputs_for, output_tensors, traceable
from graphrepair.errors import CheckError, MismatchError, PermutationError, UnknownGroupError
from graphrepair.io.checks import check_tolerances
from graphrepair.models import eval_mode, full_precision, user_models, with_metadata


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
class WreathFamily:
    """Groups tied by Wreath layouts (``axes.py``: whole groups of channels move, e.g. a grouped
    conv's input and output groups): ``order`` (a group of k slots) moves whole slots, and each
    tuple in ``parts`` names the k groups that reorder the slots of one layout, the a-th acting
    on the a-th slot of the result (``slot`` positions each)."""

    order: str
    parts: tuple[tuple[str, ...], ...]
    slots: tuple[int, ...]  # the slot size of each tuple in ``parts``


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
    def notes(self) -> tuple[str, ...]:
        """What discovery did to the model for the duration of its trace (e.g. caching off)."""
        return self.traced.notes

    @property
    def num_free(self) -> int:
        """Number of hidden channels that may move (sum of group sizes)."""
        return sum(g.size for g in self.groups)

    @cached_property
    def _by_name(self) -> dict[str, Group]:
        return {g.name: g for g in self.groups}

    @cached_property
    def _name_of_var(self) -> dict[int, str]:
        return {v: k for k, v in self.var_of_group.items()}

    @cached_property
    def wreaths(self) -> tuple[dict[str, WreathFamily], frozenset]:
        """(families by order group, order groups to keep in place). An order group is a family
        when it occurs only as the outer permutation of Wreaths whose parts are groups occurring
        nowhere else (except as a grouped conv weight's PerBlock parts): alignment then solves the
        family as a whole (``activation_match.py``, ``weight_match.py``). An order group anywhere else (in a Kronecker layout, or
        with parts that recur elsewhere) keeps its slots in place in alignment (its parts are then
        aligned like any group): a permutation of it is still valid, only not searched for."""
        name_of = self._name_of_var
        sets: dict[int, dict[tuple, int]] = {}
        elsewhere: set[int] = set()
        for exprs in list(self.param_axes.values()) + list(self.node_axes.values()):
            for e in exprs:
                if (isinstance(e, ax.Wreath) and isinstance(e.outer, ax.Var)
                        and all(isinstance(p, ax.Var) for p in e.parts)):
                    sets.setdefault(e.outer.id, {})[tuple(p.id for p in e.parts)] = e.slot
                elif isinstance(e, ax.PerBlock) and all(isinstance(p, ax.Var) for p in e.parts):
                    continue
                else:
                    elsewhere.update(v.id for v in ax.variables(e))
        families, held = {}, set()
        for vid, found in sets.items():
            if vid not in name_of:
                continue
            members = [p for key in found for p in key]
            if (vid in elsewhere or len(members) != len(set(members))
                    or any(p in elsewhere or p not in name_of for p in members)):
                held.add(name_of[vid])
                continue
            families[name_of[vid]] = WreathFamily(
                name_of[vid], tuple(tuple(name_of[p] for p in key) for key in found), tuple(found.values()))
        return families, frozenset(held)

    def group(self, name: str) -> Group:
        if name in self._by_name:
            return self._by_name[name]
        raise self._unknown(name)

    def _unknown(self, name: str) -> UnknownGroupError:
        return UnknownGroupError(f"no permutation group named {name!r} in this spec (its groups: "
                                 f"{', '.join(g.name for g in self.groups[:10])}"
                                 f"{', ...' if len(self.groups) > 10 else ''})")

    # -- views ---------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        """The groups, the axes kept fixed (with reasons) and the totals as plain data
        (``graphrepair inspect --json``)."""
        from graphrepair.discovery.views import spec_to_dict

        return spec_to_dict(self)

    def to_dot(self) -> str:
        """The traced graph as Graphviz DOT, each node coloured by its group (``inspect --dot``)."""
        from graphrepair.discovery.views import spec_to_dot

        return spec_to_dot(self)

    # -- permutations --------------------------------------------------------------------------
    def random_permutations(self, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.randperm(g.size, generator=gen) for g in self.groups}

    def identity_permutations(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.arange(g.size) for g in self.groups}

    def inverse(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The permutations that undo ``perms``: permuting by ``perms`` and then by these gives
        back every parameter. Each group's own inverse, except for the parts of a Wreath (whole
        slots moving, ``axes.py``): new slot J of the undoing holds the slot that ``perms`` moved
        away from J, so it takes that slot's part, inverted: q_J = p_{G^-1(J)}^-1."""
        vp = self._vp(perms)
        out = {name: torch.argsort(p) for name, p in perms.items()}
        name_of = self._name_of_var

        def walk(e):
            if isinstance(e, ax.Wreath) and isinstance(e.outer, ax.Var) and e.outer.id in vp:
                back = torch.argsort(vp[e.outer.id])
                for j, part in enumerate(e.parts):
                    src = e.parts[int(back[j])]
                    if isinstance(part, ax.Var) and part.id in name_of:
                        size = part.size
                        moved = vp.get(src.id, torch.arange(size)) if isinstance(src, ax.Var) else torch.arange(size)
                        out[name_of[part.id]] = torch.argsort(moved)
            for c in ax.children(e):
                walk(c)

        for exprs in list(self.param_axes.values()) + list(self.node_axes.values()):
            for e in exprs:
                walk(e)
        return out

    def _var_perms(self, perms: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        if not isinstance(perms, Mapping):
            raise PermutationError(f"permutations must be a dict {{group name: permutation}}, got "
                                   f"{type(perms).__name__}")
        out = {}
        for name, p in perms.items():
            if name not in self.var_of_group:
                raise self._unknown(name)
            g = self.group(name)
            try:
                if isinstance(p, np.ndarray):
                    p = np.ascontiguousarray(p)  # (a reversed view has negative strides, which torch refuses)
                p = torch.as_tensor(p)
            except (TypeError, ValueError, RuntimeError) as e:
                raise PermutationError(f"permutation for group {name!r} is not a tensor of indices: {e}") from e
            if p.dtype == torch.bool or p.is_complex() or (p.is_floating_point() and not bool((p == p.round()).all())):
                raise PermutationError(f"permutation for group {name!r} is not a tensor of indices: it holds "
                                       f"{'bool' if p.dtype == torch.bool else 'non-integer'} values ({p.dtype})")
            p = p.to(device="cpu", dtype=torch.long)
            if p.shape != (g.size,) or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
                raise PermutationError(f"permutation for group {name!r} is not a permutation of {g.size} items "
                                       f"(each of 0 .. {g.size - 1} once)")
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
        """A new state dict with every parameter and buffer reordered by ``perms``. The input's
        ``_metadata`` (module versions that ``_load_from_state_dict`` may read) is kept."""
        vp = self._vp(perms)
        out = with_metadata({}, state)
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
                if not ax.is_fixed(e) and e.size != t.shape[d]:
                    raise MismatchError(
                        f"parameter {key!r} axis {d} has size {t.shape[d]} but the spec expects {e.size}"
                    )
            out[key] = ax.permute_tensor(t, exprs, vp)
        return out

    def permute_model(self, model: nn.Module, perms: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of ``model`` whose parameters and buffers (BatchNorm running statistics included)
        are reordered by ``perms`` ({group name: permutation}). ``model`` is untouched. The copy
        holds ordinary tensors, also where the caller is in ``torch.inference_mode``."""
        with torch.inference_mode(False):
            new = deepcopy_quietly(model)
            with torch.no_grad():
                # permute_state_dict keeps the state dict's _metadata (module versions), which
                # _load_from_state_dict may read
                new.load_state_dict(self.permute_state_dict(new.state_dict(), perms))
        return new

    def check_model(self, model: nn.Module) -> None:
        """MismatchError unless every parameter and buffer of the spec exists in ``model`` with the
        sizes the spec expects (a spec proves nothing about a model of another architecture)."""
        state = model.state_dict()
        missing = [k for k in self.param_axes if k not in state]
        if missing:
            raise MismatchError(
                f"the model ({type(model).__name__}) has no {missing[0]!r}"
                + (f" (and {len(missing) - 1} more of the spec's parameters)" if len(missing) > 1 else "")
                + f": the spec was discovered on another architecture ({self.model_name})")
        for key, exprs in self.param_axes.items():
            t = state[key]
            if t.ndim != len(exprs) or any(not ax.is_fixed(e) and e.size != t.shape[d] for d, e in enumerate(exprs)):
                raise MismatchError(
                    f"parameter {key!r} of the model has shape {tuple(t.shape)}, which the spec does not "
                    f"fit: the spec was discovered on another architecture ({self.model_name})")

    # -- the proof -----------------------------------------------------------------------------
    @user_models("model")
    def check(self, model: nn.Module, example_inputs, *, seed: int = 0, rtol: float = 1e-4,
              atol: float = 1e-5) -> float:
        """Apply random permutations to every group and compare outputs; returns the largest
        absolute difference. Raises CheckError naming the group that breaks the function.

        A float16 or bfloat16 model is checked on a float32 copy (see ``proof_precision``)."""
        check_tolerances(rtol, atol)
        self.check_model(model)
        model = proof_precision(model)
        args = example_inputs_for(model, example_inputs)
        perms = self.random_permutations(seed)
        ref = _outputs(model, args)
        if self.groups and _uninformative(ref, args):
            # outputs that do not vary (all zero, constant, or the same for every example) cannot
            # show a wrong permutation: check on a copy whose parameters are perturbed (the spec is
            # structural, so it holds for any parameter values); refuse if every output is still
            # one constant (a model whose output ignores its input, e.g. through a LayerNorm of
            # one channel, may still be checked: permutations can move its constant)
            model = _perturbed(model, seed)
            ref = _outputs(model, args)
            if not any(_varies(t) for t in ref):
                raise CheckError(
                    f"every output of {self.model_name} on the example is one constant (e.g. all "
                    f"zero), even with its parameters perturbed: permutations cannot change it, so "
                    f"the check would prove nothing; give an example input the outputs depend on"
                )
        return self._prove(model, args, ref, perms, _outputs(self.permute_model(model, perms), args), rtol, atol,
                           "random permutations")

    def prove(self, model: nn.Module, permuted: nn.Module, example_inputs, perms: dict[str, torch.Tensor],
              *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
        """Prove that ``permuted`` (``model`` with ``perms`` applied, e.g. the permutations an
        alignment found) computes what ``model`` computes on the example; returns the largest
        absolute difference, raises CheckError naming the group that changes the function.

        Float16 and bfloat16 models are compared as float32 copies (see ``proof_precision``)."""
        model, permuted = proof_precision(model), proof_precision(permuted)
        args = example_inputs_for(model, example_inputs)
        return self._prove(model, args, _outputs(model, args), perms, _outputs(permuted, args), rtol, atol,
                           "the permutations found")

    def _prove(self, model, args, ref, perms, got, rtol, atol, what: str) -> float:
        worst = _compare(ref, got, rtol, atol)
        if worst is None:
            return max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
        again = _compare(ref, _outputs(model, args), rtol, atol)
        if again is not None:  # the model itself, run again, does not give what it gave
            error = CheckError(
                f"{self.model_name} gives other outputs when run again on the same example in eval mode "
                f"(max abs diff {again:.3g}): its forward draws random numbers (dropout called with "
                f"training=True, added noise, sampling), so no permutation can be checked against it; make "
                f"the forward deterministic in eval mode (e.g. F.dropout(x, p, training=self.training)) to "
                f"merge it"
            )
            error.random_forward = True
            raise error
        # find the first group that breaks the function on its own, to name it
        for g in self.groups:
            if g.name not in perms:
                continue
            single = {g.name: perms[g.name]}
            if _compare(ref, _outputs(self.permute_model(model, single), args), rtol, atol) is not None:
                raise CheckError(
                    f"permuting group {g.name!r} ({g.size} channels; layers {', '.join(g.layers[:4])}) "
                    f"changes the output of {self.model_name} (max abs diff {worst:.3g}). "
                    f"This is a discovery bug: please report it with the model."
                )
        raise CheckError(
            f"{what} of all groups together change the output of {self.model_name} "
            f"(max abs diff {worst:.3g}), although each group alone does not"
        )


HALF = (torch.float16, torch.bfloat16)


def proof_precision(model: nn.Module) -> nn.Module:
    """``model`` itself, or a float32 copy of it when it holds float16 or bfloat16 parameters or
    buffers (the caller's model is not touched).

    A permutation only moves values, so it commutes with the cast: the float32 copy of a permuted
    half-precision model is the permuted float32 copy, exactly. In half precision the two sides of
    the proof round differently (a permuted matmul sums in another order), by some units of the
    dtype's epsilon (float16 2^-10, bfloat16 2^-7) of the output's magnitude; a tolerance wide enough
    for that would also pass a wrong permutation that moves an output by a few percent. In float32
    the proof keeps its float32 tolerance, and a wrong permutation is refused as it would be in
    float32. The cost is the copy: twice the model's half-precision memory while the proof runs."""
    if not any(t.dtype in HALF for t in list(model.parameters()) + list(model.buffers())):
        return model
    new = deepcopy_quietly(model)
    return new._apply(lambda t: t.float() if t.dtype in HALF else t)


def _varies(t: torch.Tensor) -> bool:
    if t.numel() <= 1:
        return False
    if t.dtype == torch.bool:
        return bool(t.any()) and not bool(t.all())
    flat = t.reshape(-1)
    return not bool((flat == flat[0]).all())


def _rows_differ(t: torch.Tensor) -> bool:
    return t.ndim > 0 and t.shape[0] > 1 and _varies_along_batch(t)


def _varies_along_batch(t: torch.Tensor) -> bool:
    return not bool((t == t[:1]).all())


def _uninformative(ref: list[torch.Tensor], args) -> bool:
    """Whether outputs ``ref`` cannot show a wrong permutation: no output varies at all (all zero
    or constant), or the example holds different examples and every output is the same for each
    of them (it does not depend on the input)."""
    if not ref or not any(_varies(t) for t in ref):
        return True
    inputs = args.tensors()
    batch = {a.shape[0] for a in inputs if a.ndim > 0}
    if len(batch) == 1 and any(_rows_differ(a) for a in inputs):
        n = batch.pop()
        with_batch = [t for t in ref if t.ndim > 0 and t.shape[0] == n]
        return bool(with_batch) and len(with_batch) == len(ref) and not any(
            _varies_along_batch(t) for t in with_batch)
    return False


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with noise added to every floating parameter (tied ones stay tied):
    zero-initialised layers (heads, layer scales) then pass their inputs on."""
    new = deepcopy_quietly(model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in new.parameters():  # each tensor once
            if not p.is_floating_point() or p.numel() == 0:
                continue
            std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
            scale = 0.1 * std if std > 0 and std == std and std != float("inf") else 0.1
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(device=p.device, dtype=p.dtype))
    return new


def _outputs(model: nn.Module, args) -> list[torch.Tensor]:
    # TF32 would hide or fake a change; a cache (Hugging Face's use_cache) is state, not output
    with eval_mode(model), torch.no_grad(), full_precision(), traceable(model):
        return [t.detach().float() if t.is_floating_point() else t for t in output_tensors(args.call(model))]


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
