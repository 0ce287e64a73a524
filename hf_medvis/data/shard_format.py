"""Prepared-shard format: Parquet files of pre-sized grayscale images plus per-sample metadata, and the manifest.

The shards are a standard Hugging Face dataset: each file's Arrow schema carries its ``datasets`` features (``image``:
``Image``, ``labels``: a list of ``ClassLabel`` with the class names), and the dataset card (``README.md``, written by
``prepare``) names the Parquet files as the data, so ``datasets.load_dataset(<folder>)`` and the Hub's viewer read them
and leave the manifest, the quarantine report and the per-shard records alone.

The image is stored as a binary PGM (netpbm P5: a ~15-byte header, then the raw pixels, big-endian at 16 bits): every
image library decodes it (PIL, for ``datasets``' ``Image``), and our own reader takes the pixels after the header with
no decoding at all, so the training feed costs what raw pixels cost (PNG would cost ~1,460 img/s per core at 256²).

Why Parquet (zstd level 1) rather than WebDataset tar — measured on 256² phantoms, one core, from memory
(docs/data_plane.md): raw pixels in a tar read at ~35k img/s but take 64 KiB/img; PNG members in a tar take 40 KiB/img
but decode at ~1.5k img/s, too close to the 1k img/s/core target once the training crop is added; Parquet with zstd
level 1 on the pixel column reads at ~10k img/s with 15% fewer bytes than raw, and its columns let a split planner or a
label count read metadata without downloading pixels. The Hub and ``datasets`` read it natively.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_NAME = "hf_medvis.shards"
FORMAT_VERSION = 2  # 1: raw little-endian ``pixels`` and no datasets features (still read)
CARD_NAME = "README.md"
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
SHARD_DIR = "shards"
ROW_GROUP_SIZE = 256
# Columns without pixels: what a planner reads to split by patient or count labels.
METADATA_COLUMNS: tuple[str, ...] = (
    "key",
    "group",
    "finding_labels",
    "view_position",
    "source_hash",
    "orig_height",
    "orig_width",
)


def features(class_names: Sequence[str] = (), masks: bool = False) -> datasets.Features:
    """The ``datasets`` features of a shard; ``labels`` holds indices into ``class_names`` (null: unlabelled image).
    ``masks``: a ``mask`` column too (``prepare --masks_dir/--masks_rle``): the image's segmentation mask, class indices
    as an 8-bit PGM of the stored image's size (the manifest's ``preprocessing.mask_labels`` names the indices)."""
    columns = datasets.Features(
        {
            "key": datasets.Value("string"),
            "group": datasets.Value("string"),  # salted hash of the patient id
            "finding_labels": datasets.Value("string"),  # the labels file's text, as given
            "labels": datasets.List(datasets.ClassLabel(names=list(class_names))),
            "view_position": datasets.Value("string"),
            "source_hash": datasets.Value("string"),
            "orig_height": datasets.Value("int32"),
            "orig_width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "width": datasets.Value("int32"),
            "bits": datasets.Value("int8"),
            "image": datasets.Image(),
        }
    )
    if masks:
        columns["mask"] = datasets.Image()
    return columns


def features_v1() -> datasets.Features:
    """Format version 1 (raw ``pixels``), for reading shards prepared before version 2."""
    return datasets.Features.from_arrow_schema(
        pa.schema(
            [(name, pa.string()) for name in ("key", "group", "finding_labels", "view_position", "source_hash")]
            + [(name, pa.int32()) for name in ("orig_height", "orig_width", "height", "width")]
            + [("bits", pa.int8()), ("pixels", pa.binary())]
        )
    )


def encode_pgm(pixels: np.ndarray) -> bytes:
    """An [H, W] uint8 / uint16 array as binary PGM bytes, or an [H, W, 3] uint8 array as binary PPM (colour, or three
    CT windows)."""
    height, width = pixels.shape[:2]
    magic = "P6" if pixels.ndim == 3 else "P5"
    if pixels.ndim == 3 and (pixels.shape[2] != 3 or pixels.dtype != np.uint8):
        raise ValueError(f"colour images are stored as 8-bit RGB, got shape {pixels.shape} {pixels.dtype}")
    maxval = 255 if pixels.dtype == np.uint8 else 65535
    body = pixels.astype(">u2").tobytes() if maxval == 65535 else np.ascontiguousarray(pixels).tobytes()
    return f"{magic}\n{width} {height}\n{maxval}\n".encode() + body


def stored_pixels(row: dict[str, Any]) -> np.ndarray:
    """The (height, width) uint8 or uint16 array of a shard row, (height, width, 3) for colour, read without decoding
    (a view of its bytes)."""
    h, w, bits = row["height"], row["width"], row["bits"]
    if "pixels" in row:  # version 1
        return np.frombuffer(row["pixels"], dtype=np.uint8 if bits == 8 else "<u2").reshape(h, w)
    data = row["image"]["bytes"]
    dtype = np.dtype(np.uint8 if bits == 8 else ">u2")
    shape = (h, w, 3) if data[:2] == b"P6" else (h, w)
    size = int(np.prod(shape)) * dtype.itemsize
    if len(data) < size or data[:2] not in (b"P5", b"P6"):
        raise ValueError(f"sample {row.get('key')}: image bytes are not a {h}x{w} {bits}-bit PGM/PPM")
    return np.frombuffer(data, dtype=dtype, offset=len(data) - size).reshape(shape)


def stored_mask(row: dict[str, Any]) -> np.ndarray:
    """The (height, width) uint8 class indices of a shard row's ``mask`` (a view of its PGM bytes)."""
    data, h, w = row["mask"]["bytes"], row["height"], row["width"]
    if len(data) < h * w or data[:2] != b"P5":
        raise ValueError(f"sample {row.get('key')}: mask bytes are not a {h}x{w} 8-bit PGM")
    return np.frombuffer(data, dtype=np.uint8, offset=len(data) - h * w).reshape(h, w)


