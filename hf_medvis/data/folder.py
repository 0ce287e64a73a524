"""Raw image folders: list files (local folder, glob, or fsspec URL), attach NIH-style labels, and build a
``datasets.Dataset`` whose rows decode lazily. For small data; large sets go through prepared shards."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch

from . import storage
from .decode import looks_like_image, read_image
from .label_formats import LabelsFormat
from .labels import IMAGE_COL, LABEL_COL, PATIENT_COL, read_labels_table, sample_key
from .privacy import relative_path, source_root
from .transforms import apply_image_transform, to_uint8_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")


class DataSourceError(ValueError):
    """A data location that cannot be used (missing, empty, unreadable labels)."""


def _walk_files(source: str | os.PathLike, storage_options: dict | None = None) -> Iterator[tuple[str, Any]]:
    """(path or URL, fsspec filesystem or None for local) of every file under a folder (recursive), a glob, or an
    fsspec URL, in a deterministic order, streamed: folders are walked one at a time (names sorted within each), so
    millions of files cost memory for one folder's names only. Local symbolic links are listed, dangling ones too."""
    text = os.fspath(source)
    pattern = None
    if storage.has_glob(text):
        head = text.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        root, pattern = head.rsplit("/", 1)[0] if "/" in head else ".", text
    else:
        root = text
    if "://" in text:
        fs, path = storage.filesystem(root, storage_options)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if not storage.with_retries(lambda: fs.exists(path), f"listing {storage.describe(root)}"):
            raise DataSourceError(f"data location does not exist: {storage.describe(root)}")
        if fs.isfile(path):
            yield f"{protocol}://{path}", fs
            return
        full_pattern = pattern.split("://", 1)[1] if pattern else None
        for folder, dirs, files in fs.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = f"{folder.rstrip('/')}/{name}"
                if full_pattern is None or fnmatch.fnmatch(full, full_pattern):
                    yield f"{protocol}://{full}", fs
        return
    base = Path(root).expanduser()
    if base.is_file():
        yield str(base), None
        return
    if not base.is_dir():
        raise DataSourceError(f"data location does not exist: {text}")
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            if pattern is None or fnmatch.fnmatch(full, pattern):
                yield full, None


def _head(path: str, fs: Any, size: int = 132) -> bytes:
    if fs is None:
        with open(path, "rb") as f:
            return f.read(size)
    return fs.cat_file(path.split("://", 1)[1], start=0, end=size)


