"""Confidence intervals of classification metrics from a patient-level bootstrap (patients, not images, resampled)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..data.labels import LabelSpec
from .metrics import classification_metrics


def _auroc_by_ranks(y: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U statistic (ties averaged): the value roc_auc_score returns, without its per-call
    overhead, which dominates a bootstrap of thousands of small resamples."""
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
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Any],
    spec: LabelSpec,
    *,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimates plus ``<metric>_ci95_low`` / ``_ci95_high`` from the patient bootstrap."""
    metrics: dict[str, Any] = classification_metrics(labels, probs, spec, threshold)
    if n_resamples > 0:
        for key, (low, high) in bootstrap_confidence_intervals(
            labels, probs, groups, spec, n_resamples=n_resamples, seed=seed
        ).items():
            if key in metrics:
                metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"] = low, high
    metrics["images"] = len(labels)
    metrics["patients"] = len({str(g) for g in groups})
    return metrics
