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
from .layouts import (
    IMAGE_COL,
    LABEL_COL,
    PATIENT_COL,
    VIEW_ALIASES,
    VIEW_COL,
    LabelsFormat,
    image_labels,
)

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
    """The images of a labels CSV, read once with one set of rules for every command: one row per image with the
    canonical ``Image Index``, ``Patient ID`` and ``Finding Labels`` of its layout (``layouts``), and the file's own
    rows of each image (``input_rows``: one, or several in the long layout or with ``duplicates="merge"``).

    Read as UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8") and any line ending; patient ids are
    normalised (``normalize_patient_id``) in the file's rows too; values are stripped."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    image_col: str = IMAGE_COL
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # a wide file's class columns
    layout: str = "nih"
    input_rows: list[list[dict[str, str]]] = field(default_factory=list)
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
    columns, rows, lines = _read_csv_rows(path)
    layout = fmt.resolve(columns, rows)
    image_col, group_col = fmt.image_column(layout, columns), fmt.group_column()
    label_source = fmt.label_col if layout != "wide" else None
    provided = {  # canonical column -> the file's column that gives it (None: the layout derives it)
        IMAGE_COL: image_col,
        PATIENT_COL: None if fmt.patient_regex else group_col,
        LABEL_COL: label_source,
    }
    for column in (IMAGE_COL, *required, *([fmt.reader_col] if fmt.reader_col else [])):
        source = provided.get(column, column)
        if source is not None and source not in columns:
            hint = " (or pass --group-column-name / --patient-regex)" if column == PATIENT_COL else ""
            raise LabelError(f"{name} has no column '{source}'{hint} (columns: {', '.join(columns) or 'none'})")
    for row, line in zip(rows, lines, strict=True):
        if not row.get(image_col):
            raise LabelError(f"{name} line {line}: empty '{image_col}'")
    images = _rows_by_image(rows, lines, image_col, fmt.groups_rows(layout), name)
    patients, spellings = _patients(rows, images, lines, image_col, group_col, fmt, name)
    try:
        texts, classes = image_labels(columns, rows, images, lines, fmt, layout, name)
    except ValueError as err:
        raise LabelError(str(err)) from None
    # The canonical columns go into a copy where they would overwrite one of the file's own (split writes those).
    overwrites = any(column in columns and source != column for column, source in provided.items())
    out_rows, input_rows = [], []
    for members, patient, text in zip(images, patients, texts, strict=True):
        first = rows[members[0]]
        row = dict(first) if overwrites or len(members) > 1 else first
        row[IMAGE_COL], row[LABEL_COL] = first[image_col], text
        if patient is not None:
            row[PATIENT_COL] = patient
        if VIEW_COL not in row:
            view = next((row[alias] for alias in VIEW_ALIASES if row.get(alias)), None)
            if view:
                row[VIEW_COL] = view
        out_rows.append(row)
        input_rows.append([rows[i] for i in members])
    table = LabelsTable(path, columns, out_rows, IMAGE_COL, classes=classes, layout=layout, input_rows=input_rows)
    merged = {pid: forms for pid, forms in spellings.items() if len(forms) > 1}
    if merged:
        example = ", ".join(repr(f) for f in sorted(next(iter(merged.values()))))
        table.warnings.append(
            f"{name}: '{group_col}' written in several ways for {len(merged)} patient(s) (e.g. {example}); read as one "
            "patient each (numeric ids compared as numbers)"
        )
    unlabelled = sum(1 for text in texts if not is_labelled(text))
    if unlabelled:
        table.warnings.append(
            f"{name}: {unlabelled} image(s) with an empty '{label_source or LABEL_COL}' are unlabelled (not "
            f"negatives: write '{fmt.negative_label}' for those); they are left out wherever labels are needed"
        )
    for warning in table.warnings:
        logger.warning("%s", warning)
    return table


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """The file's columns, its non-blank rows (values stripped) and each row's line number. Streamed: a large file is
    never held twice (as text and as rows)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [column.strip() for column in reader.fieldnames or []]
            reader.fieldnames = columns
            rows: list[dict[str, str]] = []
            lines: list[int] = []
            # One object per distinct short value: most columns repeat a few values ("PA", "CR", "0"), and a
            # PadChest-sized file (160k rows x 34 columns) would otherwise hold 5 million strings.
            shared: dict[str, str] = {}
            for row in reader:
                clean = {
                    key: shared.setdefault(text, text) if len(text := (value or "").strip()) < 48 else text
                    for key, value in row.items()
                    if key is not None
                }
                if any(clean.values()):  # a blank line is skipped
                    rows.append(clean)
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        try:  # the offset in the whole file, for the message
            path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise LabelError(
                f"{path.name} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it "
                "as 'CSV UTF-8'"
            ) from None
        raise
    return columns, rows, lines


def _rows_by_image(
    rows: list[dict[str, str]], lines: list[int], image_col: str, grouped: bool, name: str
) -> list[list[int]]:
    """The row indices of each image, in the file's order; several rows of one image are an error unless the layout
    groups them. Two images whose names differ only in the extension are one sample: refused, not guessed."""
    first: dict[str, list[int]] = {}
    duplicates: list[str] = []
    for index, row in enumerate(rows):
        members = first.setdefault(row[image_col], [])
        if members and not grouped:
            duplicates.append(f"{row[image_col]} (lines {lines[members[0]]} and {lines[index]})")
        members.append(index)
    if duplicates:
        shown = "; ".join(duplicates[:3]) + (f"; ... ({len(duplicates)} in all)" if len(duplicates) > 3 else "")
        raise LabelError(
            f"{name}: the same '{image_col}' is listed more than once: {shown} (one row per finding or per reader: "
            "--labels-format long; one row per box: --duplicates merge)"
        )
    by_key: dict[str, str] = {}
    for image, members in first.items():
        other = by_key.setdefault(sample_key(image), image)
        if other != image:
            raise LabelError(
                f"{name}: '{other}' (line {lines[first[other][0]]}) and '{image}' (line {lines[members[0]]}) differ "
                "only in the image extension, so they name one sample: keep one row per image"
            )
    return list(first.values())


def _patients(
    rows: list[dict[str, str]],
    images: list[list[int]],
    lines: list[int],
    image_col: str,
    group_col: str,
    fmt: LabelsFormat,
    name: str,
) -> tuple[list[str | None], dict[str, set[str]]]:
    """Each image's normalised patient id (None: the file gives none), written back into the file's patient column so
    that split writes it normalised; and the spellings of each id. The rows of one image must name one patient."""
    pattern = re.compile(fmt.patient_regex) if fmt.patient_regex else None
    patients: list[str | None] = []
    spellings: dict[str, set[str]] = {}
    for members in images:
        found: str | None = None
        for index in members:
            row = rows[index]
            if pattern is not None:
                match = pattern.search(row[image_col])
                if match is None:
                    raise LabelError(
                        f"{name} line {lines[index]}: --patient-regex finds no patient in '{row[image_col]}'"
                    )
                raw = match.group(1)
            elif group_col in row:
                raw = row[group_col]
                if group_col != image_col:  # an image column that names the patient too (RSNA) stays as written
                    row[group_col] = normalize_patient_id(raw)
            else:
                continue
            patient = normalize_patient_id(raw)
            if raw:
                spellings.setdefault(patient, set()).add(raw)
            if found is not None and patient != found:
                raise LabelError(
                    f"{name} line {lines[index]}: image '{row[image_col]}' is listed with patients '{found}' and "
                    f"'{patient}': the rows of one image must name one patient"
                )
            found = patient
        patients.append(found)
    return patients, spellings
