"""``prepare``: raw images (folder, glob or fsspec URL) -> pre-sized grayscale Parquet shards + manifest + quarantine.

Layout under DST::

    manifest.json        written last: parameters, shard list (samples, bytes, sha256), totals, warnings
    quarantine.jsonl     one JSON line per input that failed (source relative to SRC, reason) and per labels row
                         without an image
    shards/shard-000000.parquet, shards/shard-000000.json (per-shard record), ...

Inputs are listed in a deterministic order, streamed, and cut into chunks of ``shard_size`` inputs; chunk ``i`` becomes
shard ``i``. A shard and then its record appear under their final names only when complete (temp + rename, or one
atomic blob upload), so a re-run skips every chunk whose record matches (same inputs, same parameters, same salt) and
redoes the rest; the manifest lists only shards whose record exists. Inputs seen = written + quarantined.

Privacy: shards hold a salted hash of the patient id, never the id; DICOM headers contribute only PatientID (hashed)
and ViewPosition; the source path is stored as a salted hash. No name, date, institution or accession number is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from . import shards as shard_format
from . import storage
from .decode import ImageDecodeError, read_dicom_header, read_image
from .folder import DataSourceError, find_labels_file, iter_image_files, read_labels_csv

logger = logging.getLogger(__name__)

SALT_ENV = "HF_MEDVIS_SALT"
IMAGE_COL, LABEL_COL, PATIENT_COL, VIEW_COL = "Image Index", "Finding Labels", "Patient ID", "View Position"
KNOWN_COLUMNS = {
    IMAGE_COL,
    LABEL_COL,
    PATIENT_COL,
    VIEW_COL,
    "Follow-up #",
    "Patient Age",
    "Patient Gender",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
}
RESIZE_POLICY = "shorter side to SIZE (bilinear, antialiased), then centre crop to SIZE x SIZE"


@dataclass(frozen=True)
class PrepareParams:
    """Everything that changes the bytes of a shard; part of each shard record's fingerprint."""

    size: int = 256
    bits: int = 8
    shard_size: int = 1000
    window: str = "auto"
    resize_policy: str = RESIZE_POLICY
    format: str = "parquet"
    format_version: int = shard_format.FORMAT_VERSION


def salted_hash(value: str, salt: str, kind: str) -> str:
    """Truncated SHA-256 keyed by the salt; ``kind`` separates namespaces (a patient id never collides with a path)."""
    return hashlib.sha256(f"{kind}\x00{salt}\x00{value}".encode()).hexdigest()[:20]


def resolve_salt(salt: str | None) -> str:
    salt = salt if salt is not None else os.environ.get(SALT_ENV)
    if not salt:
        raise ValueError(
            f"no salt for patient-id hashing: pass --salt or set {SALT_ENV} (keep it secret and the same for every "
            "prepare of one dataset, so a patient gets the same group across runs)"
        )
    return salt


def resize_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Float [0, 1] H x W -> float size x size, per RESIZE_POLICY."""
    import torch
    from torchvision.transforms.v2 import functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    tensor = F.resize(tensor, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    tensor = F.center_crop(tensor, [size, size])
    return tensor[0].clamp_(0.0, 1.0).numpy()


def quantize(image: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return np.round(image * 255.0).astype(np.uint8).tobytes()
    return np.round(image * 65535.0).astype("<u2").tobytes()


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _dicom_fields(data: bytes) -> tuple[str | None, str | None]:
    """(PatientID, ViewPosition) from a DICOM header; nothing else is taken from it."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None, None
    try:
        ds = read_dicom_header(data)
    except ImageDecodeError:
        return None, None
    patient = str(ds.get("PatientID", "") or "").strip() or None
    view = str(ds.get("ViewPosition", "") or "").strip() or None
    return patient, view


