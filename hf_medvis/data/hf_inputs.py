"""Hugging Face ``datasets`` as fine-tuning inputs: a folder written by ``save_to_disk``, an ``imagefolder`` with
``metadata.csv``/``metadata.jsonl``, or a Hub dataset id, with an image column and a label column named as
transformers' ``run_image_classification.py`` names them (``--image_column_name``, ``--label_column_name``).

The dataset becomes the same (table, records) pair as prepared shards (``labelled.py`` splits and encodes them): the
table keeps the images undecoded, and our decoder (``read_image``: DICOM, 16-bit PNG, colour) reads them on access.
Labels: a ``ClassLabel`` (one class per image), a list of ``ClassLabel`` (multi-label; empty = no finding), or strings
in the NIH spelling. Patients come from ``--group_column_name``; without one every image is its own patient, which the
log says (images of one patient may then fall on both sides of the validation split).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from .decode import read_image
from .labels import NO_FINDING, SEPARATOR
from .transforms import apply_image_transform, to_uint8_tensor

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
LABEL_COLUMN_GUESSES = ("label", "labels")


def hf_dataset_kind(location: str | None) -> str | None:
    """ "disk" (``save_to_disk``), "imagefolder" (a folder with a metadata file), "hub" (``owner/name`` that is no
    local path), or None."""
    if not location or "://" in location or any(ch in location for ch in "*?["):
        return None
    path = Path(location).expanduser()
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "disk"
        if any((path / name).is_file() for name in METADATA_FILES):
            return "imagefolder"
        return None
    if location.count("/") == 1 and not location.startswith((".", "/", "~")) and not path.exists():
        return "hub"
    return None


def _load(location: str, kind: str, split: str) -> datasets.Dataset:
    if kind == "disk":
        loaded = datasets.load_from_disk(location)
    elif kind == "imagefolder":
        loaded = datasets.load_dataset("imagefolder", data_dir=location)
    else:
        loaded = datasets.load_dataset(location)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{location} has no '{split}' split (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def _image_column(ds: datasets.Dataset, name: str | None, location: str) -> str:
    if name:
        if name not in ds.column_names:
            raise ValueError(f"{location}: no column '{name}' (columns: {', '.join(ds.column_names)})")
        return name
    found = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not found:
        raise ValueError(
            f"{location}: no Image column; pass --image_column_name (columns: {', '.join(ds.column_names)})"
        )
    return found[0]


def _label_texts(ds: datasets.Dataset, name: str | None, location: str) -> tuple[str, list[str | None]]:
    """The label column and each row's canonical ``Finding Labels`` text."""
    column = name or next((c for c in LABEL_COLUMN_GUESSES if c in ds.column_names), None)
    if column is None or column not in ds.column_names:
        raise ValueError(
            f"{location}: no label column{f' {name!r}' if name else ''}; pass --label_column_name "
            f"(columns: {', '.join(ds.column_names)})"
        )
    feature = ds.features[column]
    values = ds.select_columns([column]).with_format(None)[column]
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.ClassLabel):
        return column, [None if v is None or v < 0 else feature.int2str(v) for v in values]
    if isinstance(inner, datasets.ClassLabel):
        return column, [
            None if v is None else SEPARATOR.join(inner.int2str(i) for i in v) or NO_FINDING for v in values
        ]
    return column, [None if v is None or str(v).strip() == "" else str(v) for v in values]


def load_hf_table(
    location: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    need_labels: bool = True,
) -> tuple[datasets.Dataset, dict[str, list[Any]], str]:
    """(table with the images undecoded, records ``index``/``key``/``group``/``finding_labels``, image column).
    ``need_labels=False`` (MAE pretraining): a label column is read if there is one, and not required."""
    kind = hf_dataset_kind(location)
    if kind is None:
        raise ValueError(f"{location} is not a datasets folder, an imagefolder with a metadata file or a Hub id")
    ds = _load(location, kind, split)
    image_col = _image_column(ds, image_column, location)
    has_labels = label_column or any(c in ds.column_names for c in LABEL_COLUMN_GUESSES)
    texts = _label_texts(ds, label_column, location)[1] if need_labels or has_labels else [None] * len(ds)
    if group_column:
        if group_column not in ds.column_names:
            raise ValueError(f"{location}: no column '{group_column}' (columns: {', '.join(ds.column_names)})")
        groups = [str(g) for g in ds.select_columns([group_column]).with_format(None)[group_column]]
    else:
        logger.warning(
            "%s: no --group_column_name, so every image counts as its own patient: images of one patient may fall on "
            "both sides of the validation split",
            location,
        )
        groups = [f"image-{i}" for i in range(len(ds))]
    ds = ds.cast_column(image_col, datasets.Image(decode=False))  # our decoder reads the bytes (DICOM, 16-bit, colour)
    keys = [f"{Path(location).name}-{split}-{i}" for i in range(len(ds))]  # per-sample augmentation seeds
    ds = ds.select_columns([image_col]).add_column("key", keys).add_column("group", groups)  # as a shard table
    records = {"index": list(range(len(ds))), "key": keys, "group": groups, "finding_labels": texts}
    return ds, records, image_col


def make_image_column_transform(
    image_column: str, image_transform: Callable | None, channels: int = 1
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched ``datasets`` transform: the undecoded image column -> ``read_image`` -> uint8 tensor ->
    ``image_transform`` -> ``pixel_values`` (the image column dropped)."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out = {k: v for k, v in batch.items() if k != image_column}
        pixels = []
        for key, image in zip(batch["key"], batch[image_column], strict=True):
            source = image["bytes"] if image.get("bytes") is not None else os.fspath(image["path"])
            array = read_image(source, channels=channels)
            pixels.append(apply_image_transform(image_transform, to_uint8_tensor(array), key))
        out["pixel_values"] = pixels
        return out

    return transform
