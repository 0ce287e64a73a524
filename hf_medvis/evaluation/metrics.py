"""Classification metrics of a fine-tuned model: per-class and macro AUROC, AP, F1 (multi-label) or accuracy; and
sensitivity, specificity, PPV, NPV at per-class thresholds (operating points, multi-label).

The one implementation (``metric_values``): the recipes' ``compute_metrics``, their final metrics and ``hf-medvis
evaluate`` (``bootstrap.metrics_with_ci``), every resample of the patient bootstrap (``bootstrap.py``) and the
``evaluate`` metric modules (``metric_modules.py``, scripts in ``evaluate_modules/``) all call it. Vectorised over
classes, in numpy: a bootstrap calls it thousands of times, where scikit-learn's per-call overhead would dominate;
tests/test_evaluate_predict.py checks it against scikit-learn.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import rankdata

from ..data.labels import LabelSpec

if TYPE_CHECKING:
    from transformers import EvalPrediction

# Metric families in their output order; "ap" is average precision. "operating_point" (sensitivity, specificity, PPV,
# NPV at per-class thresholds: operating_points.py) is asked for by name, never part of kinds_for's defaults.
KINDS = ("auroc", "ap", "accuracy", "f1", "operating_point")
OPERATING_POINT_RATES = ("sensitivity", "specificity", "ppv", "npv")


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


def _auroc(positive: np.ndarray, negative: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC of each column as the Mann-Whitney U statistic, ties averaged (roc_auc_score's value); NaN where a class
    lacks positives or negatives. Unknown rows score +inf, ranked above every known row: the known rows' ranks are
    their ranks among the known rows."""
    ranks = rankdata(np.where(positive | negative, probs, np.inf), axis=0)
    p, n = positive.sum(axis=0), negative.sum(axis=0)
    u = np.where(positive, ranks, 0.0).sum(axis=0) - p * (p + 1) / 2
    return np.divide(u, p * n, out=np.full(len(p), np.nan), where=(p > 0) & (n > 0))


