"""Classification metrics of a fine-tuned model: per-class and macro AUROC, AP, F1 (multi-label) or accuracy.

From scikit-learn. ``evaluate`` (the Hugging Face library) is not used for them: its metrics (``evaluate.load("roc_auc")``)
are scripts fetched from the Hub at first use, so they fail on an offline cluster node, and they wrap the same
scikit-learn functions anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from ..data.labels import LabelSpec

if TYPE_CHECKING:
    from transformers import EvalPrediction


def probabilities(logits: np.ndarray, spec: LabelSpec) -> np.ndarray:
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return (torch.sigmoid(logits) if spec.multi_label else torch.softmax(logits, dim=-1)).numpy()


def defined(y: np.ndarray) -> bool:
    """Whether a 0/1 column has both classes (AUROC and AP exist)."""
    return 0 < y.sum() < len(y)


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    spec: LabelSpec,
    threshold: float = 0.5,
    per_class: bool = True,
    include_f1: bool = True,
) -> dict[str, float]:
    """Multi-label: per-class and macro AUROC, average precision, F1 at ``threshold``. Single-label: accuracy, macro
    F1, one-vs-rest AUROC per class and macro. ``labels`` is [N, C] 0/1 (one-hot for single-label). Classes with no
    positives (or no negatives) have no AUROC/AP and are left out of the macro averages."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    metrics: dict[str, float] = {}
    aurocs, aps = [], []
    for c, name in enumerate(spec.names):
        if not defined(labels[:, c]):
            continue
        auroc = float(roc_auc_score(labels[:, c], probs[:, c]))
        aurocs.append(auroc)
        if per_class:
            metrics[f"auroc_{name}"] = auroc
        if spec.multi_label:
            ap = float(average_precision_score(labels[:, c], probs[:, c]))
            aps.append(ap)
            if per_class:
                metrics[f"ap_{name}"] = ap
    if aurocs:
        metrics["auroc_macro"] = float(np.mean(aurocs))
    if spec.multi_label:
        if aps:
            metrics["ap_macro"] = float(np.mean(aps))
        if include_f1:
            predicted = (probs >= threshold).astype(int)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # F1 of a class never predicted is 0 by definition here
                f1 = [f1_score(labels[:, c], predicted[:, c], zero_division=0) for c in range(len(spec.names))]
            metrics["f1_macro"] = float(np.mean(f1))
            if per_class:
                metrics.update({f"f1_{name}": float(v) for name, v in zip(spec.names, f1, strict=True)})
    else:
        truth, predicted = labels.argmax(axis=1), probs.argmax(axis=1)
        metrics["accuracy"] = float(accuracy_score(truth, predicted))
        if include_f1:
            metrics["f1_macro"] = float(
                f1_score(truth, predicted, average="macro", labels=list(range(len(spec.names))), zero_division=0)
            )
    return metrics


def build_compute_metrics(spec: LabelSpec, threshold: float = 0.5) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for the Trainer: keys become ``eval_auroc_macro``, ``eval_accuracy``, ..."""

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return classification_metrics(
            label_targets(eval_pred.label_ids, spec), probabilities(logits, spec), spec, threshold
        )

    return compute_metrics


def label_targets(label_ids: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Trainer label ids (multi-hot floats or class indices) -> [N, C] 0/1."""
    label_ids = np.asarray(label_ids)
    if spec.multi_label:
        return label_ids.astype(np.float32)
    onehot = np.zeros((len(label_ids), len(spec.names)), dtype=np.float32)
    onehot[np.arange(len(label_ids)), label_ids.astype(int)] = 1.0
    return onehot


def per_class_table(metrics: dict[str, Any], spec: LabelSpec) -> list[dict[str, Any]]:
    rows = []
    for name in spec.names:
        row: dict[str, Any] = {"class": name}
        for key in ("auroc", "ap", "f1"):
            if f"{key}_{name}" in metrics:
                row[key] = metrics[f"{key}_{name}"]
                if f"{key}_{name}_ci95_low" in metrics:
                    row[f"{key}_ci95"] = [metrics[f"{key}_{name}_ci95_low"], metrics[f"{key}_{name}_ci95_high"]]
        rows.append(row)
    return rows


def format_metrics_table(metrics: dict[str, Any], spec: LabelSpec) -> str:
    def cell(key: str) -> str:
        if key not in metrics:
            return "n/a"
        text = f"{metrics[key]:.3f}"
        if f"{key}_ci95_low" in metrics:
            text += f" [{metrics[f'{key}_ci95_low']:.3f}, {metrics[f'{key}_ci95_high']:.3f}]"
        return text

    columns = ("auroc", "ap", "f1") if spec.multi_label else ("auroc",)
    lines = [f"{'class':<22} " + " ".join(f"{c:<24}" for c in columns)]
    for name in (*spec.names, "macro"):
        lines.append(f"{name[:22]:<22} " + " ".join(f"{cell(f'{c}_{name}'):<24}" for c in columns))
    if not spec.multi_label:
        lines.append(f"accuracy {cell('accuracy')}")
    lines.append(
        f"({metrics.get('images', '?')} images, {metrics.get('patients', '?')} patients; "
        "95% CIs from a patient-level bootstrap)"
    )
    return "\n".join(lines)
