"""Figures of the barrier study: accuracy and loss along the path, and variance collapse per layer.

Built on ``matplotlib.figure.Figure`` directly (Agg canvas), never pyplot: no global backend is
set, no window opens, and the figures are plain objects a test or a notebook can inspect.
Files are written atomically (``fileio.atomic_write``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from graphrepair.errors import OutputError
from graphrepair.io.fileio import atomic_write

_STYLE = {"naive": dict(color="tab:red", linestyle="--", marker="o"),
          "aligned": dict(color="tab:orange", linestyle="-", marker="s")}
_REPAIR_STYLE = dict(color="tab:blue", linestyle="-", marker="^")


def supported_formats() -> set[str]:
    return set(FigureCanvasAgg(Figure()).get_supported_filetypes())


def check_plot_path(path: str | os.PathLike, option: str = "--plot") -> Path:
    """OutputError unless matplotlib can write the file type named by the suffix."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in supported_formats():
        raise OutputError(f"{option} '{p}': cannot write a figure as '{p.suffix or '(no suffix)'}'; "
                          f"use one of {', '.join('.' + f for f in sorted(supported_formats()))}")
    return p


def layers_path(plot_path: str | os.PathLike) -> Path:
    """``F.png`` -> ``F_layers.png``: where ``barrier --layers --plot F.png`` puts its second figure."""
    p = Path(plot_path)
    return p.with_name(f"{p.stem}_layers{p.suffix}")


def barrier_figure(curves: Sequence, title: str | None = None) -> Figure:
    """Accuracy (%) and loss against alpha, one line per curve (``metrics.Curve``); the legend
    gives each curve's barrier."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for c in curves:
        style = _STYLE.get(c.label, _REPAIR_STYLE)
        ax_acc.plot(c.alphas, [100 * a for a in c.accuracy], label=f"{c.label} (barrier "
                    f"{100 * c.accuracy_barrier:.1f} pts)", **style)
        ax_loss.plot(c.alphas, c.loss, label=f"{c.label} (barrier {c.loss_barrier:.3f})", **style)
    ax_acc.set(xlabel="alpha (0 = model A, 1 = model B)", ylabel="accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="alpha (0 = model A, 1 = model B)", ylabel="cross-entropy loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_xlim(0, 1)
    if title:
        fig.suptitle(title)
    return fig


def layers_figure(rows: Sequence[dict], labels: Sequence[str], alpha: float = 0.5,
                  title: str | None = None) -> Figure:
    """Per layer (``study.Study.layers`` rows): the variance ratio of the merged model at ``alpha``
    (REPAIR Figure 2; 1 = no collapse) and the LLFC cosine, one line per label."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_var, ax_cos = fig.subplots(1, 2)
    x = list(range(len(rows)))
    names = [str(r["layer"]) for r in rows]
    for label in labels:
        style = _STYLE.get(label, _REPAIR_STYLE)
        ax_var.plot(x, [r["variance_ratio"].get(label, float("nan")) for r in rows], label=label, **style)
        ax_cos.plot(x, [r["llfc_cosine"].get(label, float("nan")) for r in rows], label=label, **style)
    ax_var.axhline(1.0, color="gray", linewidth=0.8)
    ax_var.set(ylabel="Var(merged) / mean Var(endpoints)", title=f"variance ratio at alpha {alpha:g}")
    ax_var.set_ylim(bottom=0)
    ax_cos.set(ylabel="cosine", title=f"LLFC cosine at alpha {alpha:g}")
    for ax in (ax_var, ax_cos):
        ax.set_xticks(x, names, rotation=60 if len(rows) > 8 else 0, fontsize="small", ha="right"
                      if len(rows) > 8 else "center")
        ax.set_xlabel("layer (reset point)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names."""
    p = check_plot_path(path, "figure")
    fmt = p.suffix.lower().lstrip(".")
    return atomic_write(p, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
