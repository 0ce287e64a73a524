"""``prepare``: raw images (folder, glob or fsspec URL) -> pre-sized grayscale Parquet shards + manifest + quarantine.

Layout under DST::

    manifest.json        written last: parameters, shard list (samples, bytes, sha256), totals, warnings, source
    README.md            the dataset card: ``datasets.load_dataset(DST)`` and the Hub read the shards as a dataset
    quarantine.jsonl     one JSON line per input that failed (its salted source hash, shard, reason) and per labels
                         row without an image (the labels file's Image Index)
    shards/shard-000000.parquet, shards/shard-000000.json (per-shard record), ...

Inputs are every file under SRC, listed in a deterministic order, streamed; files that are not images (no image
extension and no DICOM/PNG/JPEG/TIFF signature: DICOM files often have no extension or a UID for a name) are skipped and
counted per reason. The rest are cut into chunks of ``shard_size``; chunk ``i`` becomes shard ``i``. A shard and then its
record appear under their final names only when complete (temp + rename, or one atomic blob upload), so a re-run skips
every chunk whose record matches (same inputs, same parameters, same salt) and redoes the rest; the manifest lists only
shards whose record exists. Files seen = written + quarantined + skipped.

One dataset per location (``prepare_location``): a run holds the location's writer lock (a second one is refused), refuses
a location holding another source's dataset unless ``overwrite``, withdraws the manifest before it changes any shard and
removes every shard file it did not write before writing the manifest again, so the Parquet files there are always the
manifest's. A write failure (disk full, read-only) is one line; what is left are complete shards a re-run resumes from.

Privacy: shards hold a salted hash of the patient id, never the id; DICOM headers contribute only PatientID (hashed)
and ViewPosition; a source path is written only as a salted hash (``hf-medvis quarantine DST --src SRC`` maps the
quarantined hashes back to file names on the operator's terminal). No file name, date, institution or accession number
is written to DST or logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

from ..core import storage
from . import shard_format
from .dataset_card import dataset_card
from .decode import parse_windows
from .folder import DataSourceError, find_labels_file, iter_image_files
from .labels import (
    IMAGE_COL,
    LABEL_COL,
    PATIENT_COL,
    LabelsTable,
    parse_finding_labels,
    read_labels_table,
    sample_key,
)
from .labels.layouts import VIEW_ALIASES, LabelsFormat
from .location_lock import location_lock
from .pool import init_pool_worker
from .prepare_location import PreparedLocation, source_id
from .prepare_rows import VIEW_COL, PrepareParams, check_ct_input, decode_inputs
from .privacy import relative_path, resolve_salt, salt_check, source_root
from .provenance import data_origin

logger = logging.getLogger(__name__)
# Quarantine reasons of an input without labels (names that differ only in the extension are one sample).
NO_ROW, DUPLICATE_ROW = "no row in the labels file", "another file already has its labels row"
NO_MASK = "no mask (--masks_dir: no PNG with the image's stem; --masks_rle: no row with it as ImageId)"

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


def _fingerprint(job: dict) -> str:
    """What a shard's bytes depend on: the parameters, the salt (by its check value) and the chunk's inputs."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(job["params"]), sort_keys=True).encode())
    h.update(job["salt_check"].encode())
    for rel, _, row, missing, mask in job["inputs"]:
        h.update(f"\n{rel}\x00{json.dumps(row, sort_keys=True)}\x00{missing}".encode("utf-8", "surrogateescape"))
        if mask is not None:  # (added only with masks: shards prepared without them keep their fingerprints)
            h.update(f"\x00{json.dumps(mask, sort_keys=True)}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _load_record(dst: str, index: int, options: dict) -> dict | None:
    url = storage.join(dst, shard_format.sidecar_name(index))
    try:
        return json.loads(storage.read_bytes(url, options))
    except FileNotFoundError:
        return None
    except storage.StorageAccessError:
        raise  # the destination does not answer: not a damaged record
    except (ValueError, OSError):
        return None  # a damaged record is redone


def process_chunk(job: dict, location: PreparedLocation) -> dict:
    """Decodes one chunk into one shard (skipped when a matching record exists); returns the shard record."""
    fingerprint = _fingerprint(job)
    previous = _finished_record(job, fingerprint)
    if previous is not None:
        return previous
    rows, quarantine = decode_inputs(job)
    return _write_shard(location, job, fingerprint, rows, quarantine)


def _finished_record(job: dict, fingerprint: str) -> dict | None:
    """The record of this chunk's shard from an earlier run with the same inputs, parameters and salt, if complete."""
    dst, options = job["dst"], job["options"]
    previous = _load_record(dst, job["index"], options)
    if not previous or previous.get("fingerprint") != fingerprint:
        return None
    complete = previous["samples"] == 0 or storage.exists(storage.join(dst, previous["path"]), options)
    return {**previous, "resumed": True} if complete else None


def _write_shard(
    location: PreparedLocation, job: dict, fingerprint: str, rows: list[dict], quarantine: list[dict]
) -> dict:
    """Writes the shard, then its record (each under its final name only when complete); returns the record."""
    index = job["index"]
    record: dict[str, Any] = {
        "index": index,
        "path": shard_format.shard_name(index),
        "samples": len(rows),
        "inputs": len(job["inputs"]),
        "quarantine": quarantine,
        "fingerprint": fingerprint,
        "source_id": job["source_id"],  # whose dataset this is, for a run that finds the location without a manifest
        "salt_check": job["salt_check"],
    }
    if rows:
        data = shard_format.encode_shard(rows, job["params"].class_names, masks=bool(job["params"].mask_labels))
        record.update(bytes=len(data), sha256=shard_format.sha256_hex(data), pixel_stats=shard_format.pixel_stats(rows))
        location.write_shard_file(record["path"], data)
    location.write_shard_file(shard_format.sidecar_name(index), shard_format.dumps(record))
    return {**record, "resumed": False}


def _mask_source(
    masks_dir: str | None, masks_rle: str | None, mask_labels: str | Sequence[str] | None, storage_options: Any
) -> Any:
    """The ``masks.MaskSource`` of ``--masks_dir`` / ``--masks_rle`` (None without masks), read and checked up front."""
    if masks_dir is None and masks_rle is None:
        if mask_labels is not None:
            raise ValueError("--mask_labels names the classes of masks: give --masks_dir DIR or --masks_rle FILE too")
        return None
    if masks_dir is not None and masks_rle is not None:
        raise ValueError("give --masks_dir or --masks_rle, not both")
    from .masks import MaskSource, read_rle_table, resolve_mask_labels  # only a prepare with masks imports them

    where = masks_dir if masks_dir is not None else masks_rle
    options = storage.storage_options_for(where, storage_options)
    rle = read_rle_table(masks_rle, options) if masks_rle is not None else None
    classes = resolve_mask_labels(mask_labels, masks_dir, rle is not None, options)
    return MaskSource(classes, masks_dir, masks_rle, rle, options)


def _input_mask(masks: Any, rel: str, path: str, root: str) -> dict | None:
    """What a worker needs to read an input's mask: ``{"path": PNG}`` or ``{"rle": [EncodedPixels, ...]}``; None when
    the input has none."""
    ref = masks.find(sample_key(rel), path, root)
    if ref is None:
        return None
    return {"rle": masks.rle[ref]} if masks.rle is not None else {"path": ref}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _class_names(table: LabelsTable | None) -> tuple[str, ...]:
    """The ``labels`` column's ClassLabel names: a wide file's class columns, else every finding named, sorted."""
    if table is None:
        return ()
    if table.classes:
        return tuple(table.classes)
    return tuple(sorted({name for row in table.rows for name in parse_finding_labels(row.get(LABEL_COL))}))


def _read_labels(
    labels: str | None, src: str, labels_format: LabelsFormat | None
) -> tuple[LabelsTable | None, list[str]]:
    found = find_labels_file(src)
    path = labels or (str(found) if found else None)
    if not path:
        return None, []
    table = read_labels_table(path, labels_format=labels_format)
    warnings = list(table.warnings)
    for column in (LABEL_COL, PATIENT_COL, VIEW_COL):
        if not any(row.get(column) for row in table.rows):
            warnings.append(f"labels file has no '{column}' values: that field is empty for every sample")
    fmt = labels_format or LabelsFormat()
    used = (
        KNOWN_COLUMNS
        | set(VIEW_ALIASES)
        | set(table.classes)
        | {fmt.group_column(), fmt.image_column("wide", table.columns)}
    )
    unknown = [c for c in table.columns if c not in used]
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
    labels_format: LabelsFormat | None = None,
    channels: int = 1,
    windows: Sequence[Any] | None = None,
    overwrite: bool = False,
    masks_dir: str | None = None,
    masks_rle: str | None = None,
    mask_labels: str | Sequence[str] | None = None,
) -> dict:
    """Prepares shards from ``src`` into ``dst`` and returns the manifest (also written to ``dst/manifest.json``).

    ``dst`` holding another dataset (another source or salt) is refused unless ``overwrite``; a second writer of ``dst``
    at the same time is refused (``LocationBusyError``); a full or read-only ``dst`` is a ``DestinationWriteError``; a
    source from which no image could be prepared is a ``NothingPreparedError`` (raised after the quarantine report and
    the manifest are written, so that ``hf-medvis quarantine`` can name the files). All are one-line ``ValueError``s.

    ``masks_dir`` (PNG class-index masks, the image's stem) or ``masks_rle`` (SIIM-ACR CSV), with ``mask_labels`` or
    the folder's ``classes.json`` (``masks.resolve_mask_labels``): each image's mask is stored in its row (``mask``),
    resized as the pixels are but nearest-neighbour; an image whose mask is missing or does not fit is quarantined."""
    if shard_format_name != "parquet":
        raise ValueError(f"unsupported --format {shard_format_name!r}: only 'parquet' (see docs/data_plane.md)")
    if bits not in (8, 16):
        raise ValueError(f"--bits must be 8 or 16, got {bits}")
    if size < 16:
        raise ValueError(f"--size must be >= 16, got {size}")
    pairs = tuple(parse_windows(windows) or ())
    if channels not in (1, 3) or (pairs and len(pairs) not in (1, 3)):
        raise ValueError(f"--channels must be 1 or 3 and --windows 1 or 3 windows, got {channels} and {len(pairs)}")
    stored_channels = len(pairs) if pairs else channels
    if stored_channels == 3 and bits != 8:
        raise ValueError("colour and multi-window images are stored as 8-bit: use --bits 8")
    if shard_size < 1 or workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    masks = _mask_source(masks_dir, masks_rle, mask_labels, storage_options)  # read and checked before any work
    salt = resolve_salt(salt)
    salt_fingerprint = salt_check(salt)
    in_options = storage.storage_options_for(src, storage_options)
    out_options = storage.storage_options_for(
        dst, dst_storage_options if dst_storage_options is not None else storage_options
    )
    table, warnings = _read_labels(labels, src, labels_format)
    if pairs:
        check_ct_input(iter_image_files(src, in_options), src, in_options)
    params = PrepareParams(
        size=size,
        bits=bits,
        shard_size=shard_size,
        class_names=_class_names(table),
        channels=channels if not pairs else 1,
        windows=pairs,
        mask_labels=masks.classes if masks is not None else (),
    )
    location = PreparedLocation(dst, out_options)
    with contextlib.ExitStack() as held:
        with location.writing("creating the folder and its writer lock"):
            storage.make_dirs(dst, out_options)
            location.lock = held.enter_context(location_lock(dst, out_options, "hf-medvis prepare"))
        source = source_id(src, salt)
        location.claim(source, salt_fingerprint, overwrite)
        return _prepare_into(
            location, src, in_options, table, warnings, params, salt, source, workers, stored_channels, masks
        )


