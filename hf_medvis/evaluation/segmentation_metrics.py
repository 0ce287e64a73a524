"""Segmentation metrics: per-class Dice and IoU, their macro averages, and patient-bootstrap CIs.

How they are averaged (as MONAI's ``DiceMetric`` / ``MeanIoU`` with ``include_background``, ``ignore_empty=True`` and
reduction "mean_batch"): each image's Dice (IoU) of each class is computed from that image's pixels, then averaged over
the images whose ground truth has the class; an image without the class in its ground truth does not count for it
(its Dice would be 0 or undefined whatever the model does there). Pixels labelled 255 are not scored. The macro
averages (``dice_macro``, ``iou_macro``) are the means over the foreground classes: class 0, the background, is
reported but left out of them.

The confusion counts (true positives, false positives, false negatives per image and class) are computed once, on the
device, while evaluating (``confusion_counts``, the Trainer's ``preprocess_logits_for_metrics``); the metrics and every
bootstrap resample are computed from those counts (``bootstrap.patient_resamples``: patients, not images, resampled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from .bootstrap import patient_members, patient_resamples, percentile_interval
from .metrics import value_with_ci

IGNORE_INDEX = 255
# [images, classes, COUNTS]: true positives, false positives, false negatives
COUNTS = ("tp", "fp", "fn")


def confusion_counts(
    predicted: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """int64 [N, K, 3] (tp, fp, fn) of predicted masks [N, H, W] against label masks [N, H, W] (class indices; pixels
    of ``ignore_index`` not counted), one row per image."""
    # a copy of an array: one read from a file (np.asarray of a PIL image) is read-only, which torch warns about
    predicted, labels = (
        x.long() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.int64))
        for x in (predicted, labels)
    )
    if predicted.shape != labels.shape or predicted.ndim != 3:
        raise ValueError(f"predicted and label masks must both be [N, H, W]; got {tuple(predicted.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    images = labels.shape[0]
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        raise ValueError(f"label masks hold values outside 0..{num_classes - 1} (and {ignore_index}, not scored)")
    # one bincount over (image, true class, predicted class): the confusion matrix of each image
    cell = (torch.arange(images, device=labels.device)[:, None, None] * num_classes + labels) * num_classes + predicted
    matrix = torch.bincount(cell[valid], minlength=images * num_classes * num_classes)
    matrix = matrix.reshape(images, num_classes, num_classes)  # [image, true, predicted]
    tp = matrix.diagonal(dim1=1, dim2=2)
    fp = matrix.sum(dim=1) - tp
    fn = matrix.sum(dim=2) - tp
    return torch.stack([tp, fp, fn], dim=-1)


def mask_counts(
    predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """``confusion_counts`` of masks of different sizes (``hf-medvis evaluate``: each image at its own size), one
    [H, W] predicted and true mask per image -> int64 [N, K, 3]."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted masks for {len(truth)} true masks")
    rows = [
        confusion_counts(np.asarray(p)[None], np.asarray(t)[None], num_classes, ignore_index)[0].numpy()
        for p, t in zip(predicted, truth, strict=True)
    ]
    return np.stack(rows) if rows else np.zeros((0, num_classes, len(COUNTS)), dtype=np.int64)


def logits_to_counts(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The Trainer's ``preprocess_logits_for_metrics``: logits [N, K, h, w] upsampled bilinearly to the labels' size,
    argmax, ``confusion_counts``. The evaluation loop then gathers [N, K, 3] counts, not full-size logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    upsampled = torch.nn.functional.interpolate(
        logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
    )
    return confusion_counts(upsampled.argmax(dim=1), labels, logits.shape[1], ignore_index)


def per_image_scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Dice, IoU), each float64 [N, K], of confusion ``counts`` [N, K, 3]; NaN where the image's ground truth has no
    pixel of the class."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    present = (tp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(present, tp / (tp + fp + fn), np.nan)
    return dice, iou


def _metric_values(dice: np.ndarray, iou: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Per class and macro (foreground classes) from per-image scores; a class no image has is left out."""
    metrics: dict[str, float] = {}
    per_class: dict[str, list[float]] = {"dice": [], "iou": []}
    for kind, scores in (("dice", dice), ("iou", iou)):
        defined = ~np.isnan(scores)
        for index, name in enumerate(class_names):
            if defined[:, index].any():
                value = float(scores[defined[:, index], index].mean())
                metrics[f"{kind}_{name}"] = value
                if index > 0:
                    per_class[kind].append(value)
        if per_class[kind]:
            metrics[f"{kind}_macro"] = float(np.mean(per_class[kind]))
    return metrics


def segmentation_metrics(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``dice_<class>``, ``iou_<class>`` (every class, background included) and ``dice_macro``, ``iou_macro`` (the
    foreground classes) of confusion ``counts`` [N, K, 3]."""
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[1:] != (len(class_names), len(COUNTS)):
        raise ValueError(f"counts must be [images, {len(class_names)} classes, 3]; got {counts.shape}")
    return _metric_values(*per_image_scores(counts), class_names)


def segmentation_metrics_with_ci(
    counts: np.ndarray,
    groups: Sequence[Any],
    class_names: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``segmentation_metrics`` plus ``<metric>_ci95_low`` / ``_ci95_high`` from a patient bootstrap (``groups``: a
    patient id per image; the resamples are ``bootstrap.patient_resamples``' with ``seed``), then the numbers of images
    and patients."""
    counts = np.asarray(counts)
    metrics: dict[str, Any] = segmentation_metrics(counts, class_names)
    ids = [str(g) for g in groups]
    if len(ids) != len(counts):
        raise ValueError(f"groups: {len(ids)} patient ids for {len(counts)} images")
    if n_resamples > 0 and len(ids):
        dice, iou = per_image_scores(counts)
        samples: dict[str, list[float]] = {}
        for rows in patient_resamples(patient_members(ids), n_resamples, np.random.default_rng(seed)):
            for key, value in _metric_values(dice[rows], iou[rows], class_names).items():
                samples.setdefault(key, []).append(value)  # only where defined in this resample
        for key, values in samples.items():
            interval = percentile_interval(values, n_resamples, confidence)
            if interval is not None and key in metrics:
                metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"] = interval
    metrics["images"] = len(ids)
    metrics["patients"] = len(set(ids))
    return metrics


def build_segmentation_compute_metrics(class_names: Sequence[str]) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for a Trainer whose ``preprocess_logits_for_metrics`` is ``logits_to_counts``: keys become
    ``eval_dice_<class>``, ``eval_dice_macro``, ``eval_iou_macro``, ..."""
    names = tuple(class_names)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        counts = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return segmentation_metrics(counts, names)

    return compute_metrics


def format_segmentation_table(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """Dice and IoU per class and macro, with their CIs, as a text table for the log."""

    def cell(key: str) -> str:
        return value_with_ci(metrics, key)

    lines = [f"{'class':<22} {'dice':<24} {'iou':<24}"]
    for name in (*class_names, "macro"):
        lines.append(f"{name[:22]:<22} {cell(f'dice_{name}'):<24} {cell(f'iou_{name}'):<24}")
    lines.append(
        f"({metrics.get('images', '?')} images, {metrics.get('patients', '?')} patients; per-image scores averaged "
        "over the images that have the class; macro without the background; 95% CIs from a patient-level bootstrap)"
    )
    return "\n".join(lines)
