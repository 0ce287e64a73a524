"""Figures of an evaluation (ROC and precision-recall curves, reliability diagrams, confusion matrix, subgroup forest plot) and of images (a grid for notebooks), saved atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from ..core.storage import write_bytes_atomic
from ..data.decode import read_image
from ..data.labels import LabelSpec
from .metrics import defined


def pyplot() -> Any:
    """matplotlib.pyplot that draws to files (Agg), or to a notebook's inline backend inside one."""
    import matplotlib  # on first use only: the training processes never draw

    # Files only, never a GUI window; but keep a notebook's inline backend so that figures display there.
    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 90) -> Path:
    """The figure as a PNG at ``path`` (written whole or not at all), then closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    write_bytes_atomic(os.fspath(path), buffer.getvalue())
    return Path(path)


def _per_class_curves(display: Any, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec, **options: Any) -> Any:
    """One scikit-learn ``display.from_predictions`` curve per class with positives and negatives, on one axis; unknown
    labels (-1) are left out, not drawn as negatives. Returns (figure, axis)."""
    fig, ax = pyplot().subplots(figsize=(5.5, 5))
    for c, name in enumerate(spec.names):
        known = labels[:, c] >= 0
        if defined(labels[known, c]):
            display.from_predictions(labels[known, c], probs[known, c], name=name, ax=ax, **options)
    return fig, ax


def save_roc_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:
    """One ROC curve per class (one-vs-rest for multi-class)."""
    fig, ax = _per_class_curves(RocCurveDisplay, labels, probs, spec)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title("ROC per class")
    fig.tight_layout()
    return save_figure(fig, path)


def save_reliability_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:
    """A reliability diagram per class (observed rate against mean probability in equal-mass bins, as the ECE of
    ``calibration.py`` counts them); unknown labels left out."""
    from sklearn.calibration import CalibrationDisplay

    from .calibration import CALIBRATION_BINS

    fig, ax = _per_class_curves(CalibrationDisplay, labels, probs, spec, n_bins=CALIBRATION_BINS, strategy="quantile")
    ax.set_title("Reliability per class (equal-mass bins)")
    fig.tight_layout()
    return save_figure(fig, path)


def save_pr_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:
    """One precision-recall curve per class (one-vs-rest for multi-class), its average precision in the legend."""
    fig, ax = _per_class_curves(PrecisionRecallDisplay, labels, probs, spec)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall per class")
    fig.tight_layout()
    return save_figure(fig, path)


def save_subgroup_forest_plot(
    path: str | os.PathLike, subgroups: dict[str, Any], overall: float | None, metric: str = "auroc_macro"
) -> Path:
    """A forest plot of ``metric`` per subgroup (``metrics.json``'s ``subgroups``: column -> value -> metrics): one
    row per value with its 95% CI, grouped by column; a value without the metric (too few positives or negatives) is
    listed without a point. The dashed line is the whole set's value (``overall``), the dotted one chance (0.5)."""
    plt = pyplot()
    rows: list[tuple[str, float | None, float | None, float | None]] = []
    for column, values in subgroups.items():
        for value, result in values.items():
            if value.startswith("_"):  # _largest_gap: a summary, not a subgroup
                continue
            point = result.get(metric)
            low, high = result.get(f"{metric}_ci95_low"), result.get(f"{metric}_ci95_high")
            label = f"{column} = {value}" + ("" if point is not None else "  (too few)")
            rows.append((label, point, low, high))
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.35 * max(1, len(rows))))
    ys = np.arange(len(rows))[::-1]  # first row on top
    for y, (_, point, low, high) in zip(ys, rows, strict=True):
        if point is None:
            continue
        if low is not None and high is not None:
            ax.hlines(y, low, high, color="tab:blue")
        ax.plot([point], [y], "s", color="tab:blue")
    if overall is not None:  # named in the title: a legend would cover the points near 1.0
        ax.axvline(overall, linestyle="--", color="grey")
    ax.axvline(0.5, linestyle=":", color="grey")
    ax.set_yticks(ys, [label for label, *_ in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    lowest = min([low for _, _, low, _ in rows if low is not None] + [0.45])
    ax.set_xlim(max(0.0, lowest - 0.05), 1.03)  # room for a point at 1.0; chance (0.5) in view
    name = "macro AUROC" if metric == "auroc_macro" else metric
    ax.set_xlabel(f"{name} (95% CI: patient bootstrap within the subgroup)")
    ax.set_title("Subgroups" + (f" (dashed: all images, {overall:.3f})" if overall is not None else ""))
    fig.tight_layout()
    return save_figure(fig, path)


def save_confusion_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        labels.argmax(axis=1),
        probs.argmax(axis=1),
        labels=list(range(len(spec.names))),
        display_labels=list(spec.names),
        ax=ax,
        colorbar=False,
    )
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_image_grid(
    sources: Sequence[str], titles: Sequence[str], columns: int = 6, storage_options: dict | None = None
) -> Any:
    """A matplotlib figure of images (DICOM/PNG/JPEG through read_image) with a title each; for notebooks."""
    plt = pyplot()
    rows = max(1, -(-len(sources) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.25 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, src, title in zip(axes.flat, sources, titles, strict=False):
        ax.imshow(read_image(src, storage_options=storage_options), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
