"""Finding labels: NIH-style ``Finding Labels`` strings to label sets, multi-hot vectors and class weights.

Multi-label (``A|B``, ``No Finding`` = all negative) and single-label multi-class (one name per image) share the same
parsing; ``LabelSpec`` fixes the label order that the model's ``id2label`` will carry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NO_FINDING = "No Finding"
SEPARATOR = "|"
MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"


class LabelError(ValueError):
    """Labels that cannot define a classification problem."""


def parse_finding_labels(text: str | None, negative: str = NO_FINDING, separator: str = SEPARATOR) -> list[str]:
    """``"Effusion|Nodule"`` -> ``["Effusion", "Nodule"]``; ``"No Finding"`` and blanks -> ``[]``."""
    if text is None:
        return []
    names = [part.strip() for part in str(text).split(separator)]
    return [name for name in names if name and name != negative]


@dataclass(frozen=True)
class LabelSpec:
    names: tuple[str, ...]
    problem_type: str  # MULTI_LABEL or SINGLE_LABEL

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @property
    def multi_label(self) -> bool:
        return self.problem_type == MULTI_LABEL


def infer_label_spec(
    finding_labels: Iterable[str | None],
    label_names: Sequence[str] | None = None,
    problem_type: str = "auto",
) -> LabelSpec:
    """The label set from the data (sorted) or from ``label_names`` (checked against the data).

    ``problem_type`` ``auto`` means multi-label when any image has several findings or a ``No Finding`` row exists,
    single-label otherwise (then ``No Finding`` cannot occur: every image has exactly one class).
    """
    values = list(finding_labels)
    parsed = [parse_finding_labels(v) for v in values]
    seen = Counter(name for names in parsed for name in names)
    if problem_type == "auto":
        multi = any(len(p) != 1 for p in parsed)
        problem_type = MULTI_LABEL if multi else SINGLE_LABEL
    elif problem_type in ("multi_label", MULTI_LABEL):
        problem_type = MULTI_LABEL
    elif problem_type in ("single_label", "multi_class", SINGLE_LABEL):
        problem_type = SINGLE_LABEL
    else:
        raise LabelError(f"--problem_type must be auto, multi_label or single_label, got '{problem_type}'")
    if label_names:
        unknown = [name for name in label_names if name not in seen]
        if unknown:
            known = ", ".join(sorted(seen)) or "none"
            raise LabelError(f"--label_names: {', '.join(unknown)} not found in the labels (labels present: {known})")
        names = tuple(label_names)
    else:
        names = tuple(sorted(seen))
    if problem_type == SINGLE_LABEL:
        if len(names) < 2:
            raise LabelError(
                f"single-label classification needs at least 2 classes, the labels hold {len(names)} "
                f"({', '.join(names) or 'none'})"
            )
        several = sum(1 for p in parsed if len(p) > 1)
        if several:
            raise LabelError(f"{several} image(s) carry several labels: use --problem_type multi_label")
    elif not names:
        raise LabelError(f"no positive findings in the labels (every image is '{NO_FINDING}'): nothing to learn")
    return LabelSpec(names, problem_type)


def encode_labels(finding_labels: Iterable[str | None], spec: LabelSpec) -> list:
    """Multi-label: float multi-hot lists (labels outside ``spec`` are ignored). Single-label: class indices; an image
    whose label is not one of the classes is an error."""
    index = spec.label2id
    encoded: list = []
    for text in finding_labels:
        names = parse_finding_labels(text)
        if spec.multi_label:
            row = [0.0] * len(spec.names)
            for name in names:
                if name in index:
                    row[index[name]] = 1.0
            encoded.append(row)
        else:
            if len(names) != 1 or names[0] not in index:
                raise LabelError(f"label '{text}' is not one of the classes {', '.join(spec.names)}")
            encoded.append(index[names[0]])
    return encoded


def label_matrix(encoded: Sequence, spec: LabelSpec) -> np.ndarray:
    """[N, C] 0/1 matrix for either problem type (one-hot for single-label)."""
    if spec.multi_label:
        return np.asarray(encoded, dtype=np.float32).reshape(-1, len(spec.names))
    matrix = np.zeros((len(encoded), len(spec.names)), dtype=np.float32)
    matrix[np.arange(len(encoded)), np.asarray(encoded, dtype=int)] = 1.0
    return matrix


def positive_weights(matrix: np.ndarray, max_weight: float = 100.0) -> np.ndarray:
    """BCE ``pos_weight`` = negatives / positives per class (the training-set imbalance), capped; 1 when absent."""
    positives = matrix.sum(axis=0)
    negatives = matrix.shape[0] - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return np.clip(weights, 1.0 / max_weight, max_weight).astype(np.float32)