def _process_input(source: str, rel: str, row: dict | None, params: PrepareParams, salt: str, options: dict) -> dict:
    """One input -> one shard row; raises ImageDecodeError for anything that cannot become an image."""
    try:
        data = storage.read_bytes(source, options) if "://" in source else Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(rel, "file disappeared during prepare") from None
    except OSError as err:
        raise ImageDecodeError(rel, f"cannot read: {type(err).__name__}") from None
    image = read_image(data, window=params.window) if data else None
    if image is None:
        raise ImageDecodeError(rel, "empty file (0 bytes)")
    dicom_patient, dicom_view = _dicom_fields(data)
    patient = (row or {}).get(PATIENT_COL) or dicom_patient
    source_hash = salted_hash(rel, salt, "source")
    name = (row or {}).get(IMAGE_COL)
    resized = resize_to_square(image, params.size)
    return {
        # The labels file's image name is the public sample id (NIH-style, already de-identified); without it,
        # the salted source hash (a file name may carry a patient name).
        "key": PurePosixPath(name).stem if name else source_hash,
        "group": salted_hash(str(patient).strip(), salt, "patient") if patient else f"src-{source_hash}",
        "finding_labels": ((row or {}).get(LABEL_COL) or None),
        "view_position": ((row or {}).get(VIEW_COL) or dicom_view or None),
        "source_hash": source_hash,
        "orig_height": int(image.shape[0]),
        "orig_width": int(image.shape[1]),
        "height": params.size,
        "width": params.size,
        "bits": params.bits,
        "pixels": quantize(resized, params.bits),
    }


