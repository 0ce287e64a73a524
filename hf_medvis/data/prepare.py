"""``prepare``: raw images (folder, glob or fsspec URL) -> pre-sized grayscale Parquet shards + manifest + quarantine.

Layout under DST::

    manifest.json        written last: parameters, shard list (samples, bytes, sha256), totals, warnings
    quarantine.jsonl     one JSON line per input that failed (its salted source hash, shard, reason) and per labels
                         row without an image (the labels file's Image Index)
    shards/shard-000000.parquet, shards/shard-000000.json (per-shard record), ...

Inputs are every file under SRC, listed in a deterministic order, streamed; files that are not images (no image
extension and no DICOM/PNG/JPEG/TIFF signature: DICOM files often have no extension or a UID for a name) are skipped and
counted per reason. The rest are cut into chunks of ``shard_size``; chunk ``i`` becomes shard ``i``. A shard and then its
record appear under their final names only when complete (temp + rename, or one atomic blob upload), so a re-run skips
every chunk whose record matches (same inputs, same parameters, same salt) and redoes the rest; the manifest lists only
shards whose record exists. Files seen = written + quarantined + skipped.

Privacy: shards hold a salted hash of the patient id, never the id; DICOM headers contribute only PatientID (hashed)
and ViewPosition; a source path is written only as a salted hash (``hf-medvis quarantine DST --src SRC`` maps the
quarantined hashes back to file names on the operator's terminal). No file name, date, institution or accession number
is written to DST or logged.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from . import shards as shard_format
from . import storage
from .decode import ImageDecodeError, read_dicom_header, read_image
from .folder import DataSourceError, find_labels_file, iter_image_files
from .labels import IMAGE_COL, LABEL_COL, PATIENT_COL, LabelsTable, is_labelled, normalize_patient_id, read_labels_table
from .privacy import relative_path, resolve_salt, salt_check, salted_hash

logger = logging.getLogger(__name__)

VIEW_COL = "View Position"
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


def resize_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Float [0, 1] H x W -> float size x size, per RESIZE_POLICY."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    tensor = F.resize(tensor, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    tensor = F.center_crop(tensor, [size, size])
    return tensor[0].clamp_(0.0, 1.0).numpy()


def quantize(image: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return np.round(image * 255.0).astype(np.uint8).tobytes()
    return np.round(image * 65535.0).astype("<u2").tobytes()


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
    source_hash = salted_hash(rel, salt, "source")
    try:
        data = storage.read_bytes(source, options) if "://" in source else Path(source).read_bytes()
    except FileNotFoundError:
        broken_link = "://" not in source and os.path.islink(source)
        raise ImageDecodeError(
            source_hash,
            "broken symbolic link (its target does not exist)" if broken_link else "file disappeared during prepare",
        ) from None
    except OSError as err:
        raise ImageDecodeError(source_hash, f"cannot read: {type(err).__name__} ({err.strerror or ''})") from None
    if not data:
        raise ImageDecodeError(source_hash, "empty file (0 bytes)")
    image = read_image(data, window=params.window)
    dicom_patient, dicom_view = _dicom_fields(data)
    patient = normalize_patient_id((row or {}).get(PATIENT_COL) or dicom_patient)
    name = (row or {}).get(IMAGE_COL)
    resized = resize_to_square(image, params.size)
    return {
        # The labels file's image name is the public sample id (NIH-style, already de-identified); without it,
        # the salted source hash (a file name may carry a patient name).
        "key": PurePosixPath(name).stem if name else source_hash,
        "group": salted_hash(patient, salt, "patient") if patient else f"src-{source_hash}",
        "finding_labels": (row or {}).get(LABEL_COL) if is_labelled((row or {}).get(LABEL_COL)) else None,
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
        h.update(f"\n{rel}\x00{json.dumps(row, sort_keys=True)}\x00{missing}".encode("utf-8", "surrogateescape"))
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
        # Entries name the input by its salted hash only: a file name may carry a patient's name or MRN.
        entry = {"source_hash": salted_hash(rel, salt, "source"), "shard": index}
        if missing:
            quarantine.append({**entry, "reason": "no row in the labels file"})
            continue
        try:
            rows.append(_process_input(source, rel, row, params, salt, job["input_options"]))
        except ImageDecodeError as err:
            quarantine.append({**entry, "reason": err.reason})
        except Exception as err:  # nothing crashes mid-run: an unexpected failure quarantines that input only
            logger.error("unexpected %s on input %s (shard %d)", type(err).__name__, entry["source_hash"], index)
            logger.debug("traceback", exc_info=True)  # may quote the file name: debug level only
            quarantine.append({**entry, "reason": f"unexpected error: {type(err).__name__}"})
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


def _read_labels(labels: str | None, src: str) -> tuple[LabelsTable | None, list[str]]:
    found = find_labels_file(src)
    path = labels or (str(found) if found else None)
    if not path:
        return None, []
    table = read_labels_table(path, image_col=IMAGE_COL)
    warnings = list(table.warnings)
    for column in (LABEL_COL, PATIENT_COL, VIEW_COL):
        if column not in table.columns:
            warnings.append(f"labels file has no '{column}' column: that field is empty for every sample")
    unknown = [c for c in table.columns if c not in KNOWN_COLUMNS]
    if unknown:
        warnings.append(f"labels file columns ignored (unknown): {', '.join(unknown)}")
    for warning in warnings[len(table.warnings) :]:  # the table's own were logged when it was read
        logger.warning("%s", warning)
    return table, warnings


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
    salt_fingerprint = salt_check(salt)
    params = PrepareParams(size=size, bits=bits, shard_size=shard_size)
    in_options = storage.storage_options_for(src, storage_options)
    out_options = storage.storage_options_for(
        dst, dst_storage_options if dst_storage_options is not None else storage_options
    )
    table, warnings = _read_labels(labels, src)
    label_rows = table.by_image() if table is not None else {}
    storage.make_dirs(dst, out_options)

    matched: set[str] = set()
    skipped: dict[str, int] = {}
    root = src if not any(ch in src for ch in "*?[") else src.split("*", 1)[0].rsplit("/", 1)[0]

    def skip(path: str, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def jobs() -> Iterator[dict]:
        listing = iter_image_files(src, in_options, on_skip=skip)
        for index, chunk in enumerate(_chunks(listing, shard_size)):
            inputs = []
            for source in chunk:
                rel = relative_path(source, root)
                name = rel.rsplit("/", 1)[-1]
                row = label_rows.get(name) or label_rows.get(PurePosixPath(name).stem) if label_rows else None
                if row is not None:
                    matched.add(row[IMAGE_COL])
                inputs.append((rel, source, row, bool(label_rows) and row is None))
            yield {
                "dst": dst,
                "index": index,
                "inputs": inputs,
                "params": params,
                "salt": salt,
                "salt_check": salt_fingerprint,
                "options": out_options,
                "input_options": in_options,
            }

    records = _run(jobs(), workers)
    if not records:
        found = f" ({sum(skipped.values())} other files skipped: not images)" if skipped else ""
        raise DataSourceError(f"no image files found in {storage.describe(src)}{found}")
    records.sort(key=lambda r: r["index"])
    orphans = sorted({row[IMAGE_COL] for row in table.rows} - matched) if table is not None else []
    quarantine_lines = [q for r in records for q in r["quarantine"]]
    quarantine_lines += [{"image_index": name, "reason": "labels row without an image"} for name in orphans]
    inputs_seen = sum(r["inputs"] for r in records)
    written = sum(r["samples"] for r in records)
    quarantined = sum(len(r["quarantine"]) for r in records)
    if inputs_seen != written + quarantined:
        raise RuntimeError(f"prepare lost inputs: {inputs_seen} seen, {written} written, {quarantined} quarantined")
    manifest = {
        "format": shard_format.FORMAT_NAME,
        "version": shard_format.FORMAT_VERSION,
        "shard_format": "parquet",
        "preprocessing": {**asdict(params), "dtype": "uint8" if bits == 8 else "uint16", "channels": 1},
        "labels_file": table.path.name if table is not None else None,
        "salt_check": salt_fingerprint,  # tells whether a salt is this one (hf-medvis quarantine), reveals nothing of it
        "shards": [
            {"path": r["path"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
            for r in records
            if r["samples"] > 0
        ],
        "totals": {
            "files_seen": inputs_seen + sum(skipped.values()),
            "inputs_seen": inputs_seen,
            "written": written,
            "quarantined": quarantined,
            "skipped": sum(skipped.values()),
            "labels_rows_without_image": len(orphans),
            "shards": sum(1 for r in records if r["samples"] > 0),
            "shards_resumed": sum(1 for r in records if r.get("resumed")),
        },
        "skipped": skipped,  # reason -> count: files under SRC that are not images
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
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        pending = set()
        for job in jobs:
            pending.add(pool.submit(process_chunk, job))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                records.extend(f.result() for f in done)
        records.extend(f.result() for f in pending)
    return records


def _die_with_parent(parent_pid: int) -> None:
    """Pool worker initializer: a worker must not outlive a killed ``prepare`` (it would go on writing shards, then
    block forever on a result queue nobody reads). Linux: the kernel sends SIGKILL when the parent dies; elsewhere, and
    as a backstop, a thread checks every second whether the parent is still ours."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