def _prepare_into(
    location: PreparedLocation,
    src: str,
    in_options: dict,
    table: LabelsTable | None,
    warnings: list[str],
    params: PrepareParams,
    salt: str,
    source: str,
    workers: int,
    stored_channels: int,
    masks: Any = None,
) -> dict:
    """The shards, then the card, the quarantine report and the manifest, into a location this run holds."""
    dst, out_options, salt_fingerprint = location.dst, location.options, salt_check(salt)
    matched: set[str] = set()
    claimed: dict[str, str] = {}  # labels row -> the file that matched it first
    skipped: dict[str, int] = {}
    root = source_root(src)

    def skip(path: str, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def jobs() -> Iterator[dict]:
        listing = iter_image_files(src, in_options, on_skip=skip)
        for index, chunk in enumerate(_chunks(listing, params.shard_size)):
            inputs = []
            for path in chunk:
                rel = relative_path(path, root)
                row = table.match(rel) if table is not None else None
                duplicate = row is not None and claimed.setdefault(row[IMAGE_COL], rel) != rel
                if duplicate:
                    row = None  # the row's first file has it: a second would be a second copy of the sample
                if row is not None:
                    matched.add(row[IMAGE_COL])
                unlabelled = DUPLICATE_ROW if duplicate else NO_ROW if table is not None and row is None else None
                mask = None
                if masks is not None:
                    mask = _input_mask(masks, rel, path, root)
                    unlabelled = unlabelled or (NO_MASK if mask is None else None)
                inputs.append((rel, path, row, unlabelled, mask))
            yield {
                "dst": dst,
                "index": index,
                "inputs": inputs,
                "params": params,
                "salt": salt,
                "salt_check": salt_fingerprint,
                "source_id": source,
                "options": out_options,
                "input_options": in_options,
            }

    records = _run(jobs(), workers, location)
    if not records:
        found = f" ({sum(skipped.values())} other files skipped: not images)" if skipped else ""
        raise DataSourceError(f"no image files found in {storage.describe(src)}{found}")
    records.sort(key=lambda r: r["index"])
    # Every shard file of an earlier run that this one did not write goes before the manifest names the set.
    location.remove_strays(
        {shard_format.sidecar_name(r["index"]) for r in records} | {r["path"] for r in records if r["samples"] > 0}
    )
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
        "preprocessing": {
            **asdict(params),
            "dtype": "uint8" if params.bits == 8 else "uint16",
            "channels": stored_channels,
        },
        "normalization": shard_format.normalization(records),  # per-channel mean/std of the stored pixels in [0, 1]
        "labels_file": table.path.name if table is not None else None,
        "source": data_origin(src, in_options),  # e.g. synthetic phantoms; None for user data
        "source_id": source,  # salted hash of the source location: whose dataset this location holds
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
            "shards_resumed": sum(1 for r in records if r.get("resumed") and r["samples"] > 0),
        },
        "skipped": skipped,  # reason -> count: files under SRC that are not images
        "warnings": warnings,
        "quarantine_report": shard_format.QUARANTINE_NAME,
    }
    report = "".join(json.dumps(line, sort_keys=True) + "\n" for line in quarantine_lines).encode()
    # The manifest is the commit point (written last): readers only ever see shards it lists, all complete.
    location.commit(dataset_card(manifest).encode(), report, shard_format.dumps(manifest))
    if written == 0:
        raise NothingPreparedError(
            f"none of the {inputs_seen} images under {storage.describe(src)} could be prepared: "
            f"{_top_reasons(quarantine_lines)}; which files: hf-medvis quarantine {storage.describe(dst)} "
            f"--src {storage.describe(src)}"
        )
    return manifest


