"""Raw image folders: list files (local folder, glob, or fsspec URL), attach NIH-style labels, and build a
``datasets.Dataset`` whose rows decode lazily. For small data; large sets go through prepared shards."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import torch

from ..core import storage
from .decode import ImageDecodeError, looks_like_image, read_image
from .labels import IMAGE_COL, IMAGE_EXTENSIONS, LABEL_COL, PATIENT_COL, read_labels_table, sample_key
from .labels.layouts import LabelsFormat
from .privacy import patient_group, relative_path, source_root
from .transforms import apply_image_transform, to_uint8_tensor

logger = logging.getLogger(__name__)


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
        where = f"listing {storage.describe(root)}"
        if storage.with_retries(lambda: fs.isfile(path), where):
            yield f"{protocol}://{path}", fs
            return
        full_pattern = pattern.split("://", 1)[1] if pattern else None
        # Folder by folder, each listing retried (fs.walk is a generator: a blip mid-walk would end the listing).
        pending = [path]
        while pending:
            folder = pending.pop()
            entries = storage.with_retries(lambda folder=folder: fs.ls(folder, detail=True), where)
            subfolders = sorted(e["name"] for e in entries if e["type"] == "directory")
            pending.extend(reversed(subfolders))  # depth first, names in order
            for full in sorted(e["name"] for e in entries if e["type"] != "directory"):
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


# The end of every complete PNG (the IEND chunk and its CRC) and JPEG (end-of-image marker): a copy cut short lacks it.
_END_MARKERS = {b"\x89PNG": b"IEND\xaeB`\x82", b"\xff\xd8\xff": b"\xff\xd9"}
_TAIL_BYTES = 256  # trailing bytes searched for the end marker (some writers pad after it)
# Source paths may carry patient names: the leading "_" keeps the file out of Trainer.push_to_hub (it skips "_*").
SKIPPED_IMAGES_NAME = "_skipped_images.jsonl"


def image_file_problem(path: str, fs: Any = None, storage_options: dict | None = None) -> str | None:
    """Why the image file ``path`` cannot be trained on, or None: read before the first step, so that a run never
    meets it mid-way. Costs a read of the first and last bytes of most files: an empty file, one without an image
    signature (a text file named ``.png``), or a PNG/JPEG without its end marker (a copy cut short) is then decoded in
    full to decide, and the decoder's reason (the one ``prepare`` quarantines with) is returned."""
    try:
        if fs is None:
            with open(path, "rb") as f:
                head = f.read(132)
                size = f.seek(0, os.SEEK_END)
                f.seek(max(size - _TAIL_BYTES, 0))
                tail = f.read()
        else:
            inner = path.split("://", 1)[1]
            size = fs.size(inner)
            head = fs.cat_file(inner, start=0, end=min(132, size)) if size else b""
            tail = fs.cat_file(inner, start=max(size - _TAIL_BYTES, 0), end=size) if size else b""
    except OSError as err:
        return f"cannot read: {type(err).__name__} ({err.strerror or err})"
    if not head:
        return "empty file (0 bytes)"
    end = next((marker for magic, marker in _END_MARKERS.items() if head.startswith(magic)), None)
    if looks_like_image(head) and (end is None or end in tail):
        return None
    if not looks_like_image(head) and path.lower().endswith((".dcm", ".dicom")):
        return None  # an old ACR-NEMA file without the DICM preamble: decode.py parses it leniently when it is read
    try:
        read_image(path, storage_options=storage_options)
    except ImageDecodeError as err:
        return err.reason
    return None


def check_image_files(
    files: list[str], source: str | os.PathLike, storage_options: dict | None = None
) -> tuple[list[str], list[dict[str, str]]]:
    """(files that can be decoded, ``{"path", "reason"}`` of the others, paths relative to ``source``), each file
    checked by ``image_file_problem`` on a pool of threads (the work is reading a few bytes, remote or local)."""
    text = os.fspath(source)
    fs = storage.filesystem(text.split("*", 1)[0], storage_options)[0] if "://" in text else None
    with ThreadPoolExecutor(max_workers=32 if fs is not None else 8) as pool:
        problems = list(pool.map(lambda file: image_file_problem(file, fs, storage_options), files))
    root = source_root(text)
    good = [file for file, problem in zip(files, problems, strict=True) if problem is None]
    bad = [
        {"path": relative_path(file, root), "reason": problem}
        for file, problem in zip(files, problems, strict=True)
        if problem is not None
    ]
    if bad:
        reasons = Counter(entry["reason"].split(":", 1)[0] for entry in bad)
        logger.warning(
            "%s: %d of %d image file(s) skipped, they cannot be decoded (%s); each is listed with its reason in %s "
            "in the output folder",
            storage.describe(text),
            len(bad),
            len(files),
            ", ".join(f"{count} {reason}" for reason, count in reasons.most_common()),
            SKIPPED_IMAGES_NAME,
        )
    if not good:
        raise DataSourceError(f"none of the {len(files)} image files in {storage.describe(text)} can be decoded")
    return good, bad


def write_skipped_images(output_dir: str | os.PathLike, skipped: list[dict[str, str]]) -> None:
    """``output_dir/_skipped_images.jsonl`` (``SKIPPED_IMAGES_NAME``): one ``{"path", "reason"}`` line per image file a
    run left out (nothing is written when none)."""
    if skipped:
        text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in skipped)
        storage.write_text_atomic(storage.join(os.fspath(output_dir), SKIPPED_IMAGES_NAME), text)


