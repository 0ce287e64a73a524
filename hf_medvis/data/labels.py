"""Finding labels: NIH-style ``Finding Labels`` strings to label sets, multi-hot vectors and class weights.

Multi-label (``A|B``, ``No Finding`` = all negative) and single-label multi-class (one name per image) share the same
parsing; ``LabelSpec`` fixes the label order that the model's ``id2label`` will carry.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .label_formats import IMAGE_COL, LABEL_COL, NO_FINDING, PATIENT_COL, UNKNOWN_PREFIX, LabelsFormat, canonicalize

logger = logging.getLogger(__name__)

SEPARATOR = "|"
# The file name endings of the image formats we read (case aside): the one list of them. ``folder.py`` lists files by
# them; a sample key drops them, and only them: a DICOM file named by its SOP Instance UID (``1.2.840.10008.41``, with
# or without ``.dcm``) keeps every component of the UID.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
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


# ---- labels files ----------------------------------------------------------------------------------------------------

_NUMERIC_ID = re.compile(r"^0*(\d+)(?:\.0*)?$")


def normalize_patient_id(value: str | None) -> str:
    """``" 001 "``, ``"1"`` and ``"1.0"`` are one patient (a spreadsheet drops leading zeros and adds ``.0``): numeric
    ids become their integer spelling; any other id is only stripped of surrounding spaces."""
    text = "" if value is None else str(value).strip()
    match = _NUMERIC_ID.match(text)
    return match.group(1) if match else text


_AMBIGUOUS: dict[str, str] = {}


@dataclass
class LabelsTable:
    """The rows of a labels CSV (one row per image), read once with one set of rules for every command, each with the
    canonical ``Image Index``, ``Patient ID`` and ``Finding Labels`` of its layout (``label_formats``).

    Read as UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8") and any line ending; the image column must
    name each image once; patient ids are normalised (``normalize_patient_id``); values are stripped."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    image_col: str = IMAGE_COL
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # a wide file's class columns
    _index: dict[str, dict[str, str]] | None = field(default=None, repr=False)

    def match(self, path: str) -> dict[str, str] | None:
        """The row of an image file, by the longest trailing part of its path (extension aside) that names exactly one
        row: ``images/00000001_000.png`` matches ``00000001_000.png`` (NIH names), ``.../patient00001/study1/
        view1_frontal.jpg`` matches CheXpert's ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``
        (not another patient's ``view1_frontal``), and ``x.dcm`` matches a row for ``x.png``."""
        if self._index is None:
            index: dict[str, dict[str, str]] = {}
            for row in self.rows:
                parts = _key_parts(row[self.image_col])
                for start in range(len(parts)):
                    key = "/".join(parts[start:])
                    index[key] = _AMBIGUOUS if key in index and index[key] is not row else row
            self._index = index
        parts = _key_parts(path)
        for start in range(len(parts)):
            row = self._index.get("/".join(parts[start:]))
            if row is not None:
                return None if row is _AMBIGUOUS else row
        return None


def strip_image_extension(name: str) -> str:
    """``"00000001_000.png"`` -> ``"00000001_000"``; any other ending stays: ``"1.2.840.10008.41"`` is a whole UID,
    ``"scan.v2"`` a whole name."""
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return name


def _key_parts(image: str) -> tuple[str, ...]:
    parts = PurePosixPath(image.replace("\\", "/")).parts
    return (*parts[:-1], strip_image_extension(parts[-1])) if parts else parts


def sample_key(image: str) -> str:
    """The public sample id of a labels row: its image value without an image extension (``IMAGE_EXTENSIONS``; NIH:
    ``00000001_000``; a UID-named DICOM keeps its whole UID)."""
    path = PurePosixPath(image.replace("\\", "/"))
    return str(path.with_name(strip_image_extension(path.name))) if path.name else str(path)


