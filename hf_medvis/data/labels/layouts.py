"""Labels-file layouts, read into one meaning: every image gets the canonical ``Image Index``, ``Patient ID`` and
``Finding Labels`` that split, prepare, both recipes and evaluate understand.

- ``nih`` (ChestX-ray14): an image column, a patient column, ``|``-joined findings, ``No Finding`` the negative.
- ``wide`` (CheXpert, MIMIC-CXR-JPG, Google's adjudicated NIH labels, most in-house exports): one column per class
  holding 1 / 0 / -1 (uncertain) / blank, or YES / NO, true / false, positive / negative. ``uncertain`` decides what -1
  means (CheXpert's U-Ignore / U-Zeros / U-Ones), ``blank`` what an empty cell means (a negative, as CheXpert's
  authors read "not mentioned", or unknown). Unknown labels are written ``?Name`` in the canonical text: they are
  masked out of the loss and out of each class's metrics, never counted as negatives.
- ``list`` (PadChest): the label column holds a list of finding names as Python or JSON list text.
- ``long`` (VinDr-CXR): one row per finding, per box or per reader of an image; with ``reader_col``, a finding counts
  when more than half of the image's readers name it (``readers="majority"``) or when any does (``"any"``).
- ``auto``: ``list`` when the label column holds list text, ``long`` when it names an image on several rows, ``nih``
  otherwise; ``wide`` when the file has no label column.

Every layout: ``duplicates="merge"`` reads several rows of one image as one (a class is positive when any row says so:
RSNA's one row per box); ``negative_label`` is the finding that means "none of the classes". Finding names are
stripped, inner spaces collapsed and compared case-insensitively (the file's first spelling is kept).

The patient comes from a column, or from the image path with ``patient_regex`` (first group), e.g. CheXpert's
``.../patient00001/study1/view1_frontal.jpg`` with ``patient(\\d+)``.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LAYOUTS = ("nih", "wide", "list", "long", "auto")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "ignore")
READER_POLICIES = ("majority", "any")
DUPLICATE_POLICIES = ("error", "merge")
UNKNOWN_PREFIX = "?"
# Canonical columns (the NIH names): what every reader of a LabelsTable row uses.
IMAGE_COL, PATIENT_COL, LABEL_COL = "Image Index", "Patient ID", "Finding Labels"
NO_FINDING = "No Finding"
VIEW_COL = "View Position"
VIEW_ALIASES = ("AP/PA", "ViewPosition")  # CheXpert, MIMIC-CXR metadata
# More distinct findings than any chest X-ray label set has (PadChest: 194): a column read with the wrong layout.
MAX_FINDINGS = 1000
# A wide cell, lower-cased: its label (None: blank).
_CELL_VALUES = {
    **{text: 1 for text in ("1", "1.0", "yes", "true", "positive")},
    **{text: 0 for text in ("0", "0.0", "no", "false", "negative")},
    **{"-1": -1, "-1.0": -1, "": None},
}


class LabelFormatError(ValueError):
    """A labels file that does not fit the layout it is read with; the message names the file, row and column."""


@dataclass(frozen=True)
class LabelsFormat:
    layout: str = "nih"
    image_col: str | None = None  # default: "Image Index" ("Path" for a wide file that has one)
    group_col: str | None = None  # default: "Patient ID"
    label_col: str = LABEL_COL  # nih, list, long
    patient_regex: str | None = None
    label_names: tuple[str, ...] = ()  # wide: the class columns (default: every column of label values)
    uncertain: str = "ignore"
    blank: str = "negative"
    reader_col: str | None = None  # long: the reader of each row
    readers: str = "majority"
    duplicates: str = "error"
    negative_label: str = NO_FINDING

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("labels format", self.layout, LAYOUTS),
            ("uncertain", self.uncertain, UNCERTAIN_POLICIES),
            ("blank", self.blank, BLANK_POLICIES),
            ("readers", self.readers, READER_POLICIES),
            ("duplicates", self.duplicates, DUPLICATE_POLICIES),
        ):
            if value not in allowed:
                raise LabelFormatError(f"--{name.replace(' ', '-')} must be one of {', '.join(allowed)}, got '{value}'")
        if self.reader_col and self.layout not in ("long", "auto"):
            raise LabelFormatError(f"--reader-col applies to --labels-format long, not {self.layout}")
        if not self.negative_label.strip():
            raise LabelFormatError("--negative-label must name a finding, got an empty value")
        if self.patient_regex is not None:
            try:
                compiled = re.compile(self.patient_regex)
            except re.error as err:
                raise LabelFormatError(
                    f"--patient-regex '{self.patient_regex}' is not a regular expression: {err}"
                ) from None
            if compiled.groups < 1:
                raise LabelFormatError(f"--patient-regex '{self.patient_regex}' needs a group: e.g. 'patient(\\d+)'")

    def resolve(self, columns: Sequence[str], rows: Sequence[dict[str, str]] = ()) -> str:
        """The layout of a file with these columns and rows (``auto`` looks at the label column's values)."""
        if self.layout != "auto":
            return self.layout
        if self.label_col not in columns:
            return "wide"
        values = [row[self.label_col] for row in rows[:2000] if row.get(self.label_col)]
        if values and sum(value.startswith("[") for value in values) * 2 > len(values):
            return "list"
        image_col = self.image_column("nih", columns)
        seen: set[str] = set()
        for row in rows:
            image = row.get(image_col, "")
            if image in seen:
                return "long"
            seen.add(image)
        return "nih"

    def image_column(self, layout: str, columns: Sequence[str]) -> str:
        if self.image_col:
            return self.image_col
        return "Path" if layout == "wide" and "Path" in columns and IMAGE_COL not in columns else IMAGE_COL

    def group_column(self) -> str:
        return self.group_col or PATIENT_COL

    def groups_rows(self, layout: str) -> bool:
        """Whether several rows of one image are read as one (else they are an error)."""
        return layout == "long" or self.duplicates == "merge"


def finding_key(name: str) -> str:
    """The form in which finding names are compared: stripped, inner spaces collapsed, case folded."""
    return " ".join(name.split()).casefold()


class FindingNames:
    """The finding names of one file: stripped, inner spaces collapsed, compared case-insensitively, each spelled as the
    file first spelled it. ``name(raw)`` is that spelling, ``None`` for the negative, ``""`` for an empty name."""

    def __init__(self, negative_label: str) -> None:
        self.negative = finding_key(negative_label)
        self.spellings: dict[str, str] = {}

    def name(self, raw: str) -> str | None:
        key = finding_key(raw)
        if key == self.negative:
            return None
        return self.spellings.setdefault(key, " ".join(raw.split())) if key else ""


# One image's labels while a file is read: (positives, unknown), or None when the row says nothing (unlabelled).
RowLabels = tuple[tuple[str, ...], tuple[str, ...]] | None
_NEGATIVE: RowLabels = ((), ())


def _names_labels(items: Sequence[str], names: FindingNames) -> RowLabels:
    """Labels from finding names (``?Name``: unknown); None when no name is given at all."""
    positives: list[str] = []
    unknown: list[str] = []
    given = False
    for item in items:
        target = unknown if item.lstrip().startswith(UNKNOWN_PREFIX) else positives
        name = names.name(item.lstrip()[1:] if target is unknown else item)
        given = given or name != ""
        if name and name not in target:
            target.append(name)
    return (tuple(positives), tuple(unknown)) if given else None


def _list_items(text: str, where: str) -> list[str]:
    """PadChest's ``['pleural effusion', 'nodule']`` (Python list text) or its JSON spelling, as names."""
    items: Any = None
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise LabelFormatError(f"{where}: '{shown}' is not a list of finding names such as ['nodule', 'effusion']")
    return items


def _wide_labels(row: dict[str, str], classes: Sequence[str], fmt: LabelsFormat, where: str) -> RowLabels:
    positives, unknown = [], []
    for column in classes:
        raw = row.get(column, "")
        value = _CELL_VALUES.get(raw.lower(), "bad")
        if value == "bad":
            raise LabelFormatError(
                f"{where}, column '{column}': '{raw}' is not 1, 0, -1, blank, YES/NO, true/false or positive/negative"
            )
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
    return tuple(positives), tuple(unknown)


def merge_labels(labels: Sequence[RowLabels], readers: Sequence[str] | None = None, policy: str = "any") -> RowLabels:
    """One image's labels from several rows: a finding is positive when any row names it or, with ``readers``, when
    more than half of the image's readers do (``policy="majority"``); a label is unknown only when no row knows it."""
    known = [(label, reader) for label, reader in zip(labels, readers or [""] * len(labels), strict=True) if label]
    if not known:
        return None
    if readers is None or policy == "any":
        positives = tuple(dict.fromkeys(name for (pos, _), _r in known for name in pos))
    else:
        votes: dict[str, set[str]] = {}
        for (pos, _), reader in known:
            for name in pos:
                votes.setdefault(name, set()).add(reader)
        voters = len({reader for _, reader in known})
        positives = tuple(name for name, named_by in votes.items() if 2 * len(named_by) > voters)
    unknown = set.intersection(*(set(unk) for (_, unk), _r in known)) - set(positives)
    return positives, tuple(name for name in known[0][0][1] if name in unknown)


def label_text(labels: RowLabels) -> str:
    """The canonical ``Finding Labels`` text: ``A|?B`` (``?``: unknown), ``No Finding``, or empty (unlabelled)."""
    if labels is None:
        return ""
    positives, unknown = labels
    return "|".join([*positives, *(UNKNOWN_PREFIX + name for name in unknown)]) or NO_FINDING


def _label_like(rows: Sequence[dict[str, str]], column: str) -> bool:
    return any(row.get(column) for row in rows) and all(row.get(column, "").lower() in _CELL_VALUES for row in rows)


def wide_label_columns(
    columns: Sequence[str], rows: Sequence[dict[str, str]], fmt: LabelsFormat, name: str
) -> list[str]:
    """The class columns of a wide file: ``fmt.label_names``, or every column whose values are all label values
    (``No Finding``, the negative, is not a class)."""
    if fmt.label_names:
        missing = [c for c in fmt.label_names if c not in columns]
        if missing:
            raise LabelFormatError(f"{name} has no column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
        return list(fmt.label_names)
    found = [c for c in columns if c != NO_FINDING and c != fmt.negative_label and _label_like(rows, c)]
    if not found:
        raise LabelFormatError(
            f"{name}: no column holds only 1 / 0 / -1 / blank (or YES / NO) values, so no class column was found "
            "(--labels-format wide needs one column per class; pass --label-names)"
        )
    return found


def image_labels(
    columns: Sequence[str],
    rows: Sequence[dict[str, str]],
    images: Sequence[Sequence[int]],
    lines: Sequence[int],
    fmt: LabelsFormat,
    layout: str,
    name: str,
) -> tuple[list[str], list[str]]:
    """The canonical ``Finding Labels`` text of each image (``images``: its rows' indices, ``lines``: each row's line
    in the file) and a wide file's class columns ([] otherwise). ``LabelFormatError`` names the file, line and value
    that do not fit, or the likely layout flag when the label column holds more than ``MAX_FINDINGS`` findings."""
    classes = wide_label_columns(columns, rows, fmt, name) if layout == "wide" else []
    names = FindingNames(fmt.negative_label)
    parsed: dict[str, RowLabels] = {}  # nih / list: one parse per distinct cell text

    def row_labels(index: int) -> RowLabels:
        row = rows[index]
        if layout == "wide":
            return _wide_labels(row, classes, fmt, f"{name} line {lines[index]}")
        text = row.get(fmt.label_col, "")
        if not text:
            return None
        if layout == "long":
            finding = names.name(text)
            return ((finding,), ()) if finding else (_NEGATIVE if finding is None else None)
        if text not in parsed:
            where = f"{name} line {lines[index]}, column '{fmt.label_col}'"
            items = _list_items(text, where) if layout == "list" else text.split("|")
            parsed[text] = _names_labels(items, names)
        return parsed[text]

    texts = []
    for members in images:
        if len(members) == 1:
            labels = row_labels(members[0])
        else:
            readers = [rows[i].get(fmt.reader_col, "") for i in members] if fmt.reader_col else None
            labels = merge_labels([row_labels(i) for i in members], readers, fmt.readers)
        texts.append(label_text(labels))
    if len(names.spellings) > MAX_FINDINGS:
        raise LabelFormatError(_too_many_findings(names, fmt, layout, name))
    return texts, classes


def _too_many_findings(names: FindingNames, fmt: LabelsFormat, layout: str, name: str) -> str:
    example = next(iter(names.spellings.values()))
    shown = example if len(example) <= 60 else example[:57] + "..."
    if layout != "list" and example.startswith("["):
        hint = "it holds list text: pass --labels-format list"
    elif layout == "nih":
        hint = (
            "is it the findings column (--label-column-name)? One row per finding or per reader: "
            "--labels-format long; one column per class: --labels-format wide"
        )
    else:
        hint = "is it the findings column (--label-column-name)?"
    return (
        f"{name}: column '{fmt.label_col}' holds {len(names.spellings):,} distinct findings (more than "
        f"{MAX_FINDINGS:,}; e.g. '{shown}') read as --labels-format {layout}: {hint}"
    )


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
                       "one column per class, 1/0/-1/blank or YES/NO), list (PadChest: list text), long (VinDr: one "
                       "row per finding, box or reader) or auto")  # fmt: skip
    group.add_argument("--image-column-name", default=None, help="image column (default 'Image Index'; wide: 'Path')")
    group.add_argument("--group-column-name", default=None, help="patient column (default 'Patient ID')")
    group.add_argument("--label-column-name", default=None, help="nih, list, long: the findings column (default "
                       "'Finding Labels'); an empty cell is unlabelled")  # fmt: skip
    for old in (*DEPRECATED_COLUMN_FLAGS.values(), "label_col"):  # accepted, not advertised
        group.add_argument(f"--{old.replace('_', '-')}", dest=old, default=None, help=argparse.SUPPRESS)
    group.add_argument("--patient-regex", default=None, help="patient from the image path instead: first group, "
                       "e.g. 'patient(\\d+)'")  # fmt: skip
    group.add_argument("--uncertain", default="ignore", choices=UNCERTAIN_POLICIES,
                       help="wide: what -1 means (ignore: masked out of loss and metrics; default)")  # fmt: skip
    group.add_argument("--blank", default="negative", choices=BLANK_POLICIES,
                       help="wide: what an empty cell means (default negative)")  # fmt: skip
    group.add_argument("--reader-col", default=None, help="long: the reader of each row (VinDr: rad_id)")
    group.add_argument("--readers", default="majority", choices=READER_POLICIES, help="long, with --reader-col: a "
                       "finding counts when more than half of the image's readers name it (default), or any")  # fmt: skip
    group.add_argument("--duplicates", default="error", choices=DUPLICATE_POLICIES, help="several rows of one image: "
                       "an error (default), or merged: a class is positive when any row says so (RSNA)")  # fmt: skip
    group.add_argument("--negative-label", default=NO_FINDING, help="the finding that means none of the classes "
                       f"(default '{NO_FINDING}'; PadChest: normal), compared case-insensitively")  # fmt: skip
    if label_names:
        group.add_argument("--label-names", nargs="+", default=None, help="wide: the class columns (default: every "
                           "column of label values); evaluate, nih: the classes to score (default: every finding in "
                           "the file)")  # fmt: skip


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
        reader_col=args.reader_col,
        readers=args.readers,
        duplicates=args.duplicates,
        negative_label=args.negative_label,
    )
