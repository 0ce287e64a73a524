"""Confidence intervals of classification metrics from a patient-level bootstrap (patients, not images, resampled)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..data.labels import MULTI_LABEL, SINGLE_LABEL, LabelSpec
from .metric_modules import evaluate_metrics
from .metrics import defined, metric_values

# The metrics whose CIs the recipes and `hf-medvis evaluate` report (the metric modules can give AP and F1 CIs too).
CI_KINDS = ("auroc", "accuracy")


def _auroc_by_ranks(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U statistic (ties averaged): the value roc_auc_score returns, without its per-call
    overhead, which dominates a bootstrap of thousands of small resamples."""
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y > 0].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """average_precision_score (steps at each distinct score, highest first) without its per-call overhead."""
    if not defined(y):
        return None
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]  # the last row of each distinct score
    tps = np.cumsum(y)[last]
    precision, recall = tps / (last + 1), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_per_class(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 of each 0/1 column (0 for a class neither present nor predicted, as scikit-learn's zero_division=0)."""
    tp = (truth * predicted).sum(axis=0)
    denominator = truth.sum(axis=0) + predicted.sum(axis=0)
    return np.divide(2 * tp, denominator, out=np.zeros(truth.shape[1]), where=denominator > 0)


def _bootstrap_values(
    labels: np.ndarray, probs: np.ndarray, spec: LabelSpec, kinds: Sequence[str], threshold: float
) -> dict[str, float]:
    """``metric_values`` of one resample, for ``kinds``, with fast equivalents of the scikit-learn calls."""
    values: dict[str, float] = {}
    for kind, score in (("auroc", _auroc_by_ranks), ("ap", _average_precision)):
        if kind not in kinds:
            continue
        known = labels >= 0  # -1: an unknown label (e.g. CheXpert's uncertain under U-Ignore), left out per class
        found = [(name, score(labels[known[:, c], c], probs[known[:, c], c])) for c, name in enumerate(spec.names)]
        found = [(name, v) for name, v in found if v is not None]
        values.update({f"{kind}_{name}": v for name, v in found})
        if found:
            values[f"{kind}_macro"] = float(np.mean([v for _, v in found]))
    if "accuracy" in kinds and not spec.multi_label:
        values["accuracy"] = float(np.mean(labels.argmax(axis=1) == probs.argmax(axis=1)))
    if "f1" in kinds and spec.multi_label:
        known = labels >= 0  # unknown labels count neither as a hit nor as a miss
        f1 = _f1_per_class(np.where(known, labels, 0), np.where(known, probs >= threshold, 0).astype(float))
        values.update({f"f1_{name}": float(v) for name, v in zip(spec.names, f1, strict=True)})
        values["f1_macro"] = float(f1.mean())
    elif "f1" in kinds:  # macro F1 of the argmax, every class counted
        values["f1_macro"] = float(_f1_per_class(labels, np.eye(len(spec.names))[probs.argmax(axis=1)]).mean())
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
    kinds: Sequence[str] = CI_KINDS,
    threshold: float = 0.5,
) -> dict[str, list[float]]:
    """Percentile CIs of the metrics of ``kinds`` (default: AUROC per class and macro and, for multi-class, accuracy;
    also "ap" and "f1", multi-label AP and F1 at ``threshold``).

    Patients, not images, are resampled: images of one patient are correlated, and resampling them independently would
    give CIs that are too narrow. The resamples depend on ``seed`` and the patients only, so one metric's CI is the same
    whichever others are computed with it.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    group_ids, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(group_ids))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        rows = np.concatenate([members[g] for g in chosen])
        for key, value in _bootstrap_values(labels[rows], probs[rows], spec, kinds, threshold).items():
            samples.setdefault(key, []).append(value)
    alpha = (1 - confidence) / 2
    return {
        key: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
        for key, v in samples.items()
        if len(v) >= max(10, n_resamples // 2)  # a metric undefined in most resamples has no meaningful CI
    }


def metric_with_ci(
    kind: str,
    labels: np.ndarray,
    probs: np.ndarray,
    spec: LabelSpec,
    *,
    threshold: float = 0.5,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    per_class: bool = True,
) -> dict[str, float]:
    """One metric family (``metrics.metric_values``) plus ``<metric>_ci95_low`` / ``_ci95_high`` from the patient
    bootstrap when ``groups`` (a patient id per image) are given and ``n_resamples`` > 0: what each ``evaluate``
    metric module returns."""
    metrics = metric_values(kind, labels, probs, spec, threshold, per_class)
    if groups is not None and n_resamples > 0:
        if len(groups) != len(labels):
            raise ValueError(f"groups: {len(groups)} patient ids for {len(labels)} images")
        intervals = bootstrap_confidence_intervals(
            labels, probs, groups, spec, n_resamples=n_resamples, seed=seed, kinds=(kind,), threshold=threshold
        )
        for key, (low, high) in intervals.items():
            if key in metrics:
                metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"] = low, high
    return metrics


def compute_for_module(
    kind: str,
    predictions: np.ndarray,
    references: np.ndarray,
    *,
    label_names: Sequence[str] | None = None,
    problem_type: str = MULTI_LABEL,
    threshold: float = 0.5,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    per_class: bool = True,
) -> dict[str, float]:
    """The ``_compute`` of the ``evaluate`` module of ``kind`` (arguments: ``metric_modules._INPUTS``)."""
    probs, labels = np.asarray(predictions, dtype=np.float64), np.asarray(references)
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(
            f"predictions and references must both be [images, classes]; got {probs.shape} and {labels.shape}"
        )
    names = tuple(str(n) for n in label_names) if label_names is not None else tuple(map(str, range(probs.shape[1])))
    if len(names) != probs.shape[1]:
        raise ValueError(f"label_names: {len(names)} names for {probs.shape[1]} classes")
    if problem_type not in (MULTI_LABEL, SINGLE_LABEL):
        raise ValueError(f"problem_type must be '{MULTI_LABEL}' or '{SINGLE_LABEL}', got '{problem_type}'")
    if kind == "accuracy" and problem_type == MULTI_LABEL:
        raise ValueError("accuracy is for single-label classification (problem_type='single_label_classification')")
    return metric_with_ci(
        kind,
        labels,
        probs,
        LabelSpec(names, problem_type),
        threshold=threshold,
        groups=groups,
        n_resamples=n_resamples,
        seed=seed,
        per_class=per_class,
    )


def metrics_with_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Any],
    spec: LabelSpec,
    *,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
    via_evaluate: bool = True,
) -> dict[str, Any]:
    """Point estimates plus ``<metric>_ci95_low`` / ``_ci95_high`` (AUROC, accuracy) from the patient bootstrap,
    computed by the ``evaluate`` metric modules (``via_evaluate=False``: their computation without importing
    ``evaluate``, for training processes); then the numbers of images and patients."""
    metrics: dict[str, Any] = evaluate_metrics(
        labels,
        probs,
        spec,
        threshold=threshold,
        groups=groups,
        n_resamples=n_resamples,
        seed=seed,
        ci_kinds=CI_KINDS,
        via_evaluate=via_evaluate,
    )
    metrics["images"] = len(labels)
    metrics["patients"] = len({str(g) for g in groups})
    return metrics
