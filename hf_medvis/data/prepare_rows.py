"""One input file -> one shard row: the per-image work of ``prepare``, run in its pool workers. Imports only what
decoding needs, so that a spawned worker starts in seconds."""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import storage
from . import shard_format
from .decode import ImageDecodeError, read_dicom_header, read_image
from .labels import (
    IMAGE_COL,
    LABEL_COL,
    PATIENT_COL,
    is_labelled,
    normalize_patient_id,
    parse_finding_labels,
    sample_key,
)
from .labels.layouts import VIEW_COL
from .privacy import patient_group, salted_hash

logger = logging.getLogger(__name__)

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
    class_names: tuple[str, ...] = ()  # the ``labels`` ClassLabel names: every finding in the labels file
    channels: int = 1  # 3: colour kept (RGB), stored as binary PPM
    windows: tuple[tuple[float, float], ...] = ()  # CT windows (center, width): one channel each (1 or 3 of them)
    mask_labels: tuple[str, ...] = ()  # with masks (--masks_dir / --masks_rle): the mask classes, index = value


def resize_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Float [0, 1] H x W (or H x W x C) -> float size x size (x C), per RESIZE_POLICY: exactly torchvision's v2
    ``resize`` (shorter side, bilinear, antialiased) + ``center_crop``, computed with torch alone (tests/test_prepare.py
    compares them bit for bit), so that pool workers start without importing torchvision (3 s each)."""
    (new_height, new_width), (top, left) = _square_geometry(image.shape[:2], size)
    array = np.ascontiguousarray(image, dtype=np.float32)
    tensor = torch.from_numpy(array)[None, None] if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)[None]
    tensor = torch.nn.functional.interpolate(
        tensor, size=(new_height, new_width), mode="bilinear", align_corners=False, antialias=True
    )[0]
    out = tensor[:, top : top + size, left : left + size].clamp_(0.0, 1.0)
    return out[0].numpy() if array.ndim == 2 else out.permute(1, 2, 0).contiguous().numpy()


def _square_geometry(shape: tuple[int, int], size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """RESIZE_POLICY's geometry for an image of ``shape`` (H, W): the resized (H, W) and the crop's (top, left)."""
    height, width = shape
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    return (new_height, new_width), (int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0)))


def resize_mask_to_square(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] class indices -> [size, size]: the same geometry as ``resize_to_square`` with nearest-neighbour
    (torchvision v2 ``resize`` of a ``tv_tensors.Mask``: class values are never blended)."""
    (new_height, new_width), (top, left) = _square_geometry(mask.shape, size)
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=(new_height, new_width), mode="nearest")[0, 0]
    return resized[top : top + size, left : left + size].numpy().astype(np.uint8)


def load_input_mask(
    mask: dict, params: PrepareParams, image_shape: tuple[int, int], source: str, source_hash: str, options: dict
) -> np.ndarray:
    """An input's mask (``{"path": PNG}`` or ``{"rle": [EncodedPixels, ...]}``) checked against its image's (H, W) and
    the classes by ``masks.MaskSource.load``; an ``ImageDecodeError`` (quarantined) without file names otherwise."""
    # Imported here: only a prepare with masks pays for the masks module's imports in its workers.
    from .masks import RLE_IMAGE_COL, MaskError, MaskSource

    ref = mask.get("path", "row")
    loader = MaskSource(params.mask_labels, rle_file="FILE", rle={ref: mask["rle"]} if "rle" in mask else None,
                        storage_options=options)  # fmt: skip
    try:
        return loader.load(ref, image_shape, source)
    except MaskError as err:
        # quarantine.jsonl names inputs by salted hash only: the message's paths (or RLE ImageId) are left out.
        reason = str(err).replace(f"{loader.where}, {RLE_IMAGE_COL} {ref}", "RLE")
        for path in (ref, source):
            reason = reason.replace(f" {storage.describe(path)}", "")
        raise ImageDecodeError(source_hash, reason) from None


def quantize(image: np.ndarray, bits: int) -> np.ndarray:
    """Float [0, 1] pixels -> uint8 or uint16."""
    if bits == 8:
        return np.round(image * 255.0).astype(np.uint8)
    return np.round(image * 65535.0).astype(np.uint16)


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