def pixel_stats(rows: list[dict]) -> dict:
    """Per-channel sums of the stored pixels (scaled to [0, 1]): the manifest's normalisation statistics."""
    total, total_sq, count = None, None, 0
    for row in rows:
        pixels = stored_pixels(row)
        values = pixels.reshape(-1, 1 if pixels.ndim == 2 else pixels.shape[2]).astype(np.float64)
        values /= 255.0 if pixels.dtype == np.uint8 else 65535.0
        total = values.sum(axis=0) if total is None else total + values.sum(axis=0)
        total_sq = (values**2).sum(axis=0) if total_sq is None else total_sq + (values**2).sum(axis=0)
        count += values.shape[0]
    return {"count": count, "sum": total.tolist(), "sum_sq": total_sq.tolist()}


def normalization(records: list[dict]) -> dict | None:
    """Per-channel mean and std of every stored pixel (what the recipes normalise with by default); None when a shard
    record predates the statistics."""
    stats = [r["pixel_stats"] for r in records if r["samples"] > 0 and "pixel_stats" in r]
    if len(stats) != sum(1 for r in records if r["samples"] > 0) or not stats:
        return None
    count = sum(s["count"] for s in stats)
    mean = np.sum([s["sum"] for s in stats], axis=0) / count
    var = np.sum([s["sum_sq"] for s in stats], axis=0) / count - mean**2
    return {
        "mean": [round(float(v), 4) for v in mean],
        "std": [round(float(v), 4) for v in np.sqrt(np.maximum(var, 0))],
    }


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.parquet"


def sidecar_name(index: int) -> str:
    """Per-shard record written after the shard itself: what makes a re-run skip finished work."""
    return f"{SHARD_DIR}/shard-{index:06d}.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(rows: Sequence[dict[str, Any]], class_names: Sequence[str] = (), masks: bool = False) -> bytes:
    """Parquet bytes for ``rows`` (dicts with the features' fields; ``image`` (and ``mask``) as ``{"bytes": PGM,
    "path": None}``), with the ``datasets`` features in the schema metadata."""
    table = pa.Table.from_pylist(list(rows), schema=features(class_names, masks).arrow_schema)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=ROW_GROUP_SIZE,
        compression="zstd",
        compression_level=1,
        use_dictionary=["group", "finding_labels", "view_position"],
        write_statistics=list(METADATA_COLUMNS),
    )
    return buf.getvalue()


def iter_shard_rows(data: bytes, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a shard, one row group at a time (bounded memory beyond the shard's bytes)."""
    reader = pq.ParquetFile(io.BytesIO(data))
    for index in range(reader.num_row_groups):
        table = reader.read_row_group(index, columns=list(columns) if columns else None)
        yield from table.to_pylist()


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
