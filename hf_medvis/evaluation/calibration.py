"""Calibration of a classifier's probabilities: per class, the expected calibration error over equal-mass bins and the
Brier score (scikit-learn's), on the images whose label is known; and temperature scaling, which makes them better
calibrated (``fit_temperatures``: ``hf-medvis evaluate --calibrate``, applied by ``Predictor``).

Equal-mass bins (each holds ~N / bins images) rather than equal-width ones: a rare finding's probabilities crowd near
0, where equal-width bins would put nearly every image in the first bin and say nothing about the rest. scikit-learn
draws the reliability diagram (``plots.save_reliability_plot``) with the same quantile bins but has no ECE; the one
here is ECE's definition, sum over bins of (bin share) x |observed rate - mean probability|.

Temperature scaling divides the logits by a temperature T fitted on validation patients by minimising their negative
log-likelihood: one T per class for multi-label models (sigmoid(logit / T)), one for all classes of a single-label model
(softmax(logits / T)). T > 0 keeps each class's order of images, so AUROC is unchanged; only the probabilities move."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data.labels import LabelSpec

CALIBRATION_BINS = 10
# config.json key: {class: T} (multi-label) or {"all": T} (single-label), read by Predictor.
TEMPERATURE_KEY = "hf_medvis_temperature"
ALL_CLASSES = "all"
# The search range of T: beyond it the probabilities are all ~0.5 or all ~0/1. A fit that lands on a bound is no
# estimate (the likelihood keeps improving past it), so it is not kept: see _at_bound_reason.
TEMPERATURE_BOUNDS = (0.01, 100.0)


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
    from sklearn.metrics import brier_score_loss  # here: Predictor reads temperatures_of without scikit-learn

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


def temperature_nll(truth: np.ndarray, logits: np.ndarray, temperature: float, multi_label: bool) -> float:
    """Mean negative log-likelihood of the labels under the logits divided by ``temperature``: one class's 0/1
    ``truth`` [N] and ``logits`` [N] (sigmoid), or single-label one-hot ``truth`` [N, C] and ``logits`` [N, C]
    (softmax)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    truth = np.asarray(truth)
    if multi_label:  # -log sigmoid(s) for positives, -log(1 - sigmoid(s)) for negatives, without overflow
        return float(np.mean(np.logaddexp(0.0, scaled) - truth * scaled))
    log_norm = np.logaddexp.reduce(scaled, axis=1)
    return float(np.mean(log_norm - scaled[np.arange(len(scaled)), truth.argmax(axis=1)]))


def _fit_one(truth: np.ndarray, logits: np.ndarray, multi_label: bool) -> float:
    from scipy.optimize import minimize_scalar  # here: evaluate without --calibrate never loads it

    # Over log T: the likelihood is smooth and unimodal there, and T stays positive.
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: temperature_nll(truth, logits, math.exp(log_t), multi_label),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-9},
    )
    return float(math.exp(result.x))


def _at_bound_reason(temperature: float) -> str | None:
    """Why a fitted T is not used, when it sits on a bound of the search range: toward 0 the validation set is
    separated perfectly and the scaled probabilities would saturate at exactly 0 and 1 in float32 (ties that lower
    the AUROC); toward infinity the logits carry almost nothing and every probability would become 0.5."""
    low, high = TEMPERATURE_BOUNDS
    if temperature <= low * 1.001:
        return (
            f"the validation images separate it perfectly (T goes to the bound {low:g}, which would saturate the "
            "probabilities at 0 and 1): not calibrated"
        )
    if temperature >= high * 0.999:
        return (
            f"its logits carry almost no information on the validation images (T goes to the bound {high:g}, every "
            "probability toward 0.5): not calibrated"
        )
    return None