def read_labels_table(
    path: str | os.PathLike,
    *,
    image_col: str = IMAGE_COL,
    required: Iterable[str] = (),
    group_col: str = PATIENT_COL,
    labels_format: LabelsFormat | None = None,
) -> LabelsTable:
    """Reads a labels CSV; ``LabelError`` (one line naming the file, and the rows where it applies) for a missing file or
    column, a file that is not UTF-8, an empty image name, or an image listed more than once. The table is shared by
    the callers of one process (read and warned about once per file version): do not modify it."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"labels file not found: {path}")
    stat = path.stat()
    fmt = labels_format or LabelsFormat(image_col=image_col, group_col=group_col)
    return _read_labels_table(path.resolve(), stat.st_mtime_ns, stat.st_size, tuple(required), fmt)


@functools.lru_cache(maxsize=8)
def _read_labels_table(
    path: Path, _mtime_ns: int, _size: int, required: tuple[str, ...], fmt: LabelsFormat
) -> LabelsTable:
    name = path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelError(
            f"{name} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it as "
            "'CSV UTF-8'"
        ) from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = [column.strip() for column in reader.fieldnames or []]
    reader.fieldnames = columns
    layout = fmt.resolve(columns)
    image_col, group_col = fmt.image_column(layout, columns), fmt.group_column()
    provided = {  # canonical column -> the file's column that gives it (None: the layout derives it)
        IMAGE_COL: image_col,
        PATIENT_COL: None if fmt.patient_regex else group_col,
        LABEL_COL: None if layout == "wide" else fmt.label_col,
    }
    for column in (IMAGE_COL, *required):
        source = provided.get(column, column)
        if source is not None and source not in columns:
            hint = " (or pass --group-col / --patient-regex)" if column == PATIENT_COL else ""
            raise LabelError(f"{name} has no column '{source}'{hint} (columns: {', '.join(columns) or 'none'})")
    rows: list[dict[str, str]] = []
    first_line: dict[str, int] = {}
    duplicates: list[str] = []
    for row in reader:
        line = reader.line_num
        clean = {key: (value or "").strip() for key, value in row.items() if key is not None}
        image = clean.get(image_col, "")
        if not image:
            if not any(clean.values()):
                continue  # a blank line
            raise LabelError(f"{name} line {line}: empty '{image_col}'")
        if image in first_line:
            duplicates.append(f"{image} (lines {first_line[image]} and {line})")
        first_line.setdefault(image, line)
        rows.append(clean)
    if duplicates:
        shown = "; ".join(duplicates[:3]) + (f"; ... ({len(duplicates)} in all)" if len(duplicates) > 3 else "")
        raise LabelError(f"{name}: the same '{image_col}' is listed more than once: {shown}")
    # ``a.png`` and ``a.dcm`` would be one sample (key ``a``, and either file matches either row): refused, not guessed.
    by_key: dict[str, str] = {}
    for image in first_line:
        other = by_key.setdefault(sample_key(image), image)
        if other != image:
            raise LabelError(
                f"{name}: '{other}' (line {first_line[other]}) and '{image}' (line {first_line[image]}) differ only in "
                "the image extension, so they name one sample: keep one row per image"
            )
    try:
        classes = canonicalize(columns, rows, fmt, name)
    except ValueError as err:
        raise LabelError(str(err)) from None
    spellings: dict[str, set[str]] = {}
    for row in rows:
        if row.get(PATIENT_COL):
            raw = row[PATIENT_COL]
            row[PATIENT_COL] = normalize_patient_id(raw)
            if group_col in row and not fmt.patient_regex:
                row[group_col] = row[PATIENT_COL]  # split writes the file's own columns, normalised
            spellings.setdefault(row[PATIENT_COL], set()).add(raw)
    table = LabelsTable(path, columns, rows, IMAGE_COL, classes=classes)
    merged = {pid: forms for pid, forms in spellings.items() if len(forms) > 1}
    if merged:
        example = ", ".join(repr(f) for f in sorted(next(iter(merged.values()))))
        table.warnings.append(
            f"{name}: '{group_col}' written in several ways for {len(merged)} patient(s) (e.g. {example}); read as one "
            "patient each (numeric ids compared as numbers)"
        )
    unlabelled = sum(1 for row in rows if LABEL_COL in row and not is_labelled(row[LABEL_COL]))
    if unlabelled:
        table.warnings.append(
            f"{name}: {unlabelled} row(s) with an empty '{LABEL_COL}' are unlabelled (not negatives: write "
            f"'{NO_FINDING}' for those); they are left out wherever labels are needed"
        )
    for warning in table.warnings:
        logger.warning("%s", warning)
    return table
