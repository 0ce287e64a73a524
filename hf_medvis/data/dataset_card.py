"""The dataset card (``README.md``) of a prepared-shard location: what ``datasets.load_dataset(<folder>)`` and the Hub's
viewer read to find the data files (the Parquet shards, not the manifest, the quarantine report or the per-shard
records), and what a person reads to know what the images are and how they were made."""

from __future__ import annotations

from typing import Any

import datasets
from huggingface_hub import DatasetCard, DatasetCardData

from ..core import storage
from . import shard_format
from .provenance import describe_origin

DATA_FILES = f"{shard_format.SHARD_DIR}/shard-*.parquet"
SPLIT = "train"  # one split: hf-medvis split / the recipes divide it by patient


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def dataset_card(manifest: dict) -> str:
    """The card's text for ``manifest`` (as ``prepare`` writes it)."""
    origin = manifest.get("source")
    synthetic = bool(origin and origin.get("synthetic"))
    pre, totals = manifest["preprocessing"], manifest["totals"]
    class_names = list(pre.get("class_names") or [])
    mask_labels = list(pre.get("mask_labels") or [])
    mask_classes = ", ".join(f"{index} `{name}`" for index, name in enumerate(mask_labels))
    mask_row = (
        f"| `mask` | segmentation mask (`Image` of class indices: {mask_classes}; 255 unlabelled), resized with the "
        "image (nearest-neighbour) |\n"
        if mask_labels
        else ""
    )
    # The features and sizes also change the cache key of `datasets.load_dataset(<folder>)`, which (datasets 5.2)
    # otherwise depends on the folder's name and this card only: see load_prepared_dataset.
    info = datasets.DatasetInfo(
        features=shard_format.features(class_names, masks=bool(pre.get("mask_labels"))),
        splits=datasets.SplitDict({SPLIT: datasets.SplitInfo(SPLIT, num_examples=int(totals["written"]))}),
        download_size=sum(int(s["bytes"]) for s in manifest["shards"]),
    )
    data = DatasetCardData(
        dataset_info=info._to_yaml_dict(),  # datasets' own YAML form (features with the ClassLabel names)
        pretty_name="hf-medvis prepared shards" + (" (synthetic phantoms)" if synthetic else ""),
        task_categories=["image-classification"],
        size_categories=[_size_category(int(totals["written"]))],
        tags=["medical-imaging", "hf-medvis"] + (["synthetic"] if synthetic else []),
        configs=[{"config_name": "default", "data_files": [{"split": SPLIT, "path": DATA_FILES}]}],
    )
    classes = ", ".join(f"`{name}`" for name in class_names) or "none (no labels file)"
    body = f"""
# {data.pretty_name}

Images: {describe_origin(origin)}. {totals["written"]} images in {totals["shards"]} Parquet shards; {totals["quarantined"]}
inputs quarantined (reasons in `{shard_format.QUARANTINE_NAME}`), {totals["skipped"]} files skipped as not images.

Prepared by `hf-medvis prepare`: {pre["resize_policy"]} (SIZE = {pre["size"]}), {pre["bits"]}-bit grayscale, stored as
binary PGM in the `image` column (any image library reads it; `datasets` gives a PIL image).

## Loading

```python
from datasets import load_dataset
ds = load_dataset("<this folder or Hub repo>", split="{SPLIT}")
```

The recipes read the same location directly: `--train_data <this folder>` (streamed, with exact resume).

## Columns

| column | content |
|---|---|
| `image` | the image (`Image` feature) |
{mask_row}| `labels` | findings as class indices (`ClassLabel`: {classes}); empty = no finding; null = unlabelled |
| `finding_labels` | the labels file's text for the image, as given |
| `group` | salted hash of the patient id (split by it: images of one patient stay together) |
| `key` | the labels file's image name, or a salted hash of the source path |
| `view_position` | the view (PA, AP, ...) when known |
| `height`, `width`, `bits`, `orig_height`, `orig_width`, `source_hash` | stored and original size, depth, source hash |

One split (`{SPLIT}`): split by patient with `hf-medvis split` or the recipes' `--validation_split_percentage`.

## Privacy

No patient name, patient id, date, institution or file name is stored: patient ids are salted hashes, DICOM headers
contribute only the (hashed) PatientID and ViewPosition. `manifest.json` (parameters, checksums) and
`{shard_format.QUARANTINE_NAME}` are not data files.
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def load_prepared_dataset(
    location: str, storage_options: dict | str | None = None, split: str = SPLIT, streaming: bool = False
) -> Any:
    """A prepared-shard location as a ``datasets`` dataset, local or remote: the data files its card names, read by
    ``datasets``' Parquet loader, which keys its cache on those files (names and modification times).

    ``datasets.load_dataset(<folder>)`` reads the same files, but (datasets 5.2) caches a folder with a card by the
    folder's name and the card alone: after re-preparing into the same folder it can return the old data unless the
    sizes changed (pass ``download_mode="force_redownload"``); and it takes an ``az://`` path for a local one."""
    options = storage.storage_options_for(location, storage_options)
    card = DatasetCard(storage.read_metadata(storage.join(location, shard_format.CARD_NAME), options).decode())
    files = {
        entry["split"]: [storage.join(location, entry["path"])]
        for config in card.data.configs or []
        if config.get("config_name", "default") == "default"
        for entry in config["data_files"]
    }
    if split not in files:
        raise ValueError(f"{storage.describe(location)}: the dataset card names no '{split}' split")
    return datasets.load_dataset("parquet", data_files=files, split=split, streaming=streaming, storage_options=options)
