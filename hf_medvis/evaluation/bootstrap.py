"""Confidence intervals of classification metrics from a patient-level bootstrap (patients, not images, resampled).

Each resample is scored by ``metrics.metric_values``, the function that gives the point estimates. ``metrics_with_ci``
(the recipes' final metrics, ``hf-medvis evaluate``) and the ``evaluate`` metric modules (``compute_for_module``) both
go through ``metrics_with_intervals``: one computation, whichever way it is called; so do the operating points of
``hf-medvis evaluate --thresholds-from`` (``operating_points.py``, family "operating_point").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..data.labels import MULTI_LABEL, SINGLE_LABEL, LabelSpec
from .metrics import kinds_for, metric_values, ordered, per_source

# The metrics whose CIs the recipes and `hf-medvis evaluate` report (the metric modules can give AP and F1 CIs too).
CI_KINDS = ("auroc", "accuracy")


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
    threshold: float | np.ndarray = 0.5,
) -> dict[str, list[float]]:
    """Percentile CIs of the metrics of ``kinds`` (default: AUROC per class and macro and, for multi-class, accuracy;
    also "ap" and "f1", multi-label AP and F1 at ``threshold``, and "operating_point", sensitivity, specificity, PPV
    and NPV at ``threshold``: one number or one per class).

    Patients, not images, are resampled: images of one patient are correlated, and resampling them independently would
    give CIs that are too narrow. The resamples depend on ``seed`` and the patients only, so one metric's CI is the same
    whichever others are computed with it.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    kinds = [k for k in kinds if not (k == "accuracy" and spec.multi_label)]  # accuracy: single-label only
    samples: dict[str, list[float]] = {}
    for rows in patient_resamples(patient_members(groups), n_resamples, np.random.default_rng(seed)):
        resampled_labels, resampled_probs = labels[rows], probs[rows]
        for kind in kinds:
            for key, value in metric_values(kind, resampled_labels, resampled_probs, spec, threshold).items():
                samples.setdefault(key, []).append(value)  # only where defined in this resample
    intervals = {key: percentile_interval(v, n_resamples, confidence) for key, v in samples.items()}
    return {key: interval for key, interval in intervals.items() if interval is not None}


def patient_members(groups: Sequence[Any]) -> list[np.ndarray]:
    """The row indices of each patient of ``groups`` (a patient id per image), patients in sorted id order."""
    group_ids, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(len(group_ids))]


def patient_resamples(
    members: Sequence[np.ndarray], n_resamples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``n_resamples`` row-index arrays, each the rows of as many patients as ``members`` (``patient_members``) holds,
    drawn with replacement from ``rng``. The draws depend on ``rng`` and the patients only, so one metric's CI is the
    same whichever others are computed with it."""
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[g] for g in chosen])


def percentile_interval(samples: Sequence[float], n_resamples: int, confidence: float = 0.95) -> list[float] | None:
    """The percentile interval of one metric's bootstrap ``samples`` (one per resample where it is defined); None when
    it is undefined in most resamples: no meaningful CI."""
    if len(samples) < max(10, n_resamples // 2):
        return None
    alpha = (1 - confidence) / 2
    return [float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))]


def metrics_with_intervals(
    kinds: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    spec: LabelSpec,
    *,
    ci_kinds: Sequence[str] | None = None,
    threshold: float | np.ndarray = 0.5,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    per_class: bool = True,
) -> dict[str, float]:
    """Metric families ``kinds`` (``metrics.metric_values``) plus ``<metric>_ci95_low`` / ``_ci95_high`` for those of
    ``ci_kinds`` (default: all of ``kinds``) from one patient bootstrap, when ``groups`` (a patient id per image) are
    given and ``n_resamples`` > 0. One family: what its ``evaluate`` metric module returns."""
    metrics: dict[str, float] = {}
    for kind in kinds:
        metrics.update(metric_values(kind, labels, probs, spec, threshold, per_class))
    ci_kinds = kinds if ci_kinds is None else [kind for kind in ci_kinds if kind in kinds]
    if groups is not None and n_resamples > 0 and ci_kinds:
        if len(groups) != len(labels):
            raise ValueError(f"groups: {len(groups)} patient ids for {len(labels)} images")
        intervals = bootstrap_confidence_intervals(
            labels, probs, groups, spec, n_resamples=n_resamples, seed=seed, kinds=ci_kinds, threshold=threshold
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
    return metrics_with_intervals(
        (kind,),
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
    sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Point estimates of every family of ``spec`` plus ``<metric>_ci95_low`` / ``_ci95_high`` (AUROC, accuracy) from
    one patient bootstrap, as the ``evaluate`` modules compute them (``metrics_with_intervals``) without importing
    ``evaluate``; then the numbers of images and patients. With ``sources`` (a data mix: each image's source), the same
    again for each source's images, keys prefixed ``<source>_``. The recipes' final metrics and ``hf-medvis
    evaluate``."""
    if sources is not None:
        labels, probs, groups = np.asarray(labels), np.asarray(probs), np.asarray([str(g) for g in groups])
        common = {"threshold": threshold, "n_resamples": n_resamples, "seed": seed}
        metrics = metrics_with_ci(labels, probs, groups, spec, **common)
        metrics.update(
            per_source(lambda rows: metrics_with_ci(labels[rows], probs[rows], groups[rows], spec, **common), sources)
        )
        return metrics
    ids = [str(g) for g in groups]
    metrics: dict[str, Any] = metrics_with_intervals(
        kinds_for(spec),
        labels,
        probs,
        spec,
        ci_kinds=CI_KINDS,
        threshold=threshold,
        groups=ids,
        n_resamples=n_resamples,
        seed=seed,
    )
    metrics = ordered(metrics, spec.names)
    metrics["images"] = len(labels)
    metrics["patients"] = len(set(ids))
    return metrics
