"""Classification metrics of a fine-tuned model: per-class and macro AUROC, AP, F1 (multi-label) or accuracy.

The scikit-learn computations behind the ``evaluate`` metric modules (``metric_modules.py``, scripts in
``evaluate_modules/``), which the recipes' ``compute_metrics`` and ``hf-medvis evaluate`` call; ``classification_metrics``
is the same set without the modules (a reference in tests). The modules ship inside the package, so they load offline,
unlike the Hub's ``evaluate.load("roc_auc")``, whose script is fetched at first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from ..data.labels import LabelSpec

# Metric families in their output order; "ap" is average precision.
KINDS = ("auroc", "ap", "accuracy", "f1")


def probabilities(logits: np.ndarray, spec: LabelSpec) -> np.ndarray:
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return (torch.sigmoid(logits) if spec.multi_label else torch.softmax(logits, dim=-1)).numpy()


def defined(y: np.ndarray) -> bool:
    """Whether a 0/1 column has both classes (AUROC and AP exist)."""
    return 0 < y.sum() < len(y)


def kinds_for(spec: LabelSpec, include_f1: bool = True) -> tuple[str, ...]:
    """The metric families of a problem type: multi-label AUROC, AP, F1; single-label AUROC, accuracy, F1."""
    kinds = ("auroc", "ap") if spec.multi_label else ("auroc", "accuracy")
    return (*kinds, "f1") if include_f1 else kinds


def metric_values(
    kind: str, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec, threshold: float = 0.5, per_class: bool = True
) -> dict[str, float]:
    """One family: ``auroc`` / ``ap`` (one-vs-rest per class where the class has positives and negatives, and their
    macro mean), ``accuracy`` (of the argmax), ``f1`` (multi-label: per class at ``threshold`` and their macro mean;
    single-label: macro F1 of the argmax). ``labels`` is [N, C] 0/1 (one-hot for single-label); a -1 (an unknown label:
    ``label_formats``) leaves that image out of that class's metrics."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    known = labels >= 0
    out: dict[str, float] = {}
    if kind in ("auroc", "ap"):
        score = roc_auc_score if kind == "auroc" else average_precision_score
        values = {
            name: float(score(labels[known[:, c], c], probs[known[:, c], c]))
            for c, name in enumerate(spec.names)
            if defined(labels[known[:, c], c])
        }
        if per_class:
            out.update({f"{kind}_{name}": v for name, v in values.items()})
        if values:
            out[f"{kind}_macro"] = float(np.mean(list(values.values())))
    elif kind == "accuracy":
        out["accuracy"] = float(accuracy_score(labels.argmax(axis=1), probs.argmax(axis=1)))
    elif kind == "f1" and spec.multi_label:
        predicted = (probs >= threshold).astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # F1 of a class never predicted is 0 by definition here
            f1 = [
                f1_score(labels[known[:, c], c], predicted[known[:, c], c], zero_division=0)
                for c in range(len(spec.names))
            ]
        out["f1_macro"] = float(np.mean(f1))
        if per_class:
            out.update({f"f1_{name}": float(v) for name, v in zip(spec.names, f1, strict=True)})
    elif kind == "f1":
        out["f1_macro"] = float(
            f1_score(
                labels.argmax(axis=1),
                probs.argmax(axis=1),
                average="macro",
                labels=list(range(len(spec.names))),
                zero_division=0,
            )
        )
    else:
        raise ValueError(f"unknown metric '{kind}' (one of {', '.join(KINDS)})")
    return out


def ordered(metrics: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Metrics in the order the recipes have always written them: per class AUROC and AP, then macro AUROC, AP,
    accuracy, macro F1, per-class F1; then each CI (``_ci95_low`` / ``_ci95_high``) in the same order; then the rest."""
    keys = [f"{kind}_{name}" for name in names for kind in ("auroc", "ap")]
    keys += ["auroc_macro", "ap_macro", "accuracy", "f1_macro", *(f"f1_{name}" for name in names)]
    point = [k for k in keys if k in metrics]
    bounds = [f"{k}_ci95_{side}" for k in point for side in ("low", "high") if f"{k}_ci95_{side}" in metrics]
    out = {k: metrics[k] for k in point + bounds}
    out.update({k: v for k, v in metrics.items() if k not in out})
    return out


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
    metrics: dict[str, float] = {}
    for kind in kinds_for(spec, include_f1):
        metrics.update(metric_values(kind, labels, probs, spec, threshold, per_class))
    return ordered(metrics, spec.names)


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
