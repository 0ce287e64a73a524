"""Segmentation masks in the data plane: a mask folder beside the images (``--masks_dir``: one PNG of class indices per
image, same stem, ``classes.json`` naming the indices) or run-length encoded masks in a CSV in the SIIM-ACR pneumothorax
layout (``--masks_rle``), checked before the first step and split by patient. ``build.build_datasets(data_args,
"segmentation")`` is the front door; its examples are ``{"pixel_values": uint8 [C, S, S], "labels": int64 [S, S],
"patient": salted hash}``.

Class index 0 is the background; ``IGNORE_INDEX`` (255) marks unlabelled pixels (ignored by the loss and the metrics).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

import datasets
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.errors import InvalidDicomError

from ..core import storage
from ..core.tasks import SEGMENTATION
from . import shard_format
from .arguments import SegmentationDataArguments
from .decode import read_image
from .folder import (
    SKIPPED_IMAGES_NAME,
    DataSourceError,
    DecodedImageCache,
    build_folder_records,
    iter_image_files,
    only_listed_images,
)
from .labels import IMAGE_COL, read_labels_table, sample_key
from .phantoms import MASK_CLASSES_FILE, MASKS_DIR, ensure_phantom_dataset
from .privacy import relative_path, source_root
from .shard_dataset import load_shard_table
from .splits import check_patient_disjoint, stratified_group_assignment
from .streaming import find_manifest
from .train_eval import ResolvedSource, resolve_train_source
from .transforms import IGNORE_INDEX, SeededAugmentation, apply_image_transform, create_transform, to_uint8_tensor

logger = logging.getLogger(__name__)
T = TypeVar("T")

RLE_IMAGE_COL, RLE_PIXELS_COL = "ImageId", "EncodedPixels"  # SIIM-ACR train-rle.csv (its header has " EncodedPixels")
RLE_DEFAULT_CLASSES = ("background", "foreground")


class MaskError(DataSourceError):
    """A mask that cannot be used: wrong size, a value outside the classes, undecodable, a bad RLE string."""


# ---- class names -----------------------------------------------------------------------------------------------------


def resolve_mask_labels(
    mask_labels: str | Sequence[str] | None,
    masks_dir: str | None = None,
    rle: bool = False,
    storage_options: dict | None = None,
) -> tuple[str, ...]:
    """The class names, index = position: ``mask_labels`` ("background,lung,..." or a list), else ``classes.json`` in
    ``masks_dir`` (a JSON list of names), else (RLE) ``RLE_DEFAULT_CLASSES``."""
    if mask_labels is not None:
        names = mask_labels.split(",") if isinstance(mask_labels, str) else list(mask_labels)
        where = "--mask_labels"
    elif masks_dir is not None:
        where = storage.join(masks_dir, MASK_CLASSES_FILE)
        try:
            names = json.loads(storage.read_bytes(where, storage_options))
        except FileNotFoundError:
            raise MaskError(
                f"no {MASK_CLASSES_FILE} in {storage.describe(masks_dir)}: name the classes with --mask_labels "
                "background,NAME,... (index = position)"
            ) from None
        except ValueError as err:
            raise MaskError(f"{storage.describe(where)} is not JSON: {err}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MaskError(
                f'{storage.describe(where)} must be a JSON list of class names, e.g. ["background", "lung"]'
            )
        where = storage.describe(where)
    else:
        names = list(RLE_DEFAULT_CLASSES) if rle else []
        where = "the classes"
    names = [name.strip() for name in names]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise MaskError(f"{where}: need at least two distinct, non-empty class names (background first), got {names}")
    if len(names) > IGNORE_INDEX:
        raise MaskError(f"{where}: at most {IGNORE_INDEX} classes ({IGNORE_INDEX} marks unlabelled pixels)")
    if rle and len(names) != 2:
        raise MaskError(f"{where}: an RLE mask has one foreground class, so two names (background,NAME), got {names}")
    return tuple(names)


# ---- run-length encoding (SIIM-ACR) ------------------------------------------------------------------------------------


def decode_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """One SIIM-ACR ``EncodedPixels`` string -> uint8 [height, width] mask (1 inside the runs). The layout of SIIM's
    ``mask_functions.rle2mask``: pairs (start, length) where each start counts from the end of the previous run,
    pixels numbered column by column (column-major); "-1" (or nothing) is an empty mask. ValueError on a bad string."""
    text = encoded.strip()
    if text in ("", "-1"):
        return np.zeros((height, width), dtype=np.uint8)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise ValueError("not a list of integers") from None
    if len(values) % 2:
        raise ValueError(f"{len(values)} numbers: (start, length) pairs need an even count")
    if (values < 0).any():
        raise ValueError("negative start or length")
    lengths = values[1::2]
    ends = np.cumsum(values[0::2] + lengths)  # one past each run's last pixel
    if ends[-1] > height * width:
        raise ValueError(f"the runs reach pixel {int(ends[-1])}, beyond the {width}x{height} image")
    change = np.zeros(height * width + 1, dtype=np.int32)
    np.add.at(change, ends - lengths, 1)
    np.add.at(change, ends, -1)
    flat = (np.cumsum(change[:-1]) > 0).astype(np.uint8)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def read_rle_table(path: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """``ImageId -> [EncodedPixels, ...]`` of an RLE CSV (several rows of one image: its masks, united later)."""
    try:
        text = storage.read_bytes(path, storage_options).decode("utf-8-sig")
    except FileNotFoundError:
        raise MaskError(f"--masks_rle file not found: {storage.describe(path)}") from None
    reader = csv.reader(io.StringIO(text))
    header = [name.strip() for name in next(reader, [])]
    if RLE_IMAGE_COL not in header or RLE_PIXELS_COL not in header:
        raise MaskError(
            f"--masks_rle {storage.describe(path)}: needs the columns {RLE_IMAGE_COL}, {RLE_PIXELS_COL} (SIIM-ACR "
            f"layout), found {', '.join(header) or 'none'}"
        )
    image_at, pixels_at = header.index(RLE_IMAGE_COL), header.index(RLE_PIXELS_COL)
    table: dict[str, list[str]] = {}
    for row in reader:
        if row:
            table.setdefault(row[image_at].strip(), []).append(row[pixels_at])
    if not table:
        raise MaskError(f"--masks_rle {storage.describe(path)} has no rows")
    return table


# ---- where each image's mask is ---------------------------------------------------------------------------------------


@dataclass
class MaskSource:
    """The masks of a set of images: a folder of PNGs (``masks_dir``) or an RLE table (``rle``, from ``rle_file``).
    A record's ``mask`` column holds the reference ``find`` returns: a mask file's path, or an RLE ImageId."""

    classes: tuple[str, ...]
    masks_dir: str | None = None
    rle_file: str | None = None
    rle: dict[str, list[str]] | None = None
    storage_options: dict | None = None
    _by_key: dict[str, str] = field(default_factory=dict, repr=False)
    _by_name: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.masks_dir is not None:
            root = source_root(self.masks_dir)
            for path in iter_image_files(self.masks_dir, self.storage_options):
                key = sample_key(relative_path(path, root))
                self._by_key[key] = path
                self._by_name.setdefault(PurePosixPath(key).name, []).append(path)

    @property
    def where(self) -> str:
        return storage.describe(self.masks_dir) if self.masks_dir is not None else f"--masks_rle {self.rle_file}"

    def find(self, key: str, image_path: str, image_root: str) -> str | None:
        """The mask of the image with sample key ``key``: the same path under the mask folder, else the one mask with
        the image's stem anywhere under it (RLE: the ImageId equal to the image's stem)."""
        stem = PurePosixPath(key).name
        if self.rle is not None:
            return next((ref for ref in (key, stem) if ref in self.rle), None)
        for candidate in (key, sample_key(relative_path(image_path, image_root))):
            if candidate in self._by_key:
                return self._by_key[candidate]
        same_name = self._by_name.get(stem, [])
        return same_name[0] if len(same_name) == 1 else None

    def expected(self, key: str) -> str:
        if self.rle is not None:
            return f"no row with {RLE_IMAGE_COL} {PurePosixPath(key).name} in {self.where}"
        return f"no mask {key}.png in {self.where}"

    def load(self, ref: str, image_size: tuple[int, int], image_path: str) -> np.ndarray:
        """The mask ``ref`` as uint8 [H, W] class indices, checked against its image (``image_size`` (H, W)) and the
        classes; a ``MaskError`` of one line naming the file otherwise."""
        height, width = image_size
        if self.rle is not None:
            mask = np.zeros((height, width), dtype=np.uint8)
            for encoded in self.rle[ref]:
                try:
                    mask |= decode_rle(encoded, height, width)
                except ValueError as err:
                    raise MaskError(f"{self.where}, {RLE_IMAGE_COL} {ref}: {err}") from None
            return mask
        mask = read_mask_png(ref, self.storage_options)
        if mask.shape != (height, width):
            raise MaskError(
                f"mask {storage.describe(ref)} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{storage.describe(image_path)} is {width}x{height} (width x height): a mask has its image's size"
            )
        bad = np.setdiff1d(np.unique(mask), [*range(len(self.classes)), IGNORE_INDEX])
        if bad.size:
            raise MaskError(
                f"mask {storage.describe(ref)}: value {int(bad[0])} is not a class index (0-{len(self.classes) - 1}: "
                f"{', '.join(self.classes)}) nor {IGNORE_INDEX} (unlabelled)"
            )
        return mask.astype(np.uint8)


def read_mask_png(path: str, storage_options: dict | None = None) -> np.ndarray:
    """A single-channel mask image (PNG; 8-bit, palette or 16-bit) as its integer values [H, W]."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path, storage_options))) as image:
            if image.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
                raise MaskError(
                    f"mask {storage.describe(path)} has {image.mode} pixels: a mask is one channel of class indices "
                    "(an 8-bit grey or palette PNG)"
                )
            return np.asarray(image).astype(np.int64)
    except (OSError, Image.DecompressionBombError) as err:
        raise MaskError(f"mask {storage.describe(path)} cannot be read: {type(err).__name__}") from None


