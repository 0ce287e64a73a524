"""Calibration of a classifier's probabilities: per class, the expected calibration error over equal-mass bins and the
Brier score (scikit-learn's), on the images whose label is known.

Equal-mass bins (each holds ~N / bins images) rather than equal-width ones: a rare finding's probabilities crowd near
0, where equal-width bins would put nearly every image in the first bin and say nothing about the rest. scikit-learn
draws the reliability diagram (``plots.save_reliability_plot``) with the same quantile bins but has no ECE; the one
here is ECE's definition, sum over bins of (bin share) x |observed rate - mean probability|."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss

from ..data.labels import LabelSpec

CALIBRATION_BINS = 10


def expected_calibration_error(truth: np.ndarray, probs: np.ndarray, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE of binary ``truth`` (0/1) against ``probs`` over ``n_bins`` equal-mass bins of the sorted probabilities."""
    order = np.argsort(probs, kind="stable")
    bins = [chunk for chunk in np.array_split(order, min(n_bins, len(order))) if len(chunk)]
    return float(sum(len(b) / len(order) * abs(truth[b].mean() - probs[b].mean()) for b in bins))


def calibration_metrics(
    labels: np.ndarray, probs: np.ndarray, spec: LabelSpec, n_bins: int = CALIBRATION_BINS
) -> dict[str, dict[str, Any]]:
    """Per class (one-vs-rest for multi-class): ``ece``, ``brier``, ``images`` (known labels), ``bins``. A class
    without a known label is left out."""
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(spec.names):
        known = labels[:, c] >= 0  # unknown labels (-1) are neither positives nor negatives
        if not known.any():
            continue
        truth, p = labels[known, c].astype(np.int64), probs[known, c].astype(np.float64)
        out[name] = {
            "ece": expected_calibration_error(truth, p, n_bins),
            "brier": float(brier_score_loss(truth, p, labels=[0, 1])),
            "images": int(known.sum()),
            "bins": min(n_bins, int(known.sum())),
        }
    return out
