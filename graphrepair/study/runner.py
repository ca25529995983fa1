"""Naive, aligned and REPAIRed interpolation of two models side by side: the curves, barriers and
per-layer tables that ``graphrepair barrier`` and ``graphrepair demo`` show.

Three paths from A (alpha = 0) to B (alpha = 1), evaluated on the same grid of alphas:

    naive     theta_a = (1 - a) theta_A + a theta_B      no alignment (prepare(align=False))
    aligned   theta_a = (1 - a) theta_A + a theta_B'     B' = B with its units permuted onto A
    REPAIR    the aligned theta_a with its reset points renormalised (``repair`` = exact | approx)
              or its BatchNorm statistics re-estimated (``repair`` = reset)

The aligned and REPAIRed curves share ONE preparation (one alignment, one joint pass of A and B);
every inner alpha then costs one merge (plus, for exact REPAIR, one pass of the merged model).
Barrier of a curve (REPAIR Eq. 1, on the grid): ``metrics.barrier_of``; accuracy barriers are the
largest drop below the straight line between the endpoints, in accuracy units.

Per-layer table (``layers=True``), at ``layer_alpha`` for the aligned model without and with REPAIR
(REPAIR Figure 2 and LLFC): ``metrics.layer_report`` per reset point,

    variance ratio = mean-over-channels Var(merged) / ((Var(A) + Var(B')) / 2)   (1 = no collapse)
    LLFC cosine    = mean over examples of cos(f(theta_a), (1 - a) f(theta_A) + a f(theta_B'))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from graphrepair.errors import GraphRepairError
from graphrepair.io.examples import Examples
from graphrepair.merging.diagnostics import check_statistics, corr_summary
from graphrepair.merging.checks import check_same_architecture
from graphrepair.merging.merge import Prepared, merge_prepared, note_unregistered, prepare
from graphrepair.study.metrics import Curve, alpha_grid, curve, layer_report
from graphrepair.study.tables import number, percent, plural, text_table

REPAIR_LABELS = {"exact": "REPAIR", "approx": "REPAIR-approx", "reset": "BN-reset"}


def repair_label(repair: str | None) -> str | None:
    return REPAIR_LABELS.get(repair) if repair else None


@dataclass
class Study:
    """The result of :func:`run_study`; ``as_dict`` is what ``barrier --json`` prints."""

    curves: list[Curve]
    method: str
    repair: str | None
    examples: int
    groups: int
    free_channels: int
    mean_corr: dict[str, float]
    layer_alpha: float = 0.5
    layers: list[dict] = field(default_factory=list)  # per reset point, see layer_rows
    layer_labels: list[str] = field(default_factory=list)  # which curves have layer statistics
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the data may not support (diagnostics.check_statistics)
    prep: Prepared | None = field(default=None, repr=False)  # the aligned preparation, for reuse

    def curve(self, label: str) -> Curve:
        for c in self.curves:
            if c.label == label:
                return c
        raise KeyError(label)

    @property
    def endpoints(self) -> dict[str, tuple[float, float]]:
        c = self.curves[0]
        return {"A": (c.accuracy[0], c.loss[0]), "B": (c.accuracy[-1], c.loss[-1])}

    def as_dict(self) -> dict:
        return {
            "method": self.method, "repair": self.repair, "examples": self.examples,
            "groups": self.groups, "free_channels": self.free_channels,
            "mean_corr": self.mean_corr,
            "mean_corr_summary": corr_summary(self.mean_corr),
            "endpoints": {k: {"accuracy": a, "loss": lo} for k, (a, lo) in self.endpoints.items()},
            "curves": [c.as_dict() for c in self.curves],
            "layer_alpha": self.layer_alpha if self.layers else None,
            "layers": self.layers, "notes": self.notes, "warnings": self.warnings,
        }

    # -- text ------------------------------------------------------------------------------------

    def headline(self, model: str) -> str:
        """One line on the path of ``model``: its groups and free channels, the alignment, the examples
        it read and the matched correlations (mean, min)."""
        head = (f"path A -> B of {model} ({plural(self.groups, 'group')}, "
                f"{plural(self.free_channels, 'channel')} may move); "
                f"{self.method} alignment" + (f" on {self.examples} examples" if self.examples else ""))
        corr = corr_summary(self.mean_corr)
        if corr:
            head += f", mean matched correlation {corr['mean']:.3f} (min {corr['min']:.3f})"
        return head

    def curve_table(self) -> str:
        """Accuracy (%) and loss of every curve at every alpha, with a final barrier row."""
        labels = [c.label for c in self.curves]
        heads = ["alpha"] + [f"acc {lb}" for lb in labels] + [f"loss {lb}" for lb in labels]
        rows = []
        for i, a in enumerate(self.curves[0].alphas):
            rows.append([f"{a:.2f}"] + [percent(c.accuracy[i]) for c in self.curves]
                        + [number(c.loss[i]) for c in self.curves])
        rows.append(["barrier"] + [percent(c.accuracy_barrier) for c in self.curves]
                    + [number(c.loss_barrier) for c in self.curves])
        return text_table(heads, rows)

    def summary_table(self, alpha: float = 0.5) -> str:
        """One row per model: endpoints, then each path at ``alpha`` with its barriers."""
        rows = []
        for name, (acc, loss) in self.endpoints.items():
            rows.append([f"model {name}", percent(acc), number(loss), "", ""])
        for c in self.curves:
            acc, loss = c.at(alpha)
            rows.append([_describe(c.label, self.repair), percent(acc), number(loss),
                         percent(c.accuracy_barrier), number(c.loss_barrier)])
        return text_table(["model", f"acc % @{alpha:g}", f"loss @{alpha:g}", "acc barrier (pts)",
                           "loss barrier"], rows)

    def layer_table(self) -> str:
        if not self.layers:
            return ""
        labels = self.layer_labels
        heads = (["layer", "kind", "channels"] + [f"var ratio {lb}" for lb in labels]
                 + [f"LLFC cos {lb}" for lb in labels])
        rows = [[r["layer"], r["kind"], r["channels"]]
                + [number(r["variance_ratio"].get(lb), 3) for lb in labels]
                + [number(r["llfc_cosine"].get(lb), 3) for lb in labels] for r in self.layers]
        return text_table(heads, rows)


def _describe(label: str, repair: str | None) -> str:
    if label == "naive":
        return "naive (no alignment)"
    if label == "aligned":
        return "aligned"
    return f"aligned + {label}" + (f" ({repair})" if repair in ("exact", "approx") else "")


def run_study(model_a: nn.Module, model_b: nn.Module, *, fit_data, eval_data, alphas=11,
              method: str = "activation", repair: str | None = "exact", num_examples: int = 5000,
              points: str = "all", layers: bool = False, layer_alpha: float = 0.5,
              batch_size: int = 256, quiet: bool = True, spec=None, refit: int = 0, name: str | None = None,
              see: str | None = None) -> Study:
    """The naive, aligned and (unless ``repair`` is None) REPAIRed curves; see the module text.
    ``refit`` > 0 adds the curve of that repair followed by the least-squares refit.
    ``fit_data`` and ``eval_data`` are given by name (see ``metrics.barrier``); ``spec``: the models'
    PermutationSpec when already discovered; ``name`` and ``see``: how a NoGroupsError names the
    model and where it sends the reader (``prepare``)."""
    grid = alpha_grid(alphas)
    check_same_architecture(model_a, model_b)
    # the curves' far ends and inner points hold model A's weights outside the state dicts
    note_unregistered([model_a, model_b], [0.0, 1.0], stacklevel=3)
    fit_data = Examples.of(fit_data, num_examples, batch_size)  # one set of examples for both preparations
    naive = prepare([model_a, model_b], fit_data, method=method, statistics=False, align=False,
                    num_examples=num_examples, batch_size=batch_size, points=points, spec=spec,
                    quiet=quiet, name=name, see=see)
    prep = prepare([model_a, model_b], fit_data, method=method,
                   statistics=repair in ("exact", "approx"), cross=repair == "approx",
                   num_examples=num_examples, batch_size=batch_size, points=points,
                   spec=naive.spec, quiet=quiet)
    curves = [curve(naive, eval_data, grid, None, "naive", quiet=quiet)]
    ends = (((curves[0].accuracy[0], curves[0].loss[0]), (curves[0].accuracy[-1], curves[0].loss[-1]))
            if grid[0] == 0.0 and grid[-1] == 1.0 else None)
    keep = layer_alpha if layers else None  # the layer measurement reuses these merges
    curves.append(curve(prep, eval_data, grid, None, "aligned", quiet=quiet, endpoints=ends, keep_at=keep))
    if repair:
        curves.append(curve(prep, eval_data, grid, repair, repair_label(repair), quiet=quiet,
                            endpoints=ends, keep_at=keep))
    if refit:
        curves.append(curve(prep, eval_data, grid, repair, f"{repair_label(repair) or 'aligned'} + refit",
                            quiet=quiet, endpoints=ends, refit=refit))
    notes = sorted({n for c in curves for n in c.notes})
    examples = prep.stats[0].examples if prep.stats and prep.stats[0] is not None else (prep.fit.count or 0)
    study = Study(curves=curves, method=method, repair=repair, examples=examples,
                  groups=len(prep.spec.groups), free_channels=prep.spec.num_free,
                  mean_corr=dict(prep.mean_corr), layer_alpha=layer_alpha, notes=notes, prep=prep)
    if examples:  # fewer examples than the widest group (the merges above raised on all-dead data)
        study.warnings = check_statistics(0, prep.spec, prep.fit.where, examples)
    if layers:
        kept = {c.label: c.merged[layer_alpha] for c in curves if layer_alpha in c.merged}
        _add_layers(study, prep, repair, layer_alpha, quiet, kept)
    return study


def _layer_name(nodes: dict, name: str) -> str:
    """The module path of a call_module node (what the user's code calls the layer), else the node."""
    n = nodes.get(name)
    return str(n.target) if n is not None and n.op == "call_module" else name


def _add_layers(study: Study, prep: Prepared, repair: str | None, alpha: float, quiet: bool,
                kept: dict | None = None) -> None:
    """``kept``: {curve label: MergeResult at ``alpha``} already made by the curves."""
    variants = [("aligned", None)] + ([(repair_label(repair), repair)] if repair else [])
    reports: dict[str, list[dict]] = {}
    for label, mode in variants:
        merged = (kept or {}).get(label) or merge_prepared(prep, [1 - alpha, alpha], mode, quiet=quiet)
        try:
            reports[label] = layer_report(prep, merged.model, alpha, quiet=quiet)
        except GraphRepairError:
            if label == "aligned":
                raise
            unfolded = "; ".join(merged.kept[:3]) or "resets left as separate affines"
            study.notes.append(f"no per-layer statistics for {label}: {len(merged.kept)} of "
                               f"{merged.resets} resets could not be folded ({unfolded}), and the layer "
                               f"measurement needs the model's own class; reset points at conv/linear outputs only "
                               f"(points='conv') measure it")
    from graphrepair.merging.points import reset_points
    points = {r.node: r for r in (prep.points or reset_points(prep.spec, "all"))}
    nodes = {n.name: n for n in prep.spec.traced.gm.graph.nodes}
    first = reports["aligned"]
    for i, row in enumerate(first):
        r = points.get(row["node"])
        study.layers.append({
            "node": row["node"],
            "layer": _layer_name(nodes, r.producer if r is not None else row["node"]),
            "kind": r.kind if r is not None else "",
            "channels": r.channels if r is not None else None,
            "variance_ratio": {lb: rep[i]["variance_ratio"] for lb, rep in reports.items()},
            "llfc_cosine": {lb: rep[i]["llfc_cosine"] for lb, rep in reports.items()},
        })
    study.layer_labels = list(reports)
