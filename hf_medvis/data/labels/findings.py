"""Finding labels: NIH-style ``Finding Labels`` strings to label sets, multi-hot vectors and class weights.

Multi-label (``A|B``, ``No Finding`` = all negative) and single-label multi-class (one name per image) share the same
parsing; ``LabelSpec`` fixes the label order that the model's ``id2label`` will carry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .layouts import NO_FINDING, UNKNOWN_PREFIX

SEPARATOR = "|"
MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"


class LabelError(ValueError):
    """Labels that cannot define a classification problem."""


def is_labelled(text: str | None) -> bool:
    """One meaning everywhere (split, prepare, recipes, evaluate): an empty ``Finding Labels`` cell is *unlabelled*
    (the image is not used where labels are needed, and not counted as a negative); ``No Finding`` is the negative."""
    return text is not None and bool(str(text).strip())


def parse_finding_labels(text: str | None, negative: str = NO_FINDING, separator: str = SEPARATOR) -> list[str]:
    """``"Effusion|Nodule"`` -> ``["Effusion", "Nodule"]``; ``"No Finding"`` -> ``[]`` (callers skip blanks:
    ``is_labelled``)."""
    if text is None:
        return []
    names = [part.strip() for part in str(text).split(separator)]
    return [name for name in names if name and name != negative and not name.startswith(UNKNOWN_PREFIX)]


def parse_unknown_labels(text: str | None, separator: str = SEPARATOR) -> list[str]:
    """The classes whose label is unknown (``?Name``: uncertain or blank under an ``ignore`` policy)."""
    if text is None:
        return []
    names = [part.strip() for part in str(text).split(separator)]
    return [name[len(UNKNOWN_PREFIX) :] for name in names if name.startswith(UNKNOWN_PREFIX)]


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
    """Multi-label: float multi-hot lists, -1 where the label is unknown (masked in the loss and the metrics; labels
    outside ``spec`` are ignored). Single-label: class indices; an image whose label is not one of the classes is an
    error."""
    index = spec.label2id
    encoded: list = []
    finding_labels = list(finding_labels)
    if not spec.multi_label:
        _check_single_label_known(finding_labels)
    for text in finding_labels:
        names = parse_finding_labels(text)
        if spec.multi_label:
            row = [0.0] * len(spec.names)
            for name in names:
                if name in index:
                    row[index[name]] = 1.0
            for name in parse_unknown_labels(text):
                if name in index:
                    row[index[name]] = -1.0
            encoded.append(row)
        else:
            if len(names) != 1 or names[0] not in index:
                raise LabelError(f"label '{text}' is not one of the classes {', '.join(spec.names)}")
            encoded.append(index[names[0]])
    return encoded


def label_array(finding_labels: Sequence[str | None], spec: LabelSpec) -> np.ndarray:
    """[N, C] int8 label matrix (1 positive, 0 negative, -1 unknown; one-hot for single-label) straight from the
    ``Finding Labels`` texts: no Python list per image, so a 160k-image file with 194 classes stays small."""
    if not spec.multi_label:
        return label_matrix(encode_labels(finding_labels, spec), spec).astype(np.int8)
    index = spec.label2id
    matrix = np.zeros((len(finding_labels), len(spec.names)), dtype=np.int8)
    for row, text in enumerate(finding_labels):
        for name in parse_finding_labels(text):
            if name in index:
                matrix[row, index[name]] = 1
        for name in parse_unknown_labels(text):
            if name in index:
                matrix[row, index[name]] = -1
    return matrix


def _check_single_label_known(finding_labels: list[str | None]) -> None:
    """Unknown cells (``?Name``: a wide file's -1, or a blank under ``--blank ignore``) cannot be masked in a
    single-label problem, where each image has exactly one class: one line saying which cells and what to pass."""
    unknown = [text for text in finding_labels if parse_unknown_labels(text)]
    if not unknown:
        return
    classes = Counter(name for text in unknown for name in parse_unknown_labels(text))
    cells = ", ".join(f"{name} ({count})" for name, count in classes.most_common())
    raise LabelError(
        f"{len(unknown)} image(s) have uncertain (-1) or unknown cells, in {cells}, e.g. '{unknown[0]}'; single-label "
        "classification needs exactly one known class per image: pass --uncertain zeros or --uncertain ones (and "
        "--blank negative) to read those cells as 0 or 1, or train with --problem_type multi_label, which leaves them "
        "out of the loss and the metrics"
    )


def check_file_classes(
    spec: LabelSpec, file_classes: Iterable[str], file_name: str, *, every_class_listed: bool
) -> list[str]:
    """Refuses (``LabelError``, one line listing both sets) a labels file whose classes are not the model's ``spec``:
    a class the model does not have, no class in common, or, where the file lists its classes whether present or not
    (``every_class_listed``: a wide file's columns, ``--label-names``), a model class it lacks. A file that names a
    class only where it is present (nih) may lack a rare one in a small test set: returned as notes (no positives:
    its AUROC and AP are undefined)."""
    found = set(file_classes)
    extra = sorted(found - set(spec.names))
    missing = [name for name in spec.names if name not in found]
    if extra or not found & set(spec.names) or (missing and every_class_listed):
        differences = "; ".join(
            f"{what}: {', '.join(names)}" for what, names in (("missing", missing), ("extra", extra)) if names
        )
        hint = (
            f", or pass --label-names {' '.join(spec.names)} to score the model's classes only"
            if extra and not missing
            else ""
        )
        raise LabelError(
            f"{file_name} holds other classes than the model: model {', '.join(spec.names)}; file "
            f"{', '.join(sorted(found)) or 'none'} ({differences}): the class names must match the model's exactly "
            f"(spelling and case){hint}"
        )
    return [f"{file_name} has no positives of {name}: its AUROC and AP are undefined" for name in missing]


def label_matrix(encoded: Sequence, spec: LabelSpec) -> np.ndarray:
    """[N, C] 0/1 matrix for either problem type (one-hot for single-label); -1 marks an unknown label."""
    if spec.multi_label:
        return np.asarray(encoded, dtype=np.float32).reshape(-1, len(spec.names))
    matrix = np.zeros((len(encoded), len(spec.names)), dtype=np.float32)
    matrix[np.arange(len(encoded)), np.asarray(encoded, dtype=int)] = 1.0
    return matrix


def positive_weights(matrix: np.ndarray, max_weight: float = 100.0) -> np.ndarray:
    """BCE ``pos_weight`` = negatives / positives per class (the training-set imbalance, over known labels), capped; 1
    when absent."""
    positives = (matrix == 1).sum(axis=0)
    negatives = (matrix == 0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return np.clip(weights, 1.0 / max_weight, max_weight).astype(np.float32)