def fit_temperatures(
    truth: np.ndarray, logits: np.ndarray, spec: LabelSpec, skip: Sequence[str] = ()
) -> tuple[dict[str, float], dict[str, str]]:
    """Temperatures minimising the validation negative log-likelihood of ``truth`` ([N, C] 0/1, -1: unknown, left out)
    under ``logits`` ([N, C], the model's raw outputs): multi-label ``{class: T}`` (classes of ``skip``, classes
    without both positives and negatives, and fits on a bound of the search range get none: ``{class: reason}``),
    single-label ``{"all": T}``."""
    truth, logits = np.asarray(truth), np.asarray(logits, dtype=np.float64)
    if not spec.multi_label:
        if len(set(truth.argmax(axis=1).tolist())) < 2:
            return {}, {ALL_CLASSES: "the validation images are all of one class"}
        temperature = _fit_one(truth, logits, multi_label=False)
        reason = _at_bound_reason(temperature)
        return ({}, {ALL_CLASSES: reason}) if reason else ({ALL_CLASSES: temperature}, {})
    temperatures: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for c, name in enumerate(spec.names):
        if name in skip:
            continue
        known = truth[:, c] >= 0
        y = truth[known, c]
        if not 0 < y.sum() < len(y):  # with one kind of label the likelihood only grows as T shrinks (or grows)
            reasons[name] = "no positive and negative images in the validation set"
            continue
        temperature = _fit_one(y, logits[known, c], multi_label=True)
        reason = _at_bound_reason(temperature)
        if reason:
            reasons[name] = reason
        else:
            temperatures[name] = temperature
    return temperatures, reasons


def temperature_vector(temperatures: Mapping[str, float] | None, names: Sequence[str]) -> np.ndarray | None:
    """Per class of ``names`` its temperature (float32; 1 where it has none), from ``{class: T}`` or ``{"all": T}``;
    None without temperatures."""
    if not temperatures:
        return None
    if ALL_CLASSES in temperatures and len(temperatures) == 1:
        return np.full(len(names), temperatures[ALL_CLASSES], dtype=np.float32)
    return np.array([temperatures.get(name, 1.0) for name in names], dtype=np.float32)


def temperatures_of(config: Any, names: Sequence[str]) -> np.ndarray | None:
    """The temperature of each of ``names`` from a model config's ``hf_medvis_temperature``, or None without one."""
    return temperature_vector(getattr(config, TEMPERATURE_KEY, None), names)


def scale_logits(logits: np.ndarray, temperature: np.ndarray | None) -> np.ndarray:
    """``logits`` [N, C] divided by each class's temperature, in float32 (unchanged without temperatures)."""
    logits = np.asarray(logits, dtype=np.float32)
    return logits if temperature is None else logits / np.asarray(temperature, dtype=np.float32)


def temperature_report(
    truth: np.ndarray, logits: np.ndarray, spec: LabelSpec, temperatures: Mapping[str, float]
) -> dict[str, Any]:
    """What fitting changed on the validation images: per class (``"all"`` for single-label NLL) the negative
    log-likelihood and the ECE (``CALIBRATION_BINS`` equal-mass bins) before and after temperature scaling."""
    from .metrics import probabilities

    truth, logits = np.asarray(truth), np.asarray(logits, dtype=np.float32)
    vector = temperature_vector(temperatures, spec.names)
    before, after = probabilities(logits, spec), probabilities(scale_logits(logits, vector), spec)
    report: dict[str, Any] = {key: {} for key in ("nll_before", "nll_after", "ece_before", "ece_after")}
    for c, name in enumerate(spec.names):
        known = truth[:, c] >= 0
        if (spec.multi_label and name not in temperatures) or not known.any():
            continue
        y = truth[known, c].astype(np.float64)
        report["ece_before"][name] = expected_calibration_error(y, before[known, c].astype(np.float64))
        report["ece_after"][name] = expected_calibration_error(y, after[known, c].astype(np.float64))
        if spec.multi_label:
            report["nll_before"][name] = temperature_nll(y, logits[known, c], 1.0, True)
            report["nll_after"][name] = temperature_nll(y, logits[known, c], temperatures[name], True)
    if not spec.multi_label and ALL_CLASSES in temperatures:
        report["nll_before"][ALL_CLASSES] = temperature_nll(truth, logits, 1.0, False)
        report["nll_after"][ALL_CLASSES] = temperature_nll(truth, logits, temperatures[ALL_CLASSES], False)
    return report
