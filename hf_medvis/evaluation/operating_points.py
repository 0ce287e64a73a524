"""Operating points of a multi-label classifier: per-class thresholds chosen on validation patients, then sensitivity,
specificity, PPV and NPV at them on the evaluated set with patient-bootstrap CIs, saved into the model's config.json.

Probabilities are the model's float32 numbers and a threshold is one of them (a validation score): every comparison is
``probability >= threshold`` in float32. JSON holds each as the shortest decimal that reads back as the same float32
(``json_number``); that mapping keeps the order of float32 numbers, so comparing the written numbers gives the same
findings as comparing the model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.storage import write_text_atomic
from ..data.labels import LabelSpec
from .bootstrap import metrics_with_intervals
from .metrics import OPERATING_POINT_RATES

# config.json keys: {class: threshold} (read by Predictor: findings) and how they were chosen.
THRESHOLDS_KEY = "hf_medvis_thresholds"
OPERATING_POINT_KEY = "hf_medvis_operating_point"
RULE_KINDS = ("youden", "sensitivity", "specificity")
RATE_LABELS = {"sensitivity": "sens", "specificity": "spec", "ppv": "PPV", "npv": "NPV"}
UNDEFINED_RATE = {  # why a rate has no value: its denominator is 0
    "sensitivity": "no positive image in the evaluated set",
    "specificity": "no negative image in the evaluated set",
    "ppv": "no image at or above the threshold (no positive call)",
    "npv": "no image below the threshold (no negative call)",
}


@dataclass(frozen=True)
class OperatingRule:
    """How a class's threshold is chosen on the validation images: ``youden`` (maximum sensitivity + specificity - 1),
    ``sensitivity`` (the highest threshold reaching ``target``) or ``specificity`` (the lowest reaching ``target``)."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def parse_operating_point(text: str) -> OperatingRule:
    """``youden``, ``sensitivity=X`` or ``specificity=X`` with X in (0, 1)."""
    kind, _, value = text.strip().partition("=")
    kind = kind.strip().lower()
    if kind == "youden" and not value:
        return OperatingRule("youden")
    if kind in ("sensitivity", "specificity") and value:
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if not 0 < target < 1:
            raise ValueError(f"--operating-point {text}: {kind} must be a number in (0, 1), e.g. {kind}=0.9")
        return OperatingRule(kind, target)
    raise ValueError(f"--operating-point {text}: use youden, sensitivity=X or specificity=X (X in (0, 1))")


def json_number(value: float) -> float:
    """A float32 number as the shortest decimal that reads back as it: exact, and short in JSON."""
    return float(str(np.float32(value)))


def choose_threshold(truth: np.ndarray, scores: np.ndarray, rule: OperatingRule) -> tuple[np.float32 | None, str]:
    """One class's threshold on the validation images' 0/1 ``truth`` (-1: unknown, left out) and ``scores``; or None
    and the reason. The candidates are the ROC curve's thresholds: every distinct validation score."""
    from sklearn.metrics import roc_curve  # here: Predictor reads thresholds_of without scikit-learn

    known = truth >= 0
    y, s = truth[known].astype(np.int64), np.asarray(scores, dtype=np.float32)[known]
    if not known.any():
        return None, "not labelled in the validation set"
    if y.sum() == 0:
        return None, "no positive image in the validation set"
    if y.sum() == len(y):
        return None, "no negative image in the validation set"
    # Every distinct score, highest first (drop_intermediate would drop thresholds that a sensitivity target needs).
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first is +inf (no image called positive): no score of the model
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule.kind == "youden":
        # argmax takes the first maximum: among tied J the highest threshold (fewest positive calls).
        index = int(np.argmax(tpr - fpr))
    elif rule.kind == "sensitivity":
        index = int(np.flatnonzero(tpr >= rule.target)[0])  # the lowest threshold has sensitivity 1: always found
    else:
        reached = np.flatnonzero(1 - fpr >= rule.target)
        if not len(reached):
            return None, f"no threshold reaches specificity {rule.target:g} on the validation set"
        index = int(reached[-1])  # thresholds fall along the curve: the last is the lowest
    return np.float32(thresholds[index]), ""