def _average_precision(positive: np.ndarray, negative: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """average_precision_score of each column: sum over the distinct scores, highest first, of (recall gained) x
    precision; NaN where a class lacks positives or negatives. Unknown rows score -inf, sorted after every known row."""
    known = positive | negative
    order = np.argsort(np.where(known, -probs, np.inf), axis=0, kind="stable")
    score = np.take_along_axis(np.where(known, probs, -np.inf), order, axis=0)
    seen = np.take_along_axis(known, order, axis=0)
    tps = np.cumsum(np.take_along_axis(positive, order, axis=0), axis=0)
    # The last known row of each distinct score: where the curve steps.
    last = seen & np.vstack([score[1:] != score[:-1], np.ones((1, score.shape[1]), bool)])
    before = np.vstack([np.zeros((1, tps.shape[1]), tps.dtype), np.maximum.accumulate(np.where(last, tps, 0))[:-1]])
    p = positive.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows that are not steps, classes without positives
        step = (tps / p - before / p) * (tps / np.cumsum(seen, axis=0))
    ap = np.where(last, step, 0.0).sum(axis=0)
    return np.where((p > 0) & (negative.sum(axis=0) > 0), ap, np.nan)


def _f1(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 of each 0/1 column; 0 for a class neither present nor predicted (scikit-learn's zero_division=0)."""
    tp = (truth & predicted).sum(axis=0)
    denominator = truth.sum(axis=0) + predicted.sum(axis=0)
    return np.divide(2 * tp, denominator, out=np.zeros(truth.shape[1]), where=denominator > 0)


def _operating_point_rates(positive: np.ndarray, negative: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV of each column from the confusion counts; NaN where the denominator is 0
    (no positives, no negatives, nothing called positive, nothing called negative): undefined, never 0."""
    tp, fn = (positive & predicted).sum(axis=0), (positive & ~predicted).sum(axis=0)
    fp, tn = (negative & predicted).sum(axis=0), (negative & ~predicted).sum(axis=0)

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return np.divide(numerator, denominator, out=np.full(len(numerator), np.nan), where=denominator > 0)

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def metric_values(
    kind: str,
    labels: np.ndarray,
    probs: np.ndarray,
    spec: LabelSpec,
    threshold: float | np.ndarray = 0.5,
    per_class: bool = True,
) -> dict[str, float]:
    """One family: ``auroc`` / ``ap`` (one-vs-rest per class where the class has positives and negatives, and their
    macro mean), ``accuracy`` (of the argmax), ``f1`` (multi-label: per class at ``threshold`` and their macro mean;
    single-label: macro F1 of the argmax), ``operating_point`` (multi-label: ``sensitivity_<class>``,
    ``specificity_<class>``, ``ppv_<class>``, ``npv_<class>`` at ``threshold``, a probability >= it called positive;
    a rate whose denominator is 0 is left out, as is a class whose threshold is NaN). ``threshold`` is one number or
    one per class. ``labels`` is [N, C] 0/1 (one-hot for single-label); a -1 (an unknown label: ``labels.layouts``)
    leaves that image out of that class's metrics."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != probs.shape or labels.shape[1] != len(spec.names):
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape}: both must be [images, classes]")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite (a NaN or inf is in them)")
    positive, negative = labels > 0, labels == 0
    out: dict[str, float] = {}
    if kind in ("auroc", "ap"):
        values = (_auroc if kind == "auroc" else _average_precision)(positive, negative, probs)
        found = ~np.isnan(values)
        if per_class:
            out.update({f"{kind}_{n}": float(v) for n, v, ok in zip(spec.names, values, found, strict=True) if ok})
        if found.any():
            out[f"{kind}_macro"] = float(np.mean(values[found]))
    elif kind == "accuracy":
        out["accuracy"] = float(np.mean(labels.argmax(axis=1) == probs.argmax(axis=1)))
    elif kind == "f1" and spec.multi_label:
        f1 = _f1(positive, (labels >= 0) & (probs >= threshold))  # an unknown label is neither a hit nor a miss
        scored = (labels >= 0).any(axis=0)  # a class no image labels (a source that does not grade it) has no F1
        if scored.any():
            out["f1_macro"] = float(np.mean(f1[scored]))
        if per_class:
            out.update({f"f1_{n}": float(v) for n, v, ok in zip(spec.names, f1, scored, strict=True) if ok})
    elif kind == "operating_point":
        if not spec.multi_label:
            raise ValueError("operating points are per-class thresholds of multi-label models")
        thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (labels.shape[1],))
        chosen = ~np.isnan(thresholds)
        # NaN thresholds compare False (nothing called positive); those classes are dropped below.
        rates = _operating_point_rates(positive, negative, probs >= thresholds)
        for rate, values in rates.items():
            out.update(
                {
                    f"{rate}_{n}": float(v)
                    for n, v, ok in zip(spec.names, values, chosen & ~np.isnan(values), strict=True)
                    if ok
                }
            )
    elif kind == "f1":  # macro F1 of the argmax, every class counted
        one_hot = np.eye(len(spec.names), dtype=bool)
        out["f1_macro"] = float(np.mean(_f1(one_hot[labels.argmax(axis=1)], one_hot[probs.argmax(axis=1)])))
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


def per_source(score: Callable[[np.ndarray], dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """``score`` of each source's rows (an index array), its keys prefixed ``<source>_``: a data mix's figures per
    source (``eval_nih_auroc_macro``) beside the overall ones."""
    names = np.asarray(sources)
    out: dict[str, Any] = {}
    for name in dict.fromkeys(sources):
        out.update({f"{name}_{key}": value for key, value in score(np.flatnonzero(names == name)).items()})
    return out


def build_compute_metrics(
    spec: LabelSpec, threshold: float = 0.5, sources: Sequence[str] | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: keys become ``eval_auroc_macro``, ``eval_accuracy``, ... and, with the
    evaluation set's ``sources`` (a data mix), ``eval_<source>_auroc_macro``, ... Plain numpy: the training processes
    never import ``evaluate`` (see ``metric_modules``)."""

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        labels, probs = label_targets(eval_pred.label_ids, spec), probabilities(logits, spec)
        metrics = classification_metrics(labels, probs, spec, threshold=threshold)
        if sources is not None:
            if len(sources) != len(labels):
                raise ValueError(f"{len(labels)} predictions for an evaluation set of {len(sources)} images")
            metrics.update(
                per_source(lambda rows: classification_metrics(labels[rows], probs[rows], spec, threshold), sources)
            )
        return metrics

    return compute_metrics


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


def number_text(value: Any) -> str:
    """A metric as every table prints it: three decimals, "n/a" for anything that is not a number."""
    return f"{value:.3f}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "n/a"


def value_with_ci(values: Mapping[str, Any], key: str) -> str:
    """``0.690 [0.556, 0.854]``: ``values[key]`` and, where ``values`` has them, its ``_ci95_low`` / ``_ci95_high``;
    "n/a" where it has no number for ``key``. The one form of the CLI's tables and the report."""
    text = number_text(values.get(key))
    low, high = values.get(f"{key}_ci95_low"), values.get(f"{key}_ci95_high")
    if text != "n/a" and low is not None and high is not None:
        text += f" [{number_text(low)}, {number_text(high)}]"
    return text


def format_metrics_table(metrics: dict[str, Any], spec: LabelSpec) -> str:
    def cell(key: str) -> str:
        return value_with_ci(metrics, key)

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
