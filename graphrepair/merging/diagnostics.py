"""What a spec and a pass's statistics say a merge can achieve: no group to align, no unit that
varies, too few examples for the widest group, and the summary of the matched correlations.

The library's entry points and the command line both use these, so a script gets the same error
or warning the command line prints.
"""

from __future__ import annotations

from graphrepair.discovery.spec import PermutationSpec
from graphrepair.errors import DataError, NoGroupsError


def _short(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + " ..."


def require_groups(spec: PermutationSpec, name: str, see: str | None = None) -> PermutationSpec:
    """``spec``, or NoGroupsError when no hidden channel of the model ``name`` may move (nothing to
    align or repair). The message gives up to two of the reasons the axes were fixed, and where to
    read all of them (``see``: a command; by default the spec's ``fixed`` list)."""
    if spec.groups:
        return spec
    reasons = list(dict.fromkeys(f.reason for f in spec.fixed if not f.structural
                                 and not f.reason.startswith(("model input", "model output"))))[:2]
    why = f" (e.g. {'; '.join(_short(r, 160) for r in reasons)})" if reasons else ""
    where = f"`{see}`" if see else "spec.fixed (discover(model, x).fixed)"
    raise NoGroupsError(f"no permutation groups in {name}: no hidden channel may move{why}, so there "
                        f"is nothing to align or repair; see {where} for every axis kept fixed and why")


def check_statistics(dead: int, spec: PermutationSpec, where: str, examples: int) -> list[str]:
    """After the statistics pass: DataError when no unit of model A varies at all (``dead``
    channels of the spec's: nothing was matched or repaired); the warnings otherwise, i.e. when the
    examples are fewer than the widest group's channels (the correlations are then rank-deficient
    and the matching partly arbitrary). ``where`` names the data."""
    if dead and dead >= spec.num_free:
        raise DataError(f"{where}: no unit of model A varies over the {examples} examples (all "
                        f"{spec.num_free} channels are constant), so nothing can be matched or repaired; "
                        "give real, varied data")
    widest = max((g.size for g in spec.groups), default=0)
    if 0 < examples < widest:
        return [f"statistics from only {examples} examples for groups of up to {widest} channels: the "
                f"correlations are rank-deficient and the matching partly arbitrary; use thousands of examples"]
    return []


def corr_summary(mean_corr: dict[str, float]) -> dict | None:
    """The lowest and the mean of the groups' mean matched correlations (None without any)."""
    vals = list(mean_corr.values())
    return {"min": min(vals), "mean": sum(vals) / len(vals)} if vals else None
