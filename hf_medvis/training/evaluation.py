"""Classification metrics, patient-level bootstrap confidence intervals, plots, and batch inference on image files.

Metrics come from scikit-learn. ``evaluate`` (the Hugging Face library) is not used for them: its metrics
(``evaluate.load("roc_auc")``) are scripts fetched from the Hub at first use, so they fail on an offline cluster node,
and they wrap the same scikit-learn functions anyway.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from ..data.labels import LabelSpec
from ..data.transforms import build_eval_transform, normalize_batch, to_uint8_tensor


def probabilities(logits: np.ndarray, spec: LabelSpec) -> np.ndarray:
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return (torch.sigmoid(logits) if spec.multi_label else torch.softmax(logits, dim=-1)).numpy()


def _defined(y: np.ndarray) -> bool:
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
        if not _defined(labels[:, c]):
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
            metrics["f1_macro"] = float(f1_score(truth, predicted, average="macro", labels=list(range(len(spec.names))),
                                                 zero_division=0))
    return metrics


def build_compute_metrics(spec: LabelSpec, threshold: float = 0.5):
    """``compute_metrics`` for the Trainer: keys become ``eval_auroc_macro``, ``eval_accuracy``, ..."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return classification_metrics(label_targets(eval_pred.label_ids, spec), probabilities(logits, spec), spec,
                                      threshold)

    return compute_metrics


def label_targets(label_ids: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Trainer label ids (multi-hot floats or class indices) -> [N, C] 0/1."""
    label_ids = np.asarray(label_ids)
    if spec.multi_label:
        return label_ids.astype(np.float32)
    onehot = np.zeros((len(label_ids), len(spec.names)), dtype=np.float32)
    onehot[np.arange(len(label_ids)), label_ids.astype(int)] = 1.0
    return onehot


def _auroc_by_ranks(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U statistic (ties averaged): the value roc_auc_score returns, without its per-call
    overhead, which dominates a bootstrap of thousands of small resamples."""
    from scipy.stats import rankdata

    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y > 0].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _bootstrap_values(labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> dict[str, float]:
    values: dict[str, float] = {}
    aurocs = []
    for c, name in enumerate(spec.names):
        auroc = _auroc_by_ranks(labels[:, c], probs[:, c])
        if auroc is not None:
            values[f"auroc_{name}"] = auroc
            aurocs.append(auroc)
    if aurocs:
        values["auroc_macro"] = float(np.mean(aurocs))
    if not spec.multi_label:
        values["accuracy"] = float(np.mean(labels.argmax(axis=1) == probs.argmax(axis=1)))
    return values


def bootstrap_confidence_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Any],
    spec: LabelSpec,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile CIs of AUROC (per class and macro) and, for multi-class, accuracy.

    Patients, not images, are resampled: images of one patient are correlated, and resampling them independently would
    give CIs that are too narrow.
    """
    group_ids, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(group_ids))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        rows = np.concatenate([members[g] for g in chosen])
        for key, value in _bootstrap_values(labels[rows], probs[rows], spec).items():
            samples.setdefault(key, []).append(value)
    alpha = (1 - confidence) / 2
    return {
        key: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
        for key, v in samples.items()
        if len(v) >= max(10, n_resamples // 2)  # a metric undefined in most resamples has no meaningful CI
    }


def metrics_with_ci(
    labels: np.ndarray, probs: np.ndarray, groups: Sequence[Any], spec: LabelSpec, *, threshold: float = 0.5,
    n_resamples: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Point estimates plus ``<metric>_ci95_low`` / ``_ci95_high`` from the patient bootstrap."""
    metrics: dict[str, Any] = classification_metrics(labels, probs, spec, threshold)
    if n_resamples > 0:
        for key, (low, high) in bootstrap_confidence_intervals(labels, probs, groups, spec, n_resamples=n_resamples,
                                                               seed=seed).items():
            if key in metrics:
                metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"] = low, high
    metrics["images"] = len(labels)
    metrics["patients"] = len({str(g) for g in groups})
    return metrics


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
    lines.append(f"({metrics.get('images', '?')} images, {metrics.get('patients', '?')} patients; "
                 "95% CIs from a patient-level bootstrap)")
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    # Files only, never a GUI window; but keep a notebook's inline backend so that figures display there.
    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def save_roc_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:
    """One ROC curve per class (one-vs-rest for multi-class)."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(spec.names):
        if _defined(labels[:, c]):
            RocCurveDisplay.from_predictions(labels[:, c], probs[:, c], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title("ROC per class")
    fig.tight_layout()
    return _save(fig, path)


def save_confusion_plot(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray, spec: LabelSpec) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay.from_predictions(
        labels.argmax(axis=1), probs.argmax(axis=1), labels=list(range(len(spec.names))),
        display_labels=list(spec.names), ax=ax, colorbar=False,
    )
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    return _save(fig, path)


# ---- inference -------------------------------------------------------------------------------------------------------


class Predictor:
    """A saved classifier plus the exact preprocessing of training: read_image (DICOM/PNG/JPEG) -> resize + centre
    crop -> normalise with the processor's mean/std."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None):
        from transformers import ViTImageProcessor

        from ..models.transfer import load_classifier

        self.model = load_classifier(os.fspath(model_dir)).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        processor = ViTImageProcessor.from_pretrained(model_dir)
        self.image_size = int(processor.size["height"])
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        config = self.model.config
        self.spec = LabelSpec(tuple(config.id2label[i] for i in range(config.num_labels)), config.problem_type)
        self.transform = build_eval_transform(self.image_size)

    @torch.no_grad()
    def predict(self, sources: Sequence[str], batch_size: int = 32, storage_options: dict | None = None) -> np.ndarray:
        from ..data.decode import read_image

        out = []
        for start in range(0, len(sources), batch_size):
            batch = torch.stack([
                self.transform(to_uint8_tensor(read_image(src, storage_options=storage_options)))
                for src in sources[start : start + batch_size]
            ])
            pixels = normalize_batch(batch.to(self.device), self.mean, self.std, self.model.config.num_channels)
            out.append(probabilities(self.model(pixel_values=pixels).logits.float().cpu().numpy(), self.spec))
        return np.concatenate(out) if out else np.zeros((0, len(self.spec.names)), dtype=np.float32)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def plot_image_grid(
    sources: Sequence[str], titles: Sequence[str], columns: int = 6, storage_options: dict | None = None
):
    """A matplotlib figure of images (DICOM/PNG/JPEG through read_image) with a title each; for notebooks."""
    from ..data.decode import read_image

    plt = _pyplot()
    rows = max(1, -(-len(sources) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.25 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, src, title in zip(axes.flat, sources, titles, strict=False):
        ax.imshow(read_image(src, storage_options=storage_options), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