def not_an_image_reason(path: str, fs: Any = None) -> str | None:
    """None when ``path`` may be an image: an image extension, or (DICOM files often have none, or a UID for a name)
    a DICOM or PNG/JPEG/TIFF signature in its first bytes. Otherwise why it is skipped. A file that cannot be read
    counts as an image, so that decoding reports the precise failure."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(IMAGE_EXTENSIONS):
        return None
    try:
        head = _head(path, fs)
    except OSError:
        return None
    if looks_like_image(head):
        return None
    return "not an image (no image extension, no DICOM or PNG/JPEG/TIFF signature)"


def iter_image_files(
    source: str | os.PathLike,
    storage_options: dict | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[str]:
    """Image paths under a folder (recursive), a glob, or an fsspec URL, in a deterministic order, streamed (see
    ``_walk_files``). Other files are passed to ``on_skip(path, reason)``."""
    for path, fs in _walk_files(source, storage_options):
        reason = not_an_image_reason(path, fs)
        if reason is None:
            yield path
        elif on_skip is not None:
            on_skip(path, reason)


def list_image_files(source: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
    """Sorted image paths under a local folder (recursive), a glob, or an fsspec URL (folder or glob); the count of
    other files skipped is logged."""
    skipped: list[str] = []
    files = sorted(iter_image_files(source, storage_options, on_skip=lambda path, reason: skipped.append(path)))
    where = os.fspath(source).split("?", 1)[0]
    if skipped:
        logger.info(
            "%s: %d file(s) skipped: not images (no image extension, no DICOM or image signature)", where, len(skipped)
        )
    if not files:
        raise DataSourceError(f"no image files (DICOM, PNG, JPEG, TIFF) found in {where}")
    return files


def find_labels_file(source: str | os.PathLike) -> Path | None:
    """A ``labels.csv`` in a local data folder or its parent (the phantom layout), else None."""
    text = os.fspath(source)
    if "://" in text or storage.has_glob(text):
        return None
    path = Path(text).expanduser()
    for folder in (path, path.parent) if path.is_dir() else (path.parent,):
        candidate = folder / "labels.csv"
        if candidate.is_file():
            return candidate
    return None


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
    labels_format: LabelsFormat | None = None,
) -> dict[str, list[Any]]:
    """Columns ``path``, ``key``, ``group`` (hashed patient id, or the file stem when unknown) and ``finding_labels``
    (canonical text: ``label_formats``). Files are matched to labels rows by the trailing part of their path."""
    files = list_image_files(source, storage_options)
    labels_path = labels_file or find_labels_file(source)
    table = read_labels_table(labels_path, labels_format=labels_format) if labels_path else None
    root = source_root(str(source))
    records: dict[str, list[Any]] = {"path": [], "key": [], "group": [], "finding_labels": []}
    for file in files:
        stem = Path(file.rsplit("/", 1)[-1]).stem
        row = table.match(relative_path(file, root)) if table is not None else None
        group = row.get(PATIENT_COL) if row else None
        records["path"].append(file)
        records["key"].append(sample_key(row[IMAGE_COL]) if row else stem)
        records["group"].append(group_key_hash(group if group else stem))
        records["finding_labels"].append(row.get(LABEL_COL) if row else None)
    return records


def dataset_from_records(
    records: dict[str, list[Any]], image_transform: Callable | None = None, storage_options: dict | None = None
) -> datasets.Dataset:
    """A ``datasets.Dataset`` of file references; with ``image_transform`` rows decode on access (``pixel_values``)."""
    dataset = datasets.Dataset.from_dict(records)
    if image_transform is not None:
        dataset = dataset.with_transform(make_decode_transform(image_transform, storage_options))
    return dataset


def build_folder_dataset(
    source: str | os.PathLike,
    image_transform: Callable | None = None,
    labels_file: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> datasets.Dataset:
    """Every image under ``source`` as a ``datasets.Dataset`` (see ``dataset_from_records``)."""
    records = build_folder_records(source, labels_file, storage_options)
    return dataset_from_records(records, image_transform, storage_options)


DECODE_CACHE_ENV = "HF_MEDVIS_DECODE_CACHE_MB"


class DecodedImageCache:
    """Decoded uint8 images by path, up to a byte budget (``HF_MEDVIS_DECODE_CACHE_MB``, default 1024 per process; 0
    turns it off). A raw folder is decoded once instead of every epoch: a small labelled set on a laptop spends most of
    its time decoding PNG/DICOM otherwise (2 ms per 256² PNG, far more per DICOM). Entries are never modified: the
    augmentations return new tensors. Once the budget is spent, further images are decoded each time as before."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is None:
            budget_bytes = int(float(os.environ.get(DECODE_CACHE_ENV, "1024")) * 2**20)
        self.budget, self.used, self.images = budget_bytes, 0, {}

    def get(self, path: str, decode: Callable[[str], Any]) -> Any:
        image = self.images.get(path)
        if image is None:
            image = decode(path)
            size = image.numel() * image.element_size()
            if self.used + size <= self.budget:
                self.images[path] = image
                self.used += size
        return image


def make_decode_transform(image_transform: Callable, storage_options: dict | None = None) -> Callable:
    """A batched ``datasets`` transform: read_image -> uint8 [1, H, W] (cached, ``DecodedImageCache``) ->
    ``image_transform`` -> ``pixel_values``."""
    cache = DecodedImageCache()

    def decode(path: str) -> torch.Tensor:
        # Bytes go through fsspec/adlfs with our storage options: datasets' own Image feature loses them for az://.
        return to_uint8_tensor(read_image(path, storage_options=storage_options))

    def transform(batch: dict[str, list]) -> dict[str, list]:
        batch = dict(batch)
        keys = batch.get("key") or batch["path"]  # per-sample seeds (SeededAugmentation) follow the sample's key
        batch["pixel_values"] = [
            apply_image_transform(image_transform, cache.get(path, decode), key)
            for path, key in zip(batch["path"], keys, strict=True)
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