def image_size(path: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(height, width) of an image file from its header where the format allows (raster, DICOM: a local file is read
    only that far), else from the decoded image."""
    local = "://" not in path or path.startswith("file://")
    with (
        open(path.removeprefix("file://"), "rb")
        if local
        else io.BytesIO(storage.read_bytes(path, storage_options)) as f
    ):
        try:
            with Image.open(f) as image:
                return image.height, image.width
        except OSError:
            pass
        try:
            f.seek(0)
            header = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            return int(header.Rows), int(header.Columns)
        except (AttributeError, TypeError, ValueError, InvalidDicomError):
            pass
    return tuple(read_image(path, storage_options=storage_options).shape[:2])  # type: ignore[return-value]


# ---- records: images with their masks ----------------------------------------------------------------------------------


def attach_masks(
    records: dict[str, list[Any]], image_root: str, masks: MaskSource, skipped: list[dict[str, str]]
) -> dict[str, list[Any]]:
    """``records`` with a ``mask`` column; images without a mask are left out, each added to ``skipped`` with the
    reason (written to ``_skipped_images.jsonl`` by the recipe), and counted in one warning."""
    found = [masks.find(key, path, image_root) for key, path in zip(records["key"], records["path"], strict=True)]
    missing = [i for i, ref in enumerate(found) if ref is None]
    if len(missing) == len(found):
        raise MaskError(
            f"none of the {len(found)} images has a mask in {masks.where} (a mask has its image's stem: "
            f"{records['key'][0]}.png)"
        )
    if missing:
        for i in missing:
            skipped.append(
                {"path": relative_path(records["path"][i], image_root), "reason": masks.expected(records["key"][i])}
            )
        logger.warning(
            "%d of %d image(s) have no mask in %s and are left out; each is listed in %s in the output folder",
            len(missing),
            len(found),
            masks.where,
            SKIPPED_IMAGES_NAME,
        )
    keep = [i for i, ref in enumerate(found) if ref is not None]
    records = {column: [values[i] for i in keep] for column, values in records.items()}
    records["mask"] = [found[i] for i in keep]
    return records


def map_masks(records: dict[str, list[Any]], masks: MaskSource, fn: Callable[[np.ndarray], T]) -> list[T]:
    """``fn`` of each record's mask (``records``' ``mask`` column), read against its image's size and the classes
    (``MaskSource.load``: a bad mask is a one-line error naming it), in the records' order; a thread pool, as the work
    is reading files."""

    def one(i: int) -> T:
        path = records["path"][i]
        return fn(masks.load(records["mask"][i], image_size(path, masks.storage_options), path))

    remote = "://" in (records["path"][0] if records["path"] else "")
    with ThreadPoolExecutor(max_workers=32 if remote else 8) as pool:
        return list(pool.map(one, range(len(records["path"]))))


def check_masks(records: dict[str, list[Any]], masks: MaskSource) -> np.ndarray:
    """Reads every mask of ``records`` (``map_masks``) before the first step, so a bad mask stops the run at once.
    Returns the images' class presence [N, classes - 1] (0/1, background left out), which the patient split is
    stratified by."""

    def presence(mask: np.ndarray) -> np.ndarray:
        return np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=len(masks.classes))[1:] > 0

    rows = map_masks(records, masks, presence)
    return np.array(rows, dtype=np.int8).reshape(len(rows), len(masks.classes) - 1)


# ---- datasets ---------------------------------------------------------------------------------------------------------


def make_segmentation_transform(
    joint_transform: Callable, masks: MaskSource, storage_options: dict | None = None
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched ``datasets`` transform: image (decoded once per process, ``DecodedImageCache``) and mask ->
    ``joint_transform`` -> ``pixel_values`` (uint8 [C, S, S]), ``labels`` (int64 [S, S]) and ``patient``."""
    cache = DecodedImageCache()

    def decode(path: str) -> torch.Tensor:
        return to_uint8_tensor(read_image(path, storage_options=storage_options))

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"pixel_values": [], "labels": [], "patient": []}
        for path, ref, key, group in zip(batch["path"], batch["mask"], batch["key"], batch["group"], strict=True):
            image = cache.get(path, decode)
            mask = torch.from_numpy(masks.load(ref, tuple(image.shape[-2:]), path))
            pixels, labels = apply_image_transform(joint_transform, (image, mask), key)
            out["pixel_values"].append(pixels)
            out["labels"].append(labels)
            out["patient"].append(group)
        return out

    return transform