def choose_thresholds(
    truth: np.ndarray, probs: np.ndarray, spec: LabelSpec, rule: OperatingRule, skip: Sequence[str] = ()
) -> tuple[dict[str, np.float32], dict[str, str]]:
    """Per class of ``spec`` (but those of ``skip``): its threshold on the validation images, or the reason it has
    none. Returns ({class: threshold}, {class: reason})."""
    if not spec.multi_label:
        raise ValueError("operating points are per-class thresholds of multi-label models")
    thresholds: dict[str, np.float32] = {}
    reasons: dict[str, str] = {}
    for c, name in enumerate(spec.names):
        if name in skip:
            continue
        threshold, reason = choose_threshold(np.asarray(truth)[:, c], np.asarray(probs)[:, c], rule)
        if threshold is None:
            reasons[name] = reason
        else:
            thresholds[name] = threshold
    return thresholds, reasons


def operating_point_metrics(
    truth: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Any],
    spec: LabelSpec,
    thresholds: dict[str, np.float32],
    *,
    rule: OperatingRule,
    validation_truth: np.ndarray,
    validation_groups: Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per class with a threshold: ``threshold``, sensitivity, specificity, PPV, NPV on the evaluated images
    (``truth``, ``probs``, ``groups``: a patient per image), each with ``_ci95_low`` / ``_ci95_high`` from the patient
    bootstrap (``metrics_with_intervals``, family "operating_point"), ``rule``, and the validation images and patients
    whose label of the class is known. A rate whose denominator is 0 is None, its reason under ``undefined``."""
    per_class_threshold = np.array([thresholds.get(name, np.nan) for name in spec.names], dtype=np.float32)
    values = metrics_with_intervals(
        ("operating_point",),
        truth,
        probs,
        spec,
        threshold=per_class_threshold.astype(np.float64),  # float32 -> float64 exactly: the same comparisons
        groups=[str(g) for g in groups],
        n_resamples=n_resamples,
        seed=seed,
    )
    validation_truth = np.asarray(validation_truth)
    validation_groups = np.asarray([str(g) for g in validation_groups])
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(spec.names):
        if name not in thresholds:
            continue
        point: dict[str, Any] = {"threshold": json_number(thresholds[name])}
        undefined: dict[str, str] = {}
        for rate in OPERATING_POINT_RATES:
            key = f"{rate}_{name}"
            point[rate] = values.get(key)
            point[f"{rate}_ci95_low"] = values.get(f"{key}_ci95_low")
            point[f"{rate}_ci95_high"] = values.get(f"{key}_ci95_high")
            if point[rate] is None:
                undefined[rate] = UNDEFINED_RATE[rate]
        known = validation_truth[:, c] >= 0
        point["rule"] = str(rule)
        point["validation_images"] = int(known.sum())
        point["validation_patients"] = len(set(validation_groups[known]))
        if undefined:
            point["undefined"] = undefined
        out[name] = point
    return out


def format_operating_points(points: dict[str, dict[str, Any]], without: dict[str, str]) -> str:
    """One line per class: threshold, then each rate with its 95% CI; then the classes without an operating point."""

    def cell(point: dict[str, Any], rate: str) -> str:
        if point[rate] is None:
            return f"{RATE_LABELS[rate]} n/a ({point['undefined'][rate]})"
        text = f"{RATE_LABELS[rate]} {point[rate]:.3f}"
        if point[f"{rate}_ci95_low"] is not None:
            text += f" [{point[f'{rate}_ci95_low']:.3f}, {point[f'{rate}_ci95_high']:.3f}]"
        return text

    lines = []
    for name, point in points.items():
        rates = "  ".join(f"{cell(point, rate):<22}" for rate in OPERATING_POINT_RATES).rstrip()
        lines.append(f"{name[:22]:<22} threshold {point['threshold']:<11} {rates}")
    lines += [f"{name[:22]:<22} no operating point: {reason}" for name, reason in without.items()]
    return "\n".join(lines)


def update_model_config(model_dir: str | os.PathLike, values: Mapping[str, Any], remove: Sequence[str] = ()) -> Path:
    """Sets ``values`` and drops the keys of ``remove`` in the folder's config.json, written whole or not at all (in
    save_pretrained's layout). Returns its path."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    for key in remove:
        config.pop(key, None)
    config.update(values)
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def thresholds_of(config: Any, names: Sequence[str]) -> np.ndarray | None:
    """The float32 threshold of each of ``names`` from a model config's ``hf_medvis_thresholds`` (NaN: none, never a
    finding), or None when the config has none."""
    saved = getattr(config, THRESHOLDS_KEY, None)
    if not saved:
        return None
    values = [saved.get(name) for name in names]
    return np.array([np.nan if value is None else value for value in values], dtype=np.float32)
