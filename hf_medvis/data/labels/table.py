"""Labels files: a labels CSV read once into a ``LabelsTable`` (canonical columns, normalised patient ids), and the
match of its rows to image files (image extensions, sample keys)."""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .findings import LabelError, is_labelled
from .layouts import IMAGE_COL, LABEL_COL, NO_FINDING, PATIENT_COL, LabelsFormat, canonicalize

logger = logging.getLogger(__name__)

# The file name endings of the image formats we read (case aside): the one list of them. ``folder.py`` lists files by
# them; a sample key drops them, and only them: a DICOM file named by its SOP Instance UID (``1.2.840.10008.41``, with
# or without ``.dcm``) keeps every component of the UID.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")

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
    canonical ``Image Index``, ``Patient ID`` and ``Finding Labels`` of its layout (``layouts``).

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
            hint = " (or pass --group-column-name / --patient-regex)" if column == PATIENT_COL else ""
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
