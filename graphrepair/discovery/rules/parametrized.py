"""Weights computed by a parametrisation, as torch.export writes them: weight norm.

``aten._weight_norm(v, g, dim)`` = v * g / ||v||_{all axes but dim} (dim = -1: one norm over the
whole tensor, g a scalar); ``aten._weight_norm_interface`` returns (that, the norms, shaped like
g). Hugging Face's Wav2Vec2 positional convolution reads its weight so. The output has v's axes;
g's axis ``dim`` (its only one longer than 1) follows v's. Any permutation that maps the slices
{index on dim = k} onto such slices keeps the norms (sums over whole slices), so every axis of v
may move, except a grouped conv's per-group axis (1) when it is ``dim``: that permutation
depends on the row, which the rule cannot see here, so ``dim`` = 1 of a weight of 3 or more axes
is rejected. (The module forms: ``discovery.parametrized``.)
"""

from __future__ import annotations

from graphrepair.discovery.context import Context, op_name
from graphrepair.discovery.rules.registry import op, reject


@op("_weight_norm _weight_norm_interface")
def weight_norm(ctx: Context):
    v, g = ctx.arg("v"), ctx.arg("g")
    dim = ctx.arg("dim", 0)
    va, ga, vs, gs = ctx.axes(v), ctx.axes(g), ctx.shape(v), ctx.shape(g)
    if va is None or ga is None or not isinstance(dim, int):
        return reject(ctx)
    n = len(vs)
    d = dim + n if dim < -1 else dim
    if d == 1 and n > 2:
        return reject(ctx, f"weight norm over dim 1 at node '{ctx.node.name}': a grouped conv's per-group "
                           f"axis would move per row, which weight norm does not commute with")
    if len(gs) not in (0, n) or (gs and any(s != 1 for i, s in enumerate(gs) if i != d)):
        return reject(ctx, f"weight norm at node '{ctx.node.name}' with a magnitude of shape {gs} "
                           f"for a weight of shape {vs}")
    if gs and d >= 0 and gs[d] > 1:
        ctx.unify(ga[d], va[d])
    out = list(va)
    if op_name(ctx.node) == "_weight_norm_interface":
        return out, list(ga)
    return out
