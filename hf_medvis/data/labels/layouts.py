"""Labels-file layouts, read into one meaning: every row gets the canonical ``Image Index``, ``Patient ID`` and
``Finding Labels`` that split, prepare, both recipes and evaluate understand.

- ``nih`` (ChestX-ray14): an image column, a patient column, ``|``-joined findings, ``No Finding`` the negative.
- ``wide`` (CheXpert, MIMIC-CXR-JPG, most in-house exports): one column per class holding 1 / 0 / -1 (uncertain) /
  blank. ``uncertain`` decides what -1 means (CheXpert's U-Ignore / U-Zeros / U-Ones), ``blank`` what an empty cell
  means (a negative, as CheXpert's authors read "not mentioned", or unknown). Unknown labels are written ``?Name`` in
  the canonical text: they are masked out of the loss and out of each class's metrics, never counted as negatives.
- ``auto``: ``nih`` when the file has the NIH label column, else ``wide``.

The patient comes from a column, or from the image path with ``patient_regex`` (first group), e.g. CheXpert's
``.../patient00001/study1/view1_frontal.jpg`` with ``patient(\\d+)``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LAYOUTS = ("nih", "wide", "auto")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "ignore")
UNKNOWN_PREFIX = "?"
# Canonical columns (the NIH names): what every reader of a LabelsTable row uses.
IMAGE_COL, PATIENT_COL, LABEL_COL = "Image Index", "Patient ID", "Finding Labels"
NO_FINDING = "No Finding"
VIEW_COL = "View Position"
VIEW_ALIASES = ("AP/PA", "ViewPosition")  # CheXpert, MIMIC-CXR metadata
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}


class LabelFormatError(ValueError):
    """A labels file that does not fit the layout it is read with; the message names the file, row and column."""


@dataclass(frozen=True)
class LabelsFormat:
    layout: str = "nih"
    image_col: str | None = None  # default: "Image Index" (nih), "Path" (wide)
    group_col: str | None = None  # default: "Patient ID"
    label_col: str = LABEL_COL  # nih only
    patient_regex: str | None = None
    label_names: tuple[str, ...] = ()  # wide: the class columns (default: every column of 1/0/-1/blank values)
    uncertain: str = "ignore"
    blank: str = "negative"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("labels format", self.layout, LAYOUTS),
            ("uncertain", self.uncertain, UNCERTAIN_POLICIES),
            ("blank", self.blank, BLANK_POLICIES),
        ):
            if value not in allowed:
                raise LabelFormatError(f"--{name.replace(' ', '-')} must be one of {', '.join(allowed)}, got '{value}'")
        if self.patient_regex is not None:
            try:
                compiled = re.compile(self.patient_regex)
            except re.error as err:
                raise LabelFormatError(
                    f"--patient-regex '{self.patient_regex}' is not a regular expression: {err}"
                ) from None
            if compiled.groups < 1:
                raise LabelFormatError(f"--patient-regex '{self.patient_regex}' needs a group: e.g. 'patient(\\d+)'")

    def resolve(self, columns: Sequence[str]) -> str:
        if self.layout != "auto":
            return self.layout
        return "nih" if self.label_col in columns else "wide"

    def image_column(self, layout: str, columns: Sequence[str]) -> str:
        if self.image_col:
            return self.image_col
        return "Path" if layout == "wide" and "Path" in columns and IMAGE_COL not in columns else IMAGE_COL

    def group_column(self) -> str:
        return self.group_col or PATIENT_COL


def _label_like(rows: Sequence[dict[str, str]], column: str) -> bool:
    return any(row.get(column) for row in rows) and all(row.get(column, "") in _VALUES for row in rows)


def wide_label_columns(
    columns: Sequence[str], rows: Sequence[dict[str, str]], fmt: LabelsFormat, name: str
) -> list[str]:
    """The class columns of a wide file: ``fmt.label_names``, or every column whose values are all 1/0/-1/blank
    (``No Finding``, the negative, is not a class)."""
    if fmt.label_names:
        missing = [c for c in fmt.label_names if c not in columns]
        if missing:
            raise LabelFormatError(f"{name} has no column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
        return list(fmt.label_names)
    found = [c for c in columns if c != NO_FINDING and _label_like(rows, c)]
    if not found:
        raise LabelFormatError(
            f"{name}: no column holds only 1 / 0 / -1 / blank values, so no class column was found "
            "(--labels-format wide needs one column per class; pass --label-names)"
        )
    return found


def canonicalize(columns: Sequence[str], rows: list[dict[str, str]], fmt: LabelsFormat, name: str) -> list[str]:
    """Adds the canonical columns to ``rows`` in place (the original columns stay as read); returns the class names
    of a wide file ([] for nih). ``LabelFormatError`` names the file, the line and the value that does not fit."""
    layout = fmt.resolve(columns)
    image_col = fmt.image_column(layout, columns)
    group_col = fmt.group_column()
    pattern = re.compile(fmt.patient_regex) if fmt.patient_regex else None
    classes = wide_label_columns(columns, rows, fmt, name) if layout == "wide" else []
    for line, row in enumerate(rows, start=2):
        row[IMAGE_COL] = row.get(image_col, "")
        if pattern is not None:
            match = pattern.search(row[IMAGE_COL])
            if match is None:
                raise LabelFormatError(f"{name} line {line}: --patient-regex finds no patient in '{row[IMAGE_COL]}'")
            row[PATIENT_COL] = match.group(1)
        elif group_col != PATIENT_COL:
            row[PATIENT_COL] = row.get(group_col, "")
        if VIEW_COL not in row:
            view = next((row[alias] for alias in VIEW_ALIASES if row.get(alias)), None)
            if view:
                row[VIEW_COL] = view
        if layout == "nih":
            if fmt.label_col != LABEL_COL and fmt.label_col in row:
                row[LABEL_COL] = row[fmt.label_col]
            continue
        positives, unknown = [], []
        for column in classes:
            raw = row.get(column, "")
            if raw not in _VALUES:
                raise LabelFormatError(f"{name} line {line}, column '{column}': '{raw}' is not 1, 0, -1 or blank")
            value = _VALUES[raw]
            if value == -1:
                value = {"ones": 1, "zeros": 0, "ignore": None}[fmt.uncertain]
                if value is None:
                    unknown.append(column)
                    continue
            elif value is None:
                if fmt.blank == "ignore":
                    unknown.append(column)
                    continue
                value = 0
            if value == 1:
                positives.append(column)
        text = "|".join(positives + [UNKNOWN_PREFIX + c for c in unknown])
        row[LABEL_COL] = text or NO_FINDING
    return classes


# The column flags take transformers' spelling (``--image_column_name``); the older ``--image-col`` / ``--group-col`` /
# ``--label-col`` (``--image_col`` / ``--group_col`` in the recipes) still work, with a warning: new name -> old name.
DEPRECATED_COLUMN_FLAGS = {"image_column_name": "image_col", "group_column_name": "group_col"}


def column_flag(new: str | None, old: str | None, new_flag: str, old_flag: str) -> str | None:
    """The value of a column flag given under its name (``new``) or its deprecated one (``old``): one warning naming
    the new flag when the old one is used, a ``LabelFormatError`` when both are given with different values."""
    if old is None:
        return new
    if new is not None and new != old:
        raise LabelFormatError(f"{old_flag} '{old}' and {new_flag} '{new}' disagree: give {new_flag} only")
    logger.warning("%s is deprecated: use %s", old_flag, new_flag)
    return old


def add_labels_format_arguments(parser: Any, label_names: bool = True) -> None:
    """The labels-file flags shared by ``split``, ``prepare`` and ``evaluate`` (the recipes take the same names with
    underscores)."""
    group = parser.add_argument_group("labels file layout (docs/data_plane.md)")
    group.add_argument("--labels-format", default="nih", choices=LAYOUTS, help="nih (default), wide (CheXpert/MIMIC: "
                       "one column per class, 1/0/-1/blank) or auto")  # fmt: skip
    group.add_argument("--image-column-name", default=None, help="image column (default 'Image Index'; wide: 'Path')")
    group.add_argument("--group-column-name", default=None, help="patient column (default 'Patient ID')")
    for old in DEPRECATED_COLUMN_FLAGS.values():  # accepted, not advertised
        group.add_argument(f"--{old.replace('_', '-')}", dest=old, default=None, help=argparse.SUPPRESS)
    group.add_argument("--patient-regex", default=None, help="patient from the image path instead: first group, "
                       "e.g. 'patient(\\d+)'")  # fmt: skip
    group.add_argument("--uncertain", default="ignore", choices=UNCERTAIN_POLICIES,
                       help="wide: what -1 means (ignore: masked out of loss and metrics; default)")  # fmt: skip
    group.add_argument("--blank", default="negative", choices=BLANK_POLICIES,
                       help="wide: what an empty cell means (default negative)")  # fmt: skip
    if label_names:
        group.add_argument("--label-names", nargs="+", default=None, help="wide: the class columns (default: every "
                           "column of 1/0/-1/blank values); evaluate, nih: the classes to score (default: every "
                           "finding in the file)")  # fmt: skip


def _cli_column(args: Any, new: str, old: str) -> str | None:
    return column_flag(
        getattr(args, new, None), getattr(args, old, None), f"--{new.replace('_', '-')}", f"--{old.replace('_', '-')}"
    )


def labels_format_from_args(args: Any) -> LabelsFormat:
    return LabelsFormat(
        layout=args.labels_format,
        image_col=_cli_column(args, "image_column_name", "image_col"),
        group_col=_cli_column(args, "group_column_name", "group_col"),
        label_col=_cli_column(args, "label_column_name", "label_col") or LABEL_COL,
        patient_regex=args.patient_regex,
        label_names=tuple(getattr(args, "label_names", None) or ()),
        uncertain=args.uncertain,
        blank=args.blank,
    )