def build_folder_records(
    source: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    labels_format: LabelsFormat | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> dict[str, list[Any]]:
    """Columns ``path``, ``key``, ``group`` (hashed patient id, or the file's key when unknown) and
    ``finding_labels`` (canonical text: ``labels.layouts``). Files are matched to labels rows by the trailing part of
    their path. Files that cannot be decoded are left out (``check_image_files``) and added to ``skipped``.

    Keys are unique: a labelled file's is its row's ``sample_key``, another's its path under ``source`` without the
    image extension (with it, for files that differ only in the extension). Two files matching one labels row
    (``a.png`` and ``a.dcm`` for a row ``a.png``) are refused: one of them would be a second copy of the sample."""
    files, bad = check_image_files(list_image_files(source, storage_options), source, storage_options)
    if skipped is not None:
        skipped.extend(bad)
    labels_path = labels_file or find_labels_file(source)
    table = read_labels_table(labels_path, labels_format=labels_format) if labels_path else None
    root = source_root(str(source))
    records: dict[str, list[Any]] = {"path": [], "key": [], "group": [], "finding_labels": []}
    claimed: dict[str, str] = {}  # labels row -> the file that matched it
    unlabelled_keys: Counter[str] = Counter()
    for file in files:
        rel = relative_path(file, root)
        row = table.match(rel) if table is not None else None
        if row is not None:
            other = claimed.setdefault(row[IMAGE_COL], rel)
            if other != rel:
                raise DataSourceError(
                    f"'{other}' and '{rel}' both match the labels row '{row[IMAGE_COL]}' in {storage.describe(source)}: "
                    "keep one file per image (names that differ only in the extension are one sample)"
                )
            key = sample_key(row[IMAGE_COL])
        else:
            key = sample_key(rel)
            unlabelled_keys[key] += 1
        group = row.get(PATIENT_COL) if row else None
        records["path"].append(file)
        records["key"].append(key)
        records["group"].append(patient_group(group if group else key))
        records["finding_labels"].append(row.get(LABEL_COL) if row else None)
    if any(count > 1 for count in unlabelled_keys.values()):  # a.png and a.dcm without labels: two samples
        for i, (file, labels) in enumerate(zip(records["path"], records["finding_labels"], strict=True)):
            if labels is None and unlabelled_keys[records["key"][i]] > 1:
                records["key"][i] = relative_path(file, root)
    return records


def dataset_from_records(
    records: dict[str, list[Any]], image_transform: Callable | None = None, storage_options: dict | None = None
) -> datasets.Dataset:
    """A ``datasets.Dataset`` of file references; with ``image_transform`` rows decode on access (``pixel_values``)."""
    dataset = datasets.Dataset.from_dict(records)
    if image_transform is not None:
        dataset = dataset.with_transform(make_decode_transform(image_transform, storage_options, records))
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


def make_decode_transform(
    image_transform: Callable, storage_options: dict | None = None, records: dict[str, list[Any]] | None = None
) -> Callable:
    """A batched ``datasets`` transform: read_image -> uint8 [1, H, W] (cached, ``DecodedImageCache``) ->
    ``image_transform`` -> ``pixel_values``.

    With ``records`` (the dataset's own columns), an image that fails to decode although it passed
    ``check_image_files`` (corrupt bytes between an intact start and end) does not stop the run: its row is replaced
    by the next decodable row of ``records`` (all columns, labels included, so batches keep their size and an epoch
    its length; the choice is deterministic, so a resumed run makes the same one), with one WARNING per file and
    process naming it."""
    cache = DecodedImageCache()
    failed: dict[str, str] = {}  # path -> reason, in this process
    position: dict[str, int] = {}

    def decode(path: str) -> torch.Tensor:
        # Bytes go through fsspec/adlfs with our storage options: datasets' own Image feature loses them for az://.
        return to_uint8_tensor(read_image(path, storage_options=storage_options))

    def decode_or_fail(path: str) -> torch.Tensor | None:
        if path in failed:
            return None
        try:
            return cache.get(path, decode)
        except ImageDecodeError as err:
            if records is None:
                raise
            failed[path] = err.reason
            logger.warning(
                "%s: %s; this run uses another image of the set in its place (fix or remove the file)",
                storage.describe(path),
                err.reason,
            )
            return None

    def replacement(path: str) -> tuple[int, torch.Tensor]:
        assert records is not None
        if not position:
            position.update((p, i) for i, p in enumerate(records["path"]))
        start, count = position[path], len(records["path"])
        for step in range(1, count):
            candidate = (start + step) % count
            image = decode_or_fail(records["path"][candidate])
            if image is not None:
                return candidate, image
        raise DataSourceError(f"none of the {count} images of the set can be decoded")

    def transform(batch: dict[str, list]) -> dict[str, list]:
        batch = {column: list(values) for column, values in batch.items()}
        pixels = []
        for i, path in enumerate(list(batch["path"])):
            image = decode_or_fail(path)
            if image is None:
                index, image = replacement(path)
                for column in batch.keys() & records.keys():  # type: ignore[union-attr]
                    batch[column][i] = records[column][index]  # type: ignore[index]
            key = (batch.get("key") or batch["path"])[i]  # per-sample seeds (SeededAugmentation) follow the key
            pixels.append(apply_image_transform(image_transform, image, key))
        batch["pixel_values"] = pixels
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
