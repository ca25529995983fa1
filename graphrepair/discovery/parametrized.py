"""Parametrised weights: what a module reads as ``weight`` is computed from other tensors.

``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` (and any
``register_parametrization``) keep ``m.parametrizations.weight.original*`` in the state dict and
compute ``m.weight`` on every access; the legacy ``torch.nn.utils.weight_norm`` /
``spectral_norm`` keep ``weight_g``/``weight_v`` (``weight_orig``/``weight_u``/``weight_v``) and
recompute ``m.weight`` in a forward pre-hook. A permutation is applied to the state dict, so it
must act on the originals, and it keeps the function only when the parametrisation commutes with
it. Two do, axis by axis of the weight W (an axis moved by one permutation P, the same for every
index of the other axes; a grouped conv's per-group axis is not such an axis):

- weight norm over dim d:  W = v * g / ||v||_{all axes but d}   (g has W's size on d, 1 elsewhere;
  d = -1: one norm over the whole tensor, g a scalar). Permuting v on any axis moves W alike, g
  following on d; the norms are sums over whole slices, which P maps onto slices. Not when d is a
  grouped conv's per-group axis (1): that permutation depends on the row.
- spectral norm over dim d:  W = W_o / sigma,  sigma = u^T M v,  M = W_o with d first, flattened
  to (|d|, rest). u follows W's axis d, v the flattening of the other axes (a Kronecker layout),
  and sigma is unchanged; the power iteration (training mode) is equivariant the same way. Not
  for grouped convs (a per-row permutation of M's columns has no v to follow it).

Any other parametrisation (a user's ``w -> 2 * w`` included) is not known to commute with
permutations: every axis of the weight and of its originals is fixed, with that reason. So is a
weight pruned by ``torch.nn.utils.prune`` (``weight_orig * weight_mask``, made in a forward
pre-hook): a permutation would move both alike, but a merge would average the masks, and the
reason says how to make the pruning permanent first. A module tensor a rule reads that is in no
state dict and made by none of these is fixed too (``Context.param``).
``table(model)`` finds them; the discovery ``Context`` links a parametrised weight's axes to its
originals' the first time a rule reads it (``link``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from graphrepair.discovery import axes as ax

STRUCTURAL = "structural: "  # as discovery.context's (not imported: context imports this module)


@dataclass(frozen=True)
class Original:
    """A state-dict tensor a parametrised weight is computed from, and how its axes follow the
    weight's: ``follows[i]`` is the weight axis original axis i moves with, a tuple of weight axes
    (the flattening of those axes, in order), or None (a size-1 axis)."""

    key: str
    follows: tuple


@dataclass(frozen=True)
class Parametrised:
    key: str  # the weight as rules read it, e.g. "conv.weight" (in no state dict)
    what: str  # e.g. "weight_norm over dim 0"
    originals: tuple[Original, ...]
    reason: str | None = None  # set: not known to commute with permutations, fix every axis


def _groups(module: nn.Module) -> int:
    g = getattr(module, "groups", 1)
    return g if isinstance(g, int) else 1


def _weight_norm(prefix: str, name: str, module: nn.Module, weight: torch.Tensor, dim: int,
                 g_key: str, v_key: str, g: torch.Tensor, legacy: str = "") -> Parametrised:
    key, n = f"{prefix}{name}", weight.ndim
    d = dim + n if dim < -1 else dim
    what = f"{legacy}weight_norm over {'the whole tensor' if d == -1 else f'dim {d}'}"
    if d == 1 and n > 2 and _groups(module) != 1:
        return Parametrised(key, what, (Original(g_key, ()), Original(v_key, ())),
                            f"'{key}' is computed by {what} of a grouped convolution, whose per-group "
                            f"axis is that dim: its permutations are not known to keep the function")
    g_follows = tuple(i if g.shape[i] == weight.shape[i] and i == d else None for i in range(g.ndim))
    if g.ndim not in (0, n) or any(f is None and g.shape[i] != 1 for i, f in enumerate(g_follows)):
        return Parametrised(key, what, (Original(g_key, ()), Original(v_key, ())),
                            f"'{key}' is computed by {what} from a magnitude of shape {tuple(g.shape)} "
                            f"(expected one value per index of dim {d}): not known to keep the function")
    return Parametrised(key, what, (Original(g_key, g_follows), Original(v_key, tuple(range(n)))))


def _spectral_norm(prefix: str, name: str, module: nn.Module, weight: torch.Tensor, dim: int,
                   o_key: str, u_key: str | None, v_key: str | None, legacy: str = "") -> Parametrised:
    key, n = f"{prefix}{name}", weight.ndim
    d = dim + n if dim < 0 else dim
    what = f"{legacy}spectral_norm over dim {d}"
    originals = [Original(o_key, tuple(range(n)))]
    if _groups(module) != 1:
        return Parametrised(key, what, tuple(Original(o.key, ()) for o in originals),
                            f"'{key}' is computed by {what} of a grouped convolution: its permutations "
                            f"are not known to keep the function")
    if n > 1 and u_key is not None and v_key is not None:
        originals += [Original(u_key, (d,)), Original(v_key, (tuple(i for i in range(n) if i != d),))]
    return Parametrised(key, what, tuple(originals))


def reads_hook(hook) -> bool:
    """Whether ``table`` reads this forward pre-hook: the legacy ``weight_norm`` and
    ``spectral_norm``, and pruning, which recompute a weight from its originals before each call.
    What any other hook does discovery cannot tell (``rules.apply_rule`` fixes the module's axes)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))


def table(model: nn.Module) -> dict[str, Parametrised]:
    """Every parametrised tensor of ``model`` by the name rules read it under ("b.weight")."""
    from torch.nn.utils import parametrize
    from torch.nn.utils import parametrizations as pz
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: dict[str, Parametrised] = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if parametrize.is_parametrized(m):
            for name, plist in m.parametrizations.items():
                base = f"{prefix}parametrizations.{name}."
                sd = [f"{base}{k}" for k in plist.state_dict()]  # originals, and the parametrisations' buffers
                fns = list(plist)
                weight = getattr(m, name)
                if len(fns) == 1 and isinstance(fns[0], pz._WeightNorm) and hasattr(plist, "original1"):
                    found[f"{prefix}{name}"] = _weight_norm(prefix, name, m, weight, fns[0].dim, f"{base}original0",
                                                            f"{base}original1", plist.original0)
                    continue
                if len(fns) == 1 and isinstance(fns[0], pz._SpectralNorm) and hasattr(plist, "original"):
                    has_uv = hasattr(fns[0], "_u") and hasattr(fns[0], "_v")
                    found[f"{prefix}{name}"] = _spectral_norm(prefix, name, m, weight, fns[0].dim, f"{base}original",
                                                              f"{base}0._u" if has_uv else None,
                                                              f"{base}0._v" if has_uv else None)
                    continue
                kinds = " then ".join(type(f).__name__ for f in fns)
                found[f"{prefix}{name}"] = Parametrised(
                    f"{prefix}{name}", f"parametrisation {kinds}", tuple(Original(k, ()) for k in sd),
                    f"'{prefix}{name}' is computed by the parametrisation {kinds}, which is not known to "
                    f"commute with permutations of its axes")
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                g = getattr(m, f"{hook.name}_g")
                found[f"{prefix}{hook.name}"] = _weight_norm(
                    prefix, hook.name, m, getattr(m, f"{hook.name}_v"), hook.dim, f"{prefix}{hook.name}_g",
                    f"{prefix}{hook.name}_v", g, legacy="legacy ")
            elif isinstance(hook, SpectralNorm):
                found[f"{prefix}{hook.name}"] = _spectral_norm(
                    prefix, hook.name, m, getattr(m, f"{hook.name}_orig"), hook.dim, f"{prefix}{hook.name}_orig",
                    f"{prefix}{hook.name}_u", f"{prefix}{hook.name}_v", legacy="legacy ")
            elif isinstance(hook, BasePruningMethod):  # (a PruningContainer too: pruned more than once)
                name, key = hook._tensor_name, f"{prefix}{hook._tensor_name}"
                found[key] = Parametrised(
                    key, "pruning", (Original(f"{key}_orig", ()), Original(f"{key}_mask", ())),
                    f"'{key}' is pruned (torch.nn.utils.prune: {name}_orig times {name}_mask), and a merge "
                    f"would average the masks, not the weights: make the pruning permanent first "
                    f"(torch.nn.utils.prune.remove(module, '{name}'))")
    return found


_ORIGINAL = re.compile(r"^(.*?)(?:parametrizations\.(\w+)\.original1?|(weight)_(?:v|orig))$")


def weight_name(key: str) -> str:
    """The weight a state-dict key holds the values of ("b.parametrizations.weight.original1",
    "b.weight_v", "b.weight_orig" -> "b.weight"); other keys as they are. For group names."""
    m = _ORIGINAL.match(key)
    return f"{m.group(1)}{m.group(2) or m.group(3)}" if m else key


def link(ctx, p: Parametrised, weight_axes: list) -> None:
    """Give ``p``'s originals the axes of the weight ``weight_axes`` (a known parametrisation), or
    fix the weight's axes and the originals' with ``p.reason``. ``ctx`` is discovery's Context."""
    state = ctx.state_shapes
    if p.reason is not None:
        for d, e in enumerate(weight_axes):
            ctx.fix(e, p.reason, record=False)  # recorded on the originals (in the state dict)
        for o in p.originals:
            shape = state.get(o.key)
            if shape is not None:
                _set(ctx, o.key, [ax.Fixed(s, p.reason) for s in shape])
        return
    for o in p.originals:
        shape = state.get(o.key)
        if shape is None:
            continue
        exprs = []
        for size, f in zip(shape, o.follows):
            if f is None:
                exprs.append(ax.Fixed(size, STRUCTURAL + f"a size-1 axis of {p.what}"))
            elif isinstance(f, tuple):
                e = ax.Fixed(1)
                for i in f:
                    e = ax.kron(e, weight_axes[i])
                assert e.size == size, (o.key, e.size, size)
                exprs.append(e)
            else:
                assert weight_axes[f].size == size, (o.key, f, size)
                exprs.append(weight_axes[f])
        _set(ctx, o.key, exprs)


def _set(ctx, key: str, exprs: list) -> None:
    key = ctx.aliases.get(key, key)
    ctx._touched.append(key)
    old = ctx.params.get(key)
    if old is None:
        ctx.params[key] = exprs
        return
    for a, b in zip(old, exprs):
        ctx.unify(a, b, f"parametrised weight {key!r}")
