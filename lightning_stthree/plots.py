"""Every figure of the package: sparsity over training, per-layer density and MACs, as PNG files and logger images.

Needs matplotlib (``pip install "lightning-stthree[plot]"``). Figures are built without pyplot, so no display or
backend is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = 'plots need matplotlib: pip install "lightning-stthree[plot]" (or pip install matplotlib)'


def _figure(width: float, height: float, rows: int = 1) -> tuple[Figure, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(rows, 1, squeeze=False)[:, 0]


def sparsity_history_figure(
    history: Sequence[Mapping[str, float]], title: str = "ST-3 sparsity over training"
) -> Figure:
    """Measured (and, when present, target) sparsity over optimizer steps, and the MACs ratio when present.

    Args:
        history: Records with ``step``, ``sparsity`` and optionally ``target_sparsity`` and ``macs_ratio``, as kept
            by :class:`~lightning_stthree.ST3PruningCallback` and :class:`~lightning_stthree.STRPruningCallback`
            (their ``history``).
        title: The axes' title.
    """
    figure, (axes,) = _figure(7, 4)
    steps = [h["step"] for h in history]
    if history and "target_sparsity" in history[0]:
        axes.plot(steps, [h["target_sparsity"] for h in history], "--", color="0.4", label="target (schedule)")
    axes.plot(steps, [h["sparsity"] for h in history], color="C0", label="measured sparsity")
    if history and "macs_ratio" in history[0]:
        axes.plot(steps, [1 - h["macs_ratio"] for h in history], color="C1", label="MACs removed")
    axes.set(xlabel="optimizer step", ylabel="fraction", ylim=(0, 1), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def layer_report_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Per-layer density bars and, when MACs are known, dense vs sparse MACs bars (from :func:`sparsity_report`)."""
    layers = [r for r in rows if r["name"] != "total"]
    with_macs = bool(layers) and layers[0]["macs_dense"] is not None
    figure, axes = _figure(max(7, 0.25 * len(layers)), 7 if with_macs else 4, rows=2 if with_macs else 1)
    positions = range(len(layers))
    names = [r["name"] for r in layers]
    axes[0].bar(positions, [r["density"] for r in layers], color="C0")
    axes[0].set(ylabel="density (non-zero fraction)", ylim=(0, 1), title="Per-layer density")
    if with_macs:
        axes[1].bar(positions, [r["macs_dense"] / 1e6 for r in layers], color="0.8", label="dense")
        axes[1].bar(positions, [r["macs_sparse"] / 1e6 for r in layers], color="C1", label="sparse")
        axes[1].set(ylabel="MMACs per sample", title="Per-layer MACs")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes:
        ax.set_xticks(list(positions), names, rotation=90, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``figure`` as a PNG at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def save_training_figures(
    history: Sequence[Mapping[str, float]],
    rows: Sequence[Mapping[str, Any]],
    prefix: str,
    title: str,
    directory: str | os.PathLike[str],
    trainer: Any = None,
) -> list[Path]:
    """Save ``<prefix>_sparsity.png`` (:func:`sparsity_history_figure`) and ``<prefix>_layers.png``
    (:func:`layer_report_figure`) in ``directory``, and log both as figures to the TensorBoard loggers of ``trainer``
    (tag ``<prefix>/<file name>``, at its ``global_step``), if one is given.

    Returns:
        The paths written.
    """
    figures = {
        f"{prefix}_sparsity": sparsity_history_figure(history, title),
        f"{prefix}_layers": layer_report_figure(rows),
    }
    paths = [save_figure(figure, Path(directory) / f"{name}.png") for name, figure in figures.items()]
    if trainer is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, figure in figures.items():
                    logger.experiment.add_figure(f"{prefix}/{name}", figure, global_step=trainer.global_step)
    return paths