@dataclass
class SegmentationData:
    train_dataset: Any
    eval_dataset: Any | None
    mask_labels: tuple[str, ...]
    source: ResolvedSource
    info: dict[str, Any]
    train_augmentation: SeededAugmentation
    split_report: dict[str, Any]  # counts per split and class (segmentation_split_report)
    skipped_images: list[dict[str, str]] = field(default_factory=list)


def build_segmentation_data(data_args: SegmentationDataArguments, image_size: int, seed: int = 0) -> SegmentationData:
    """Training and validation datasets of images with masks, split by patient (stratified by the classes present)
    unless ``--validation_data`` is given (then checked patient-disjoint). Without ``--train_data``: the embedded
    phantoms with their masks (``demo-data --masks``)."""
    options = data_args.parsed_storage_options()
    masks_dir = data_args.masks_dir
    if data_args.train_data is None:  # the cached phantom set, with masks added if it was cached without them
        root = ensure_phantom_dataset(data_args.phantom_patients, image_size=data_args.phantom_image_size, masks=True)
        masks_dir = str(root / MASKS_DIR)
    source = resolve_train_source(
        data_args.train_data,
        data_args.labels_file,
        data_args.phantom_patients,
        phantom_image_size=data_args.phantom_image_size,
        storage_options=options,
    )
    # An explicit labels file (e.g. train.csv / val.csv of `hf-medvis split`) lists the images of one split.
    explicit = data_args.labels_file is not None or data_args.validation_labels_file is not None
    skipped: list[dict[str, str]] = []
    masks: MaskSource | None = None
    if source.shards is not None:  # prepared with --masks_dir / --masks_rle: the masks are in the shards' rows
        classes, records_of = _shard_mask_records(data_args, source, explicit, options)
    else:
        if masks_dir is None and data_args.masks_rle is None:
            raise MaskError("--train_data for segmentation needs its masks: --masks_dir DIR or --masks_rle FILE")
        rle = read_rle_table(data_args.masks_rle, options) if data_args.masks_rle else None
        classes = resolve_mask_labels(data_args.mask_labels, masks_dir, rle is not None, options)
        masks = MaskSource(classes, masks_dir, data_args.masks_rle, rle, options)

        def records_of(location: str, labels_file: str | None) -> tuple[dict[str, list[Any]], np.ndarray]:
            records = build_folder_records(location, labels_file, options, data_args.parsed_labels_format(), skipped)
            if explicit:
                records = only_listed_images(records)
            records = attach_masks(records, source_root(location), masks, skipped)
            return records, check_masks(records, masks)

    train, present = records_of(source.location, source.labels_file)
    fraction = data_args.validation_split_percentage / 100
    if data_args.validation_data is not None:
        val_labels = data_args.validation_labels_file or source.labels_file
        evaluation, eval_present = records_of(data_args.validation_data, val_labels)
        check_patient_disjoint(train["group"], evaluation["group"])
        assignment = np.repeat([0, 1], [len(train["group"]), len(evaluation["group"])])
        groups, present = train["group"] + evaluation["group"], np.concatenate([present, eval_present])
    elif fraction > 0:
        groups = train["group"]
        assignment = stratified_group_assignment(groups, present, [1 - fraction, fraction], seed)
        train, evaluation = (
            {k: [v[i] for i in np.flatnonzero(assignment == s)] for k, v in train.items()} for s in (0, 1)
        )
        if not train["group"] or not evaluation["group"]:
            raise DataSourceError(
                f"too few patients ({len(set(groups))}) for a patient-level validation split of "
                f"{data_args.validation_split_percentage:g}%"
            )
    else:
        evaluation, groups, assignment = None, train["group"], np.zeros(len(train["group"]), dtype=int)
    report = segmentation_split_report(assignment, groups, present, classes)
    for warning in report["warnings"]:
        logger.warning("%s", warning)
    augmentation = create_transform(
        SEGMENTATION,
        True,
        image_size=image_size,
        crop_scale=data_args.crop_scale,
        rotation_degrees=data_args.rotation_degrees,
        hflip=data_args.hflip,
        seed=seed,
    )
    train = {k: v[: data_args.max_train_samples] for k, v in train.items()}
    info: dict[str, Any] = {"train_images": len(train["key"]), "train_patients": len(set(train["group"]))}
    train_ds = _dataset(train, augmentation, masks, options, classes)
    eval_ds = None
    if evaluation is not None:
        evaluation = {k: v[: data_args.max_eval_samples] for k, v in evaluation.items()}
        info.update(eval_images=len(evaluation["key"]), eval_patients=len(set(evaluation["group"])))
        eval_ds = _dataset(
            evaluation, create_transform(SEGMENTATION, False, image_size=image_size), masks, options, classes
        )
    if skipped:
        info["skipped_images"] = len(skipped)
    return SegmentationData(train_ds, eval_ds, classes, source, info, augmentation, report, skipped)