def _fingerprint(job: dict, params: PrepareParams, salt_check: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(salt_check.encode())
    for rel, _, row, missing in job["inputs"]:
        h.update(f"\n{rel}\x00{json.dumps(row, sort_keys=True)}\x00{missing}".encode())
    return h.hexdigest()


def _load_record(dst: str, index: int, options: dict) -> dict | None:
    url = storage.join(dst, shard_format.sidecar_name(index))
    try:
        return json.loads(storage.read_bytes(url, options))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return None  # a damaged record is redone


def process_chunk(job: dict) -> dict:
    """Decodes one chunk into one shard (skipped when a matching record exists); returns the shard record."""
    dst, index, params, salt, options = job["dst"], job["index"], job["params"], job["salt"], job["options"]
    fingerprint = _fingerprint(job, params, job["salt_check"])
    previous = _load_record(dst, index, options)
    if previous and previous.get("fingerprint") == fingerprint:
        shard_ok = previous["samples"] == 0 or storage.exists(storage.join(dst, previous["path"]), options)
        if shard_ok:
            return {**previous, "resumed": True}
    rows, quarantine = [], []
    for rel, source, row, missing in job["inputs"]:
        if missing:
            quarantine.append({"source": rel, "reason": "no row in the labels file"})
            continue
        try:
            rows.append(_process_input(source, rel, row, params, salt, job["input_options"]))
        except ImageDecodeError as err:
            quarantine.append({"source": rel, "reason": err.reason})
        except Exception as err:  # nothing crashes mid-run: an unexpected failure quarantines that input only
            logger.exception("unexpected error on input %s", rel)
            quarantine.append({"source": rel, "reason": f"unexpected error: {type(err).__name__}: {err}"})
    record: dict[str, Any] = {
        "index": index,
        "path": shard_format.shard_name(index),
        "samples": len(rows),
        "inputs": len(job["inputs"]),
        "quarantine": quarantine,
        "fingerprint": fingerprint,
    }
    if rows:
        data = shard_format.encode_shard(rows)
        record.update(bytes=len(data), sha256=shard_format.sha256_hex(data))
        storage.write_bytes_atomic(storage.join(dst, record["path"]), data, options)
    storage.write_bytes_atomic(storage.join(dst, shard_format.sidecar_name(index)), shard_format.dumps(record), options)
    return {**record, "resumed": False}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _read_labels(labels: str | None, src: str) -> tuple[dict[str, dict[str, str]], str | None, list[str]]:
    path = labels or (str(find_labels_file(src)) if find_labels_file(src) else None)
    if not path:
        return {}, None, []
    rows = read_labels_csv(path, image_col=IMAGE_COL)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    warnings = []
    for column in (LABEL_COL, PATIENT_COL, VIEW_COL):
        if column not in header:
            warnings.append(f"labels file has no '{column}' column: that field is empty for every sample")
    unknown = [c for c in header if c not in KNOWN_COLUMNS]
    if unknown:
        warnings.append(f"labels file columns ignored (unknown): {', '.join(unknown)}")
    return rows, path, warnings


def prepare(
    src: str,
    dst: str,
    *,
    size: int = 256,
    bits: int = 8,
    labels: str | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    salt: str | None = None,
    storage_options: dict | str | None = None,
    dst_storage_options: dict | str | None = None,
    shard_format_name: str = "parquet",
) -> dict:
    """Prepares shards from ``src`` into ``dst`` and returns the manifest (also written to ``dst/manifest.json``)."""
    if shard_format_name != "parquet":
        raise ValueError(f"unsupported --format {shard_format_name!r}: only 'parquet' (see docs/data_plane.md)")
    if bits not in (8, 16):
        raise ValueError(f"--bits must be 8 or 16, got {bits}")
    if size < 16:
        raise ValueError(f"--size must be >= 16, got {size}")
    if shard_size < 1 or workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    salt = resolve_salt(salt)
    salt_check = hashlib.sha256(f"hf_medvis-salt-check\x00{salt}".encode()).hexdigest()[:16]
    params = PrepareParams(size=size, bits=bits, shard_size=shard_size)
    in_options = storage.storage_options_for(src, storage_options)
    out_options = storage.storage_options_for(dst, dst_storage_options if dst_storage_options is not None else storage_options)
    label_rows, labels_path, warnings = _read_labels(labels, src)
    storage.make_dirs(dst, out_options)

    matched: set[str] = set()
    root = src if not any(ch in src for ch in "*?[") else src.split("*", 1)[0].rsplit("/", 1)[0]

    def jobs() -> Iterator[dict]:
        listing = iter_image_files(src, in_options)
        for index, chunk in enumerate(_chunks(listing, shard_size)):
            inputs = []
            for source in chunk:
                rel = _relative(source, root)
                name = rel.rsplit("/", 1)[-1]
                row = label_rows.get(name) or label_rows.get(PurePosixPath(name).stem) if label_rows else None
                if row is not None:
                    matched.add(row[IMAGE_COL].strip())
                inputs.append((rel, source, row, bool(label_rows) and row is None))
            yield {
                "dst": dst,
                "index": index,
                "inputs": inputs,
                "params": params,
                "salt": salt,
                "salt_check": salt_check,
                "options": out_options,
                "input_options": in_options,
            }

    records = _run(jobs(), workers)
    if not records:
        raise DataSourceError(f"no image files found in {storage.describe(src)}")
    records.sort(key=lambda r: r["index"])
    orphans = sorted({row[IMAGE_COL].strip() for row in label_rows.values()} - matched)
    quarantine_lines = [q for r in records for q in r["quarantine"]]
    quarantine_lines += [{"source": name, "reason": "labels row without an image"} for name in orphans]
    inputs_seen = sum(r["inputs"] for r in records)
    written = sum(r["samples"] for r in records)
    quarantined = sum(len(r["quarantine"]) for r in records)
    assert inputs_seen == written + quarantined, "prepare lost inputs: counts do not add up"
    manifest = {
        "format": shard_format.FORMAT_NAME,
        "version": shard_format.FORMAT_VERSION,
        "shard_format": "parquet",
        "preprocessing": {**asdict(params), "dtype": "uint8" if bits == 8 else "uint16", "channels": 1},
        "labels_file": os.path.basename(labels_path) if labels_path else None,
        "shards": [
            {"path": r["path"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
            for r in records
            if r["samples"] > 0
        ],
        "totals": {
            "inputs_seen": inputs_seen,
            "written": written,
            "quarantined": quarantined,
            "labels_rows_without_image": len(orphans),
            "shards": sum(1 for r in records if r["samples"] > 0),
            "shards_resumed": sum(1 for r in records if r.get("resumed")),
        },
        "warnings": warnings,
        "quarantine_report": shard_format.QUARANTINE_NAME,
    }
    report = "".join(json.dumps(line, sort_keys=True) + "\n" for line in quarantine_lines).encode()
    storage.write_bytes_atomic(storage.join(dst, shard_format.QUARANTINE_NAME), report, out_options)
    # The manifest is the commit point: readers only ever see shards it lists, all complete.
    storage.write_bytes_atomic(storage.join(dst, shard_format.MANIFEST_NAME), shard_format.dumps(manifest), out_options)
    return manifest


def _run(jobs: Iterator[dict], workers: int) -> list[dict]:
    if workers == 1:
        return [process_chunk(job) for job in jobs]
    # Bounded submission: the listing is consumed as shards finish, never all at once.
    records: list[dict] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = set()
        for job in jobs:
            pending.add(pool.submit(process_chunk, job))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                records.extend(f.result() for f in done)
        records.extend(f.result() for f in pending)
    return records


def read_quarantine(dst: str, storage_options: dict | str | None = None) -> list[dict]:
    data = storage.read_bytes(storage.join(dst, shard_format.QUARANTINE_NAME), storage_options)
    return [json.loads(line) for line in io.StringIO(data.decode()) if line.strip()]