class NothingPreparedError(DataSourceError):
    """A source with images none of which could be prepared: the top reasons, in one line."""


def _top_reasons(quarantine_lines: list[dict], top: int = 3) -> str:
    """``12 x CT windows need ...; 3 x empty file`` from the quarantine entries (a reason's details after its first
    ': ' are left out, so that one cause with many variants counts once)."""
    counts = Counter(
        " ".join(str(line["reason"]).split()).split(": ", 1)[0] for line in quarantine_lines if "source_hash" in line
    )
    text = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(top))
    return text + (f"; {len(counts) - top} other reason(s)" if len(counts) > top else "")


# Inputs per task of the worker pool: small enough that N workers share even a single shard, large enough that
# sending the task and its rows between processes stays a small part of decoding it.
SLICE_SIZE = 16


def _run(jobs: Iterator[dict], workers: int, location: PreparedLocation) -> list[dict]:
    if workers == 1:
        return [process_chunk(job, location) for job in jobs]
    records: list[dict] = []
    # Workers decode slices of every shard (a shard is no longer the unit of parallelism: 2 shards keep 8 workers busy);
    # this process checks which shards an earlier run finished and writes each shard once its slices are in, in order.
    # Spawned, not forked: a fork after this process used torch's or Arrow's threads can deadlock the child.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_pool_worker,
        initargs=(os.getpid(),),
    )
    in_flight: deque[tuple[dict, str, list[Future]]] = deque()
    with pool:
        for job in jobs:
            fingerprint = _fingerprint(job)
            previous = _finished_record(job, fingerprint)
            if previous is not None:
                records.append(previous)
                continue
            slices = [job["inputs"][i : i + SLICE_SIZE] for i in range(0, len(job["inputs"]), SLICE_SIZE)]
            in_flight.append((job, fingerprint, [pool.submit(decode_inputs, {**job, "inputs": s}) for s in slices]))
            # Bounded: the listing is consumed as shards finish, and at most about two shards' rows wait in memory.
            while sum(len(futures) for _, _, futures in in_flight) > 4 * workers and len(in_flight) > 1:
                records.append(_collect(location, *in_flight.popleft()))
        while in_flight:
            records.append(_collect(location, *in_flight.popleft()))
    return records


def _collect(location: PreparedLocation, job: dict, fingerprint: str, futures: list[Future]) -> dict:
    rows: list[dict] = []
    quarantine: list[dict] = []
    for future in futures:
        slice_rows, slice_quarantine = future.result()
        rows += slice_rows
        quarantine += slice_quarantine
    return _write_shard(location, job, fingerprint, rows, quarantine)