def segmentation_split_report(
    assignment: np.ndarray, groups: Sequence[str], present: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Counts only (no image names, no patient ids): per split its images, patients and the images that contain each
    foreground class; ``warnings`` names a class the validation images lack (its Dice is undefined there)."""
    groups_array = np.asarray(groups)
    report: dict[str, Any] = {"labels": list(classes), "splits": {}, "warnings": []}
    for index, name in enumerate(("train", "val")):
        rows = np.asarray(assignment) == index
        if not rows.any():
            continue
        with_class = present[rows].sum(axis=0)
        report["splits"][name] = {
            "images": int(rows.sum()),
            "patients": len(set(groups_array[rows].tolist())),
            "images_with_class": {label: int(n) for label, n in zip(classes[1:], with_class, strict=True)},
        }
        if name == "val":
            report["warnings"] += [
                f"class '{label}' is in none of the validation images: its Dice is undefined there"
                for label, n in zip(classes[1:], with_class, strict=True)
                if n == 0
            ]
    return report


def _dataset(
    records: dict[str, list[Any]],
    joint_transform: Callable,
    masks: MaskSource | None,
    storage_options: dict | None,
    classes: tuple[str, ...],
) -> datasets.Dataset:
    if masks is None:  # prepared shards: the rows of their table (``_shard_mask_records``)
        table = records["table"][0]
        dataset = table.select(records["index"]).with_transform(make_shard_segmentation_transform(joint_transform))
    else:
        dataset = datasets.Dataset.from_dict(records)
        dataset = dataset.with_transform(make_segmentation_transform(joint_transform, masks, storage_options))
    dataset.mask_labels = classes  # type: ignore[attr-defined]  (the class names travel with the dataset)
    return dataset


# ---- prepared shards with masks (``hf-medvis prepare --masks_dir/--masks_rle``) ------------------------------------------


def make_shard_segmentation_transform(joint_transform: Callable) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched ``datasets`` transform over prepared-shard rows: stored pixels and ``mask`` (read without decoding,
    ``shard_format``) -> ``joint_transform`` -> ``pixel_values``, ``labels`` and ``patient``, as for a mask folder."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"pixel_values": [], "labels": [], "patient": []}
        for i, key in enumerate(batch["key"]):
            row = {name: batch[name][i] for name in ("key", "image", "mask", "height", "width", "bits")}
            stored = shard_format.stored_pixels(row)
            if stored.dtype != np.uint8:  # 16-bit shards: batches travel as uint8 (as streaming.DecodeStoredPixels)
                stored = np.round(stored.astype(np.float32) / 257.0).astype(np.uint8)
            image = to_uint8_tensor(stored.copy())
            mask = torch.from_numpy(shard_format.stored_mask(row).copy())
            pixels, labels = apply_image_transform(joint_transform, (image, mask), key)
            out["pixel_values"].append(pixels)
            out["labels"].append(labels)
            out["patient"].append(batch["group"][i])
        return out

    return transform


def _shard_mask_records(
    data_args: SegmentationDataArguments, source: ResolvedSource, explicit: bool, options: dict | None
) -> tuple[tuple[str, ...], Callable[[str, str | None], tuple[dict[str, list[Any]], np.ndarray]]]:
    """The mask classes of prepared shards (their manifest's ``preprocessing.mask_labels``) and the ``records_of`` of
    ``build_segmentation_data`` for them: rows (``index`` into the shard table, ``key``, ``group``, ``table``) and the
    classes present in each stored mask. Masks come with the shards, so --masks_dir / --masks_rle are refused."""
    if data_args.masks_dir is not None or data_args.masks_rle is not None:
        raise MaskError(
            "--train_data holds prepared shards, which carry their masks (prepare --masks_dir): leave out --masks_dir "
            "and --masks_rle"
        )
    classes = tuple(source.shards.manifest["preprocessing"].get("mask_labels") or ())
    if not classes:
        raise MaskError(
            f"{storage.describe(source.shards.base)} holds prepared shards without masks: re-run `hf-medvis prepare` "
            "with --masks_dir DIR (or --masks_rle FILE)"
        )
    if data_args.mask_labels is not None and resolve_mask_labels(data_args.mask_labels) != classes:
        raise MaskError(
            f"--mask_labels {data_args.mask_labels} differs from the shards' mask classes {','.join(classes)}"
        )

    def records_of(location: str, labels_file: str | None) -> tuple[dict[str, list[Any]], np.ndarray]:
        found = source.shards if location == source.location else find_manifest(location, options)
        if found is None or tuple(found.manifest["preprocessing"].get("mask_labels") or ()) != classes:
            raise MaskError(
                f"--validation_data must be prepared shards with the same mask classes ({','.join(classes)}) when "
                "--train_data is"
            )
        table = load_shard_table(location, options, shards=found)
        columns = table.select_columns(["key", "group", "mask", "height", "width"]).with_format(None)
        records: dict[str, list[Any]] = {"index": [], "key": [], "group": [], "table": []}
        listed = None
        if explicit and labels_file is not None:  # keys are the labels file's image names (prepare stores them so)
            table_rows = read_labels_table(labels_file, labels_format=data_args.parsed_labels_format()).rows
            listed = {sample_key(row[IMAGE_COL]) for row in table_rows}
        present = []
        for index, row in enumerate(columns):
            if listed is not None and row["key"] not in listed:
                continue
            mask = shard_format.stored_mask(row)
            present.append(np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=len(classes))[1:] > 0)
            for name, value in (("index", index), ("key", row["key"]), ("group", row["group"]), ("table", table)):
                records[name].append(value)
        if not records["key"]:
            raise MaskError(f"none of the samples of {storage.describe(location)} is listed in {labels_file}")
        return records, np.array(present, dtype=np.int8).reshape(len(present), len(classes) - 1)

    return classes, records_of
