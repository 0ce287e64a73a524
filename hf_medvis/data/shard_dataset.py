"""Prepared shards as a map-style ``datasets.Dataset``: for labelled sets (thousands to tens of thousands of images).

Fine-tuning needs what a stream cannot give cheaply: a patient-level stratified split, the label matrix (pos_weight,
eval subsample) and random access for bootstrap CIs. So the whole shard set becomes one Arrow table: ``datasets``
writes it to its cache (memory-mapped, so DataLoader workers and ranks share the pages instead of each holding a copy)
and reuses it while the manifest's shard list is unchanged.

Bytes come through the same reader as the stream (``streaming.ShardReader``): fsspec/adlfs with our storage options
(``datasets``' own Parquet loading drops them for ``az://``), retries on transient errors, and the manifest's sha256 per
shard. A shard that stays unreadable or fails its checksum is an error here (no skipping: a silently smaller labelled
set would change the split and the metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from ..core import storage
from . import shard_format
from .streaming import DecodeStoredPixels, ShardLocation, ShardReader, ShardReadError, find_manifest

PIXEL_COLUMNS: tuple[str, ...] = ("image", "pixels", "height", "width", "bits", "mask")  # "pixels": format version 1
TABLE_METADATA_COLUMNS: tuple[str, ...] = ("key", "group", "finding_labels")


def load_shard_table(
    source: str,
    storage_options: dict | str | None = None,
    cache_dir: str | None = None,
    shards: ShardLocation | None = None,
) -> datasets.Dataset:
    """Every sample of the prepared-shard location ``source`` (a folder / URL or its manifest.json) as a map-style
    ``datasets.Dataset`` with the shard schema's columns (``key``, ``group``, ``finding_labels``, ``view_position``,
    ``image`` (PGM bytes, undecoded), ``height``, ``width``, ``bits``, ...). Raises ValueError if ``source`` holds no shard manifest.
    ``shards``: ``find_manifest(source)`` when the caller has it already (the manifest is not read again)."""
    found = shards if shards is not None else find_manifest(source, storage_options)
    if found is None:
        raise ValueError(
            f"{storage.describe(source)} is not a prepared-shard location (no {shard_format.MANIFEST_NAME})"
        )
    base, manifest = found
    options = storage.storage_options_for(base, storage_options)
    # The shard list (paths, sizes, checksums) is part of the generator's kwargs, so datasets' cache fingerprint changes
    # whenever the shards do; a re-prepared location is never served from a stale table.
    shards = [dict(s) for s in manifest["shards"]]
    if manifest.get("version", 1) < 2:
        features = shard_format.features_v1()
    else:
        preprocessing = manifest["preprocessing"]
        features = shard_format.features(preprocessing.get("class_names", ()), bool(preprocessing.get("mask_labels")))
        for column in ("image", "mask"):  # our decoder takes the pixels after the PGM header
            if column in features:
                features[column] = datasets.Image(decode=False)
    try:
        table = datasets.Dataset.from_generator(
            ShardReader(base, options, skip_bad_shards=False),
            gen_kwargs={"shards": shards},
            features=features,
            cache_dir=cache_dir,
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # datasets wraps the reader's error; the caller should see which shard failed and why, not the wrapper.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ShardReadError):
            raise ShardReadError(str(cause)) from None
        raise
    expected = int(manifest["totals"]["written"])
    if len(table) != expected:
        raise ShardReadError(
            f"{storage.describe(base)}: read {len(table)} samples, the manifest lists {expected} (shards changed?)"
        )
    return table


def shard_metadata(table: datasets.Dataset) -> dict[str, list[Any]]:
    """The pixel-free columns of a shard table as lists (Arrow reads only these columns)."""
    return table.select_columns(list(TABLE_METADATA_COLUMNS)).with_format(None).to_dict()


def make_shard_transform(image_transform: Callable | None) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched ``datasets`` transform: stored pixels -> uint8 tensor [1, H, W] -> ``image_transform`` ->
    ``pixel_values``; the raw pixel columns are dropped so batches carry tensors and metadata only."""
    decode = DecodeStoredPixels(image_transform)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        size = len(batch["key"])
        stored = [name for name in PIXEL_COLUMNS if name in batch]
        out = {k: v for k, v in batch.items() if k not in PIXEL_COLUMNS}
        out["pixel_values"] = [
            decode({"key": batch["key"][i], **{name: batch[name][i] for name in stored}})["pixel_values"]
            for i in range(size)
        ]
        return out

    return transform
