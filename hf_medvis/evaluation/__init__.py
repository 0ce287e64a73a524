"""Evaluation of fine-tuned classifiers: metrics with patient-bootstrap CIs (as offline ``evaluate`` modules), plots, and
inference on image files."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Exports resolve on first use: `hf-medvis --help` imports evaluation.cli without torch or transformers.
_EXPORTS = {
    "Predictor": "predict",
    "bootstrap_confidence_intervals": "bootstrap",
    "build_compute_metrics": "metrics",
    "classification_metrics": "metrics",
    "format_metrics_table": "metrics",
    "label_targets": "metrics",
    "load_metric": "metric_modules",
    "metrics_with_ci": "bootstrap",
    "per_class_table": "metrics",
    "plot_image_grid": "plots",
    "probabilities": "metrics",
    "save_confusion_plot": "plots",
    "save_figure": "plots",
    "save_roc_plot": "plots",
}
__all__ = [
    "Predictor",
    "bootstrap_confidence_intervals",
    "build_compute_metrics",
    "classification_metrics",
    "format_metrics_table",
    "label_targets",
    "load_metric",
    "metrics_with_ci",
    "per_class_table",
    "plot_image_grid",
    "probabilities",
    "save_confusion_plot",
    "save_figure",
    "save_roc_plot",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .bootstrap import bootstrap_confidence_intervals, metrics_with_ci
    from .metric_modules import load_metric
    from .metrics import (
        build_compute_metrics,
        classification_metrics,
        format_metrics_table,
        label_targets,
        per_class_table,
        probabilities,
    )
    from .plots import plot_image_grid, save_confusion_plot, save_figure, save_roc_plot
    from .predict import Predictor
