"""The demo's run: its pairs of models (``PAIRS``, the checkout's shipped pairs), the naive /
aligned / REPAIR study at alpha 0.5, its result (``DemoResult``) and its three output files.

What the demo does and writes is told in :mod:`graphrepair.demo`.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graphrepair.io.data import ArrayDataset
from graphrepair.io.examples import Examples
from graphrepair.errors import GraphRepairError, OutputError
from graphrepair.merging.merge import MergeResult, merge_prepared
from graphrepair.study.runner import Study, run_study
from graphrepair.study.tables import plural

DEMO_ALPHA = 0.5
OUTPUT_NAMES = {"onnx": "merged.onnx", "barrier": "barrier.png", "layers": "layers.png"}


@dataclass
class DemoPair:
    """Two trained models of one architecture and their fitting and evaluation data."""

    name: str
    description: str
    model_a: nn.Module
    model_b: nn.Module
    fit: object  # data for alignment and REPAIR statistics (inputs; labels ignored)
    eval: object  # labeled data
    seconds: float = 0.0  # time to build (train or load) the pair


def digits_mlp_pair(depth: int = 8, width: int = 64, epochs: int = 30, lr: float = 0.05,
                    batch_size: int = 64, seeds: tuple[int, int] = (0, 1),
                    device: torch.device | str | None = None) -> DemoPair:
    """Train the default pair (a few seconds on one CPU core)."""
    from graphrepair.demo.data import digits
    from graphrepair.demo.model import mlp
    from graphrepair.demo.train import train_pair

    try:
        x, y = digits("train", flatten=True)
        x_test, y_test = digits("test", flatten=True)
    except ImportError as e:
        raise GraphRepairError(f"the demo needs scikit-learn for its offline digits data ({e}); "
                               f"install it: pip install scikit-learn") from e
    start = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cpu")
    a, b = train_pair(lambda: mlp(depth=depth, width=width, in_features=64), (x, y), seeds=seeds,
                      epochs=epochs, lr=lr, batch_size=batch_size, device=device)
    return DemoPair(
        name="digits-mlp",
        description=f"MLP, {depth} hidden layers of width {width}, on 8x8 digits (seeds {seeds[0]} "
                    f"and {seeds[1]}, {epochs} epochs)",
        model_a=a, model_b=b,
        fit=ArrayDataset(x.to(device), y.to(device), source="digits train (1437)"),
        eval=ArrayDataset(x_test.to(device), y_test.to(device), source="digits test (360)"),
        seconds=time.perf_counter() - start)


PAIRS: dict[str, Callable[..., DemoPair]] = {"digits-mlp": digits_mlp_pair}


# The source checkout graphrepair is imported from, if any: the folder above the package.
_CHECKOUT = Path(__file__).resolve().parents[2]


def _checkout_pairs():
    """The module ``fixtures.pairs`` of the source checkout graphrepair runs from, or None.

    None for an installed wheel (no ``fixtures/pairs.py`` next to the package) and when another
    package named ``fixtures`` is the importable one (PyPI has one): ``fixtures`` is imported only
    if it is this checkout's. The checkout is put on the import path for that import when it is
    not there (a console script from an editable install does not see the repository root).
    """
    package = _CHECKOUT / "fixtures"
    if not (package / "pairs.py").is_file():
        return None
    if "fixtures.pairs" in sys.modules:
        module = sys.modules["fixtures.pairs"]
        return module if Path(module.__file__).resolve().parent == package else None
    spec = importlib.util.find_spec("fixtures")
    if spec is not None:
        if spec.origin is None or Path(spec.origin).resolve() != package / "__init__.py":
            return None
        from fixtures import pairs
        return pairs
    sys.path.insert(0, str(_CHECKOUT))
    try:
        from fixtures import pairs
    finally:
        sys.path.remove(str(_CHECKOUT))
    return pairs


def shipped_pairs() -> dict[str, Callable[..., DemoPair]]:
    """Builders for the checkpoint pairs of the checkout's ``fixtures.pairs`` whose files are present
    in ``fixtures/checkpoints/`` (none from an installed wheel: the demo never depends on them)."""
    shipped = _checkout_pairs()
    if shipped is None:
        return {}
    found = {name: all(path.is_file() for path in pair.paths()) for name, pair in shipped.PAIRS.items()}
    return {name: functools.partial(_shipped_pair, shipped, name) for name, ok in found.items() if ok}


def available_pairs() -> dict[str, Callable[..., DemoPair]]:
    """``PAIRS`` plus the shipped checkpoint pairs (``graphrepair demo --pair NAME``)."""
    return {**shipped_pairs(), **PAIRS}


def _shipped_pair(shipped, name: str, device: torch.device | str | None = None,
                  fit_examples: int = 5000) -> DemoPair:
    """A pair from fixtures/checkpoints (``shipped``: the module ``fixtures.pairs``): the first
    ``fit_examples`` training inputs for alignment and REPAIR statistics, the test split for
    evaluation."""
    start = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device("cpu")
    pair = shipped.PAIRS[name]
    a, b = shipped.load_pair(name)
    x, _ = pair.data("train")
    x_test, y_test = pair.data("test")
    return DemoPair(
        name=name, description=f"{pair.factory_ref} pair '{name}' from fixtures/checkpoints ({pair.dataset})",
        model_a=a.to(device), model_b=b.to(device),
        fit=ArrayDataset(x[:fit_examples].to(device), source=f"{pair.dataset} train ({fit_examples})"),
        eval=ArrayDataset(x_test.to(device), y_test.to(device), source=f"{pair.dataset} test ({len(x_test)})"),
        seconds=time.perf_counter() - start)


@dataclass
class DemoResult:
    pair: DemoPair
    study: Study
    merged: MergeResult
    figures: dict  # "barrier", "layers" -> matplotlib Figure
    paths: dict[str, Path] = field(default_factory=dict)  # "onnx", "barrier", "layers" -> written file
    export: object = None  # passes.export_onnx.ExportReport when the ONNX file was written
    seconds: dict[str, float] = field(default_factory=dict)

    def summary_table(self) -> str:
        return self.study.summary_table(DEMO_ALPHA)

    def text(self) -> str:
        """What ``graphrepair demo`` prints."""
        s, m = self.study, self.merged
        lines = [f"pair: {self.pair.description}",
                 f"spec: {plural(s.groups, 'permutation group')}, {plural(s.free_channels, 'channel')} "
                 f"may move; "
                 f"activation matching on {s.examples} examples; REPAIR: {m.folded} of {m.resets} "
                 f"resets folded into the weights", "",
                 f"accuracy and loss on {_source(self.pair.eval)} at alpha {DEMO_ALPHA:g}, and the barriers "
                 f"over {len(s.curves[0].alphas)} alphas:", self.summary_table()]
        if s.layers:
            lines += ["", f"per layer at alpha {DEMO_ALPHA:g} (variance ratio 1 = no collapse; "
                          f"LLFC cosine 1 = linear feature connectivity):", s.layer_table()]
        lines.append("")
        if self.export is not None:
            ops = ", ".join(f"{k} {v}" for k, v in sorted(self.export.op_counts.items()))
            lines.append(f"wrote {self.paths['onnx']}: {self.export.node_count} nodes ({ops}); "
                         f"onnxruntime agrees with torch (max |diff| {self.export.max_abs_diff:.1e})")
        for key in ("barrier", "layers"):
            if key in self.paths:
                lines.append(f"wrote {self.paths[key]}")
        for note in dict.fromkeys(s.notes + m.notes):
            lines.append(f"note: {note}")
        t = self.seconds
        lines.append(f"time: {t.get('total', 0):.1f}s (training {t.get('pair', 0):.1f}s, merging and "
                     f"measuring {t.get('study', 0):.1f}s, ONNX export {t.get('export', 0):.1f}s)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {"pair": self.pair.name, "description": self.pair.description, **self.study.as_dict(),
               "merged": {"alpha": DEMO_ALPHA, "resets": self.merged.resets, "folded": self.merged.folded,
                          "kept": self.merged.kept},
               "paths": {k: str(v) for k, v in self.paths.items()}, "seconds": self.seconds}
        if self.export is not None:
            from graphrepair.io.export import export_dict

            out["onnx"] = export_dict(self.export, self.paths["onnx"])
        return out


def _source(data) -> str:
    return getattr(data, "source", type(data).__name__)


def make_out_dir(out_dir: str | Path, label: str = "output directory") -> Path:
    """Create ``out_dir`` (and parents) if needed; OutputError naming it as ``label`` (the CLI
    says ``--out``) if it is a file or cannot be created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{label} '{out}' is a file, not a directory; give a directory for the demo's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{label} '{out}': cannot create the directory ({e.strerror})") from e
    return out


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) if needed; OutputError if that fails or it is not writable."""
    from graphrepair.io.outputs import check_output_path

    out = make_out_dir(out_dir)
    for name in OUTPUT_NAMES.values():
        check_output_path(out / name, "output")
    return out


def run_demo(out_dir: str | Path | None = "graphrepair-demo", *, pair: str | DemoPair = "digits-mlp",
             alphas: int = 11, device: torch.device | str | None = None, quiet: bool = True,
             outputs=None, **pair_options) -> DemoResult:
    """Build (train) the pair, run the naive / aligned / REPAIR study, write the files to
    ``out_dir`` (nothing is written when it is None), and return everything, figures included.
    ``pair_options`` go to the pair's builder (e.g. ``epochs=10`` for a quicker run); ``outputs``
    is how the files are written (see ``write_outputs``)."""
    from graphrepair.study.plots import barrier_figure, layers_figure

    start = time.perf_counter()
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    if isinstance(pair, str):
        builders = available_pairs()
        if pair not in builders:
            raise GraphRepairError(f"unknown demo pair {pair!r}; choose one of {', '.join(builders)}")
        pair = builders[pair](device=device, **pair_options)
    seconds = {"pair": pair.seconds}
    t = time.perf_counter()
    n = Examples(pair.fit).count or 5000  # all the examples of in-memory data
    study = run_study(pair.model_a, pair.model_b, fit_data=pair.fit, eval_data=pair.eval, alphas=alphas,
                      method="activation", repair="exact", num_examples=n, layers=True,
                      layer_alpha=DEMO_ALPHA, quiet=quiet)
    merged = merge_prepared(study.prep, [1 - DEMO_ALPHA, DEMO_ALPHA], "exact", quiet=quiet)
    title = pair.description
    figures = {"barrier": barrier_figure(study.curves, title),
               "layers": layers_figure(study.layers, study.layer_labels, DEMO_ALPHA, title)}
    seconds["study"] = time.perf_counter() - t
    result = DemoResult(pair, study, merged, figures, seconds=seconds)
    if out is not None:
        write_outputs(result, out, outputs)
    seconds["total"] = time.perf_counter() - start
    return result


def write_outputs(result: DemoResult, out: Path, outputs=None) -> None:
    """merged.onnx (verified), barrier.png and layers.png, all or none. ``outputs(paths)`` stages
    and commits them (a context manager giving temporary paths; ``io.fileio.atomic_outputs`` when
    None; the command line passes ``Session.outputs``)."""
    from graphrepair.io.export import export_onnx
    from graphrepair.distributed import is_reporting
    from graphrepair.io.fileio import atomic_outputs
    from graphrepair.study.plots import save_figure

    t = time.perf_counter()
    targets = {k: out / name for k, name in OUTPUT_NAMES.items()}
    example = first_examples(result.pair.fit)
    stage = outputs or (lambda paths: atomic_outputs(paths, writes=is_reporting()))
    with stage(list(targets.values())) as tmps:
        tmp = dict(zip(targets, tmps))
        result.export = export_onnx(result.merged.model, (example,), tmp["onnx"])
        save_figure(result.figures["barrier"], tmp["barrier"])
        save_figure(result.figures["layers"], tmp["layers"])
    result.paths = targets
    result.seconds["export"] = time.perf_counter() - t


def first_examples(data, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of ``data`` (the example input of an ONNX export)."""
    return Examples(data, n, n).example(n).first


__all__ = ["DemoPair", "DemoResult", "PAIRS", "available_pairs", "digits_mlp_pair", "shipped_pairs", "first_examples",
           "make_out_dir", "prepare_out_dir", "run_demo", "write_outputs"]
