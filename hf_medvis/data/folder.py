"""Raw image folders: list files (local folder, glob, or fsspec URL), attach NIH-style labels, and build a
``datasets.Dataset`` whose rows decode lazily. For small data; large sets go through prepared shards."""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


class DataSourceError(ValueError):
    """A data location that cannot be used (missing, empty, unreadable labels)."""


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def list_image_files(source: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Sorted image paths under a local folder (recursive), a glob, or an fsspec URL (folder or glob)."""
    text = os.fspath(source)
    if "://" in text:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(text, storage_options=storage_options or {})
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if _has_glob(text):
            found = fs.glob(paths[0])
        elif fs.isdir(paths[0]):
            found = fs.find(paths[0])
        elif fs.exists(paths[0]):
            found = [paths[0]]
        else:
            raise DataSourceError(f"data location does not exist: {text.split('?', 1)[0]}")
        files = [f"{protocol}://{p}" for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        path = Path(text).expanduser()
        if _has_glob(text):
            files = [p for p in glob.glob(str(path), recursive=True) if p.lower().endswith(IMAGE_EXTENSIONS)]
        elif path.is_dir():
            files = [str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
        elif path.is_file():
            files = [str(path)]
        else:
            raise DataSourceError(f"data location does not exist: {text}")
    if not files:
        raise DataSourceError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {text.split('?', 1)[0]}")
    return sorted(files)


def iter_image_files(source: str | os.PathLike, storage_options: dict | None = None) -> Iterator[str]:
    """Image paths under a folder (recursive), a glob, or an fsspec URL, in a deterministic order, streamed.

    Unlike ``list_image_files`` this never holds the whole listing: folders are walked one at a time (names sorted
    within each), so millions of files cost memory for one folder's names only.
    """
    import fnmatch

    text = os.fspath(source)
    pattern = None
    if _has_glob(text):
        head = text.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        root, pattern = head.rsplit("/", 1)[0] if "/" in head else ".", text
    else:
        root = text
    if "://" in text:
        import fsspec

        fs, _, (path,) = fsspec.get_fs_token_paths(root, storage_options=storage_options or {})
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if not fs.exists(path):
            raise DataSourceError(f"data location does not exist: {root.split('?', 1)[0]}")
        if fs.isfile(path):
            yield f"{protocol}://{path}"
            return
        full_pattern = pattern.split("://", 1)[1] if pattern else None
        for folder, dirs, files in fs.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = f"{folder.rstrip('/')}/{name}"
                if name.lower().endswith(IMAGE_EXTENSIONS) and (full_pattern is None or fnmatch.fnmatch(full, full_pattern)):
                    yield f"{protocol}://{full}"
        return
    base = Path(root).expanduser()
    if base.is_file():
        yield str(base)
        return
    if not base.is_dir():
        raise DataSourceError(f"data location does not exist: {text}")
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and (pattern is None or fnmatch.fnmatch(full, pattern)):
                yield full


def find_labels_file(source: str | os.PathLike) -> Path | None:
    """A ``labels.csv`` in a local data folder or its parent (the phantom layout), else None."""
    text = os.fspath(source)
    if "://" in text or _has_glob(text):
        return None
    path = Path(text).expanduser()
    for folder in (path, path.parent) if path.is_dir() else (path.parent,):
        candidate = folder / "labels.csv"
        if candidate.is_file():
            return candidate
    return None


def read_labels_csv(
    path: str | os.PathLike, image_col: str = "Image Index", required: Iterable[str] = ()
) -> dict[str, dict[str, str]]:
    """Rows of an NIH-style labels CSV keyed by image file name (and by stem, so ``.dcm`` files match too)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column in (image_col, *required):
            if column not in columns:
                raise DataSourceError(f"labels file {path} has no column '{column}' (columns: {', '.join(columns)})")
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            name = row[image_col].strip()
            rows[name] = row
            rows.setdefault(Path(name).stem, row)
    return rows


def group_key_hash(value: str, salt: str = "") -> str:
    """A salted, truncated SHA-256 of a patient id: stable for grouping, useless for re-identification."""
    return hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:16]


def in_holdout(group_hash: str, holdout_percentage: float) -> bool:
    """Deterministic group-level holdout: the same patient always lands on the same side."""
    return int(group_hash[:8], 16) % 10000 < holdout_percentage * 100


def build_folder_records(
    source: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    group_col: str = "Patient ID",
    label_col: str = "Finding Labels",
) -> dict[str, list[Any]]:
    """Columns ``path``, ``group`` (hashed patient id, or the file stem when unknown) and ``finding_labels``."""
    files = list_image_files(source, storage_options)
    labels_path = labels_file or find_labels_file(source)
    rows = read_labels_csv(labels_path) if labels_path else {}
    records: dict[str, list[Any]] = {"path": [], "key": [], "group": [], "finding_labels": []}
    for file in files:
        name = file.rsplit("/", 1)[-1]
        row = rows.get(name) or rows.get(Path(name).stem)
        group = row.get(group_col) if row else None
        records["path"].append(file)
        records["key"].append(Path(name).stem)
        records["group"].append(group_key_hash(group if group else Path(name).stem))
        records["finding_labels"].append(row.get(label_col) if row else None)
    return records


def dataset_from_records(
    records: dict[str, list[Any]], image_transform: Callable | None = None, storage_options: dict | None = None
):
    """A ``datasets.Dataset`` of file references; with ``image_transform`` rows decode on access (``pixel_values``)."""
    import datasets

    dataset = datasets.Dataset.from_dict(records)
    if image_transform is not None:
        dataset = dataset.with_transform(make_decode_transform(image_transform, storage_options))
    return dataset


def build_folder_dataset(
    source: str | os.PathLike,
    image_transform: Callable | None = None,
    labels_file: str | os.PathLike | None = None,
    storage_options: dict | None = None,
):
    """Every image under ``source`` as a ``datasets.Dataset`` (see ``dataset_from_records``)."""
    records = build_folder_records(source, labels_file, storage_options)
    return dataset_from_records(records, image_transform, storage_options)


def make_decode_transform(image_transform: Callable, storage_options: dict | None = None) -> Callable:
    """A batched ``datasets`` transform: read_image -> uint8 [1, H, W] -> ``image_transform`` -> ``pixel_values``."""
    from .decode import read_image
    from .transforms import apply_image_transform, to_uint8_tensor

    def transform(batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        # Bytes go through fsspec/adlfs with our storage options: datasets' own Image feature loses them for az://.
        batch["pixel_values"] = [
            apply_image_transform(image_transform, to_uint8_tensor(read_image(path, storage_options=storage_options)), key)
            for path, key in zip(batch["path"], batch["key"], strict=True)
        ]
        return batch

    return transform


def only_listed_images(records: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Keeps the images that have a row in the labels file: an explicit labels file lists the images of one split."""
    keep = [i for i, labels in enumerate(records["finding_labels"]) if labels is not None]
    if not keep:
        raise DataSourceError("none of the images has a row in the labels file (check --labels_file)")
    if len(keep) < len(records["path"]):
        logger.info("using the %d of %d images listed in the labels file", len(keep), len(records["path"]))
    return {key: [values[i] for i in keep] for key, values in records.items()}
