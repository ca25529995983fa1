"""Input checks of a merge's models: the same architecture (names and shapes of every tensor)."""

from __future__ import annotations

from torch import nn

from graphrepair.errors import MismatchError


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """MismatchError naming the first parameter that differs in name or shape."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for (ka, ta), (kb, tb) in zip(sa.items(), sb.items()):
        if ka != kb:
            raise MismatchError(f"models A and B differ: A has parameter {ka!r} where B has {kb!r}; "
                                f"both must be the same architecture")
        if ta.shape != tb.shape:
            raise MismatchError(f"models A and B differ at parameter {ka!r}: shape {tuple(ta.shape)} in A "
                                f"vs {tuple(tb.shape)} in B; both must be the same architecture")
    if len(sa) != len(sb):
        longer, name = (sa, "A") if len(sa) > len(sb) else (sb, "B")
        extra = list(longer)[min(len(sa), len(sb))]
        raise MismatchError(f"models A and B differ: only {name} has parameter {extra!r}")
