"""Input checks of a merge's models: the same architecture (names and shapes of every tensor, and
the same tensors tied together)."""

from __future__ import annotations

from torch import nn

from graphrepair.errors import MismatchError
from graphrepair.models import tied_names


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
    ties_a, ties_b = tied_names(model_a), tied_names(model_b)
    for k in sa:
        a, b = (t if t != k else None for t in (ties_a.get(k, k), ties_b.get(k, k)))
        if a != b:  # a merge would keep one model's tying and drop the other model's tensor
            said = [f"{m} ties {k!r} to {t!r}" if t else f"{m} does not tie {k!r}" for m, t in (("A", a), ("B", b))]
            raise MismatchError(f"models A and B differ: {said[0]} and {said[1]}; tie or untie them alike "
                                f"before merging")