def process_input(
    source: str, rel: str, row: dict | None, params: PrepareParams, salt: str, options: dict, mask: dict | None = None
) -> dict:
    """One input -> one shard row (with its ``mask`` when given: see ``load_input_mask``); raises ImageDecodeError for
    anything that cannot become an image, or a mask that does not fit it."""
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
    image = read_image(data, window=params.window, channels=params.channels, windows=params.windows or None)
    if image.ndim == 3 and image.shape[2] == 1:  # one CT window: a grey image
        image = image[..., 0]
    dicom_patient, dicom_view = _dicom_fields(data)
    patient = normalize_patient_id((row or {}).get(PATIENT_COL) or dicom_patient)
    name = (row or {}).get(IMAGE_COL)
    resized = resize_to_square(image, params.size)
    finding_labels = (row or {}).get(LABEL_COL) if is_labelled((row or {}).get(LABEL_COL)) else None
    class_index = {name: i for i, name in enumerate(params.class_names)}
    out = {
        # The labels file's image name is the public sample id (NIH-style, already de-identified); without it,
        # the salted source hash (a file name may carry a patient name).
        "key": sample_key(name) if name else source_hash,
        "group": patient_group(patient, salt) if patient else f"src-{source_hash}",
        "finding_labels": finding_labels,
        "labels": None if finding_labels is None else [class_index[n] for n in parse_finding_labels(finding_labels)],
        "view_position": ((row or {}).get(VIEW_COL) or dicom_view or None),
        "source_hash": source_hash,
        "orig_height": int(image.shape[0]),
        "orig_width": int(image.shape[1]),
        "height": params.size,
        "width": params.size,
        "bits": params.bits,
        "image": {"bytes": shard_format.encode_pgm(quantize(resized, params.bits)), "path": None},
    }
    if mask is not None:
        classes = load_input_mask(mask, params, image.shape[:2], source, source_hash, options)
        out["mask"] = {"bytes": shard_format.encode_pgm(resize_mask_to_square(classes, params.size)), "path": None}
    return out


# Inputs checked before a --windows run starts: a CT series is CT from its first file, and a folder of X-rays would
# otherwise cost a full decode pass to end with every input quarantined.
CT_CHECK_INPUTS = 5
_RASTER_KINDS = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def check_ct_input(inputs: Iterable[str], src: str, options: dict) -> None:
    """``--windows`` needs CT DICOM (Hounsfield units): refused before any work when none of the first ``inputs`` (the
    listing of ``src``) is."""
    kinds: list[str] = []
    for path in itertools.islice(inputs, CT_CHECK_INPUTS):
        try:
            data = storage.read_bytes(path, options) if "://" in path else Path(path).read_bytes()
        except OSError:
            continue  # unreadable: quarantined later, with its reason
        dicom = data[128:132] == b"DICM"  # its 128-byte preamble may well start like a TIFF
        kind = None if dicom else next((name for magic, name in _RASTER_KINDS if data.startswith(magic)), None)
        if kind is None:
            try:
                modality = str(read_dicom_header(data, strict=False).get("Modality", "") or "").strip().upper()
                kind = f"DICOM {modality or 'without Modality'}"
            except ImageDecodeError:
                kind = "unreadable"
        if kind == "DICOM CT":
            return
        kinds.append(kind or "unreadable")
    if kinds:
        found = ", ".join(f"{n} {kind}" for kind, n in Counter(kinds).most_common())
        raise ValueError(
            f"--windows needs CT DICOM images (Hounsfield units), but the first {len(kinds)} input(s) under "
            f"{storage.describe(src)} are {found}: leave out --windows for X-ray, MR or photographic images"
        )


def decode_inputs(job: dict) -> tuple[list[dict], list[dict]]:
    """(shard rows, quarantine entries) for ``job["inputs"]``, in input order: all of a chunk, or one slice of it."""
    index, params, salt = job["index"], job["params"], job["salt"]
    rows, quarantine = [], []
    for rel, source, row, missing, mask in job["inputs"]:
        # Entries name the input by its salted hash only: a file name may carry a patient's name or MRN.
        entry = {"source_hash": salted_hash(rel, salt, "source"), "shard": index}
        if missing:  # the reason this input has no labels row
            quarantine.append({**entry, "reason": missing})
            continue
        try:
            rows.append(process_input(source, rel, row, params, salt, job["input_options"], mask))
        except ImageDecodeError as err:
            quarantine.append({**entry, "reason": err.reason})
        except Exception as err:  # nothing crashes mid-run: an unexpected failure quarantines that input only
            logger.error("unexpected %s on input %s (shard %d)", type(err).__name__, entry["source_hash"], index)
            logger.debug("traceback", exc_info=True)  # may quote the file name: debug level only
            quarantine.append({**entry, "reason": f"unexpected error: {type(err).__name__}"})
    return rows, quarantine
