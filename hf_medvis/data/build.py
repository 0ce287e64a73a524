"""The one way the recipes get their data: ``build_datasets(data_args, task, ...)`` gives the training and evaluation
sets (raw folders, globs, fsspec URLs, prepared shards, or the embedded phantoms), the label set for classification,
the mask classes for segmentation, and the augmentation objects the Trainer drives."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.tasks import (  # noqa: F401  (TASKS: exported by hf_medvis.data)
    CLASSIFICATION,
    MAE,
    SEGMENTATION,
    TASKS,
    check_task,
)
from .arguments import ClassificationDataArguments, DataArguments, MAEDataArguments, SegmentationDataArguments
from .folder import dataset_from_records, only_listed_images
from .hf_inputs import hf_dataset_kind, load_hf_table, make_image_column_transform
from .labelled import build_labelled_data
from .labels import LabelSpec
from .masks import build_segmentation_data
from .mix import (
    assemble_mix,
    is_data_mix,
    mix_records,
    read_data_mix,
    refuse_run_level_inputs,
    resolve_mix_source,
    split_mix,
)
from .privacy import in_holdout, patient_group
from .streaming import find_manifest
from .train_eval import ResolvedSource, build_train_eval_datasets, resolve_train_source
from .transforms import DeviceRandomResizedCrop, SeededAugmentation, create_transform

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: Any  # map-style datasets.Dataset, or an IterableDataset over prepared shards
    eval: Any | None  # every held-out image: the final evaluation
    source: ResolvedSource
    info: dict[str, Any] = field(default_factory=dict)  # counts (images, patients, shards) for logs and the model card
    eval_during_training: Any | None = None  # a fixed label-stratified subsample (--eval_subsample), else ``eval``
    labels: LabelSpec | None = None  # classification: the classes, in the head's order
    split_report: dict[str, Any] | None = None  # split by the recipe: counts per split and class (no ids)
    augmentation: SeededAugmentation | None = None  # per-sample crops in the workers; the Trainer sets its epoch
    device_augmentation: DeviceRandomResizedCrop | None = None  # MAE --augment_on_device: crops on the accelerator
    normalization: dict[str, list[float]] | None = None  # prepared shards: per-channel mean/std of their pixels
    # How the images were read when not plain grey: {"channels": 3, "windows": [[center, width], ...] or []};
    # recorded in the model's config so that `hf-medvis predict` and evaluate read new images the same way.
    image_input: dict[str, Any] | None = None
    # Raw-folder image files left out because they cannot be decoded: {"path" (under the data location), "reason"};
    # the recipes write them to OUTPUT_DIR/_skipped_images.jsonl (folder.write_skipped_images).
    skipped_images: list[dict[str, str]] = field(default_factory=list)
    # Segmentation: the mask classes, index = class value (0 = background); examples carry ``labels`` [S, S].
    mask_labels: tuple[str, ...] | None = None


def build_datasets(
    data_args: DataArguments, task: str, *, image_size: int, seed: int = 0, label_names: Sequence[str] | None = None
) -> Datasets:
    """``task`` "mae" (``MAEDataArguments``): uint8 crops for masked-autoencoder pretraining, labels not needed.
    "classification" (``ClassificationDataArguments``): labelled images split by patient (``labelled.py``);
    ``label_names`` fixes the classes and their order. "segmentation" (``SegmentationDataArguments``): images with
    their masks, split by patient (``masks.py``); examples ``{"pixel_values", "labels": int64 [S, S], "patient"}``."""
    if check_task(task) == CLASSIFICATION:
        data = _classification_datasets(data_args, image_size, seed, label_names)
    elif task == SEGMENTATION:
        data = _segmentation_datasets(data_args, image_size, seed)
    else:
        data = _mae_datasets(data_args, image_size, seed)
    found = data.source.shards
    if found is None and data_args.train_data:  # a source resolved elsewhere (labelled.py): shards or not
        found = find_manifest(data_args.train_data, data_args.parsed_storage_options())
    if found is not None:  # prepared shards say what they hold
        preprocessing = found.manifest["preprocessing"]
        data.normalization = found.manifest.get("normalization")
        windows = [list(w) for w in preprocessing.get("windows") or []]
        if int(preprocessing.get("channels", 1)) == 3 or windows:
            data.image_input = {"channels": int(preprocessing.get("channels", 1)), "windows": windows}
    return data


def _mae_datasets(data_args: MAEDataArguments, image_size: int, seed: int) -> Datasets:
    augmentation = None
    device_augmentation = None
    if data_args.augment_on_device:  # the workers only resize; crops happen on the accelerator
        train_transform = create_transform(MAE, True, image_size=image_size, load_size=round(image_size * 256 / 224))
        device_augmentation = DeviceRandomResizedCrop(image_size, data_args.crop_scale, hflip=data_args.hflip)
    else:  # drawn per sample, so a resumed run sees the crops it would have seen
        augmentation = create_transform(
            MAE, True, image_size=image_size, crop_scale=data_args.crop_scale, hflip=data_args.hflip, seed=seed
        )
        train_transform = augmentation
    if hf_dataset_kind(data_args.train_data) is not None:
        eval_transform = create_transform(MAE, False, image_size=image_size)
        train, evaluation, source, info = _hf_mae_datasets(data_args, train_transform, eval_transform)
        return Datasets(train, evaluation, source, info, evaluation, augmentation=augmentation,
                        device_augmentation=device_augmentation)  # fmt: skip
    options = data_args.parsed_storage_options()
    if is_data_mix(data_args.train_data):
        return _mae_mix_datasets(data_args, image_size, seed, train_transform, augmentation, device_augmentation)
    source = resolve_train_source(
        data_args.train_data, data_args.labels_file, data_args.phantom_patients, storage_options=options
    )
    skipped: list[dict[str, str]] = []
    train, evaluation, info = build_train_eval_datasets(
        source,
        data_args.validation_data,
        train_transform=train_transform,
        eval_transform=create_transform(MAE, False, image_size=image_size),
        storage_options=options,
        holdout_percentage=data_args.validation_split_percentage,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=seed,
        labels_format=data_args.parsed_labels_format(),
        # An explicit labels file lists the images of one split (e.g. train.csv from `hf-medvis split`).
        filter_records=only_listed_images if data_args.labels_file else None,
        skipped=skipped,
    )
    return Datasets(
        train,
        evaluation,
        source,
        info,
        eval_during_training=evaluation,
        augmentation=augmentation,
        device_augmentation=device_augmentation,
        skipped_images=skipped,
    )


def _mae_mix_datasets(
    data_args: MAEDataArguments,
    image_size: int,
    seed: int,
    train_transform: Callable,
    augmentation: Any,
    device_augmentation: Any,
) -> Datasets:
    """``--train_data mix.yaml`` for pretraining: every source's images (labels not needed), a patient holdout per
    source, training images weighted per source."""
    refuse_run_level_inputs(data_args.validation_data, data_args.labels_file)
    options = data_args.parsed_storage_options()
    mix = read_data_mix(data_args.train_data)
    skipped: list[dict[str, str]] = []
    per_source, sources = mix_records(mix, options, skipped, labelled=False)
    trains, evals, _ = split_mix(per_source, None, data_args.validation_split_percentage / 100, seed)
    train_records, eval_records, info = assemble_mix(
        mix, trains, evals, sources, seed, data_args.max_train_samples, data_args.max_eval_samples
    )
    evaluation = None
    if eval_records is not None:
        evaluation = dataset_from_records(eval_records, create_transform(MAE, False, image_size=image_size), options)
    source = resolve_mix_source(mix, options)
    train = dataset_from_records(train_records, train_transform, options)
    return Datasets(train, evaluation, source, info, eval_during_training=evaluation, augmentation=augmentation,
                    device_augmentation=device_augmentation, skipped_images=skipped)  # fmt: skip


def _classification_datasets(
    data_args: ClassificationDataArguments, image_size: int, seed: int, label_names: Sequence[str] | None
) -> Datasets:
    data = build_labelled_data(data_args, image_size, seed, label_names)
    return Datasets(
        data.train_dataset,
        data.eval_dataset,
        data.source,
        data.info,
        eval_during_training=data.eval_during_training,
        labels=data.spec,
        split_report=data.split_report,
        augmentation=data.train_augmentation,
        skipped_images=data.skipped_images,
    )


def _segmentation_datasets(data_args: SegmentationDataArguments, image_size: int, seed: int) -> Datasets:
    data = build_segmentation_data(data_args, image_size, seed)
    return Datasets(
        data.train_dataset,
        data.eval_dataset,
        data.source,
        data.info,
        eval_during_training=data.eval_dataset,
        split_report=data.split_report,
        augmentation=data.train_augmentation,
        skipped_images=data.skipped_images,
        mask_labels=data.mask_labels,
    )


def _hf_mae_datasets(data_args: MAEDataArguments, train_transform: Any, eval_transform: Any) -> tuple[Any, ...]:
    """A ``datasets`` input for pretraining: its images, a patient-level (or image-level) holdout for evaluation."""
    if data_args.validation_data is not None:
        raise ValueError("--validation_data with a datasets --train_data: use --validation_split_percentage")
    columns = {"image_column": data_args.image_column_name, "group_column": data_args.group_column_name}
    table, records, image_col = load_hf_table(data_args.train_data, need_labels=False, **columns)
    held = [in_holdout(patient_group(g), data_args.validation_split_percentage) for g in records["group"]]
    train_rows = [i for i, h in enumerate(held) if not h][: data_args.max_train_samples]
    eval_rows = [i for i, h in enumerate(held) if h][: data_args.max_eval_samples]
    train = table.select(train_rows).with_transform(make_image_column_transform(image_col, train_transform))
    evaluation = table.select(eval_rows).with_transform(make_image_column_transform(image_col, eval_transform))
    info = {
        "train_images": len(train_rows),
        "eval_images": len(eval_rows),
        "train_patients": len({records["group"][i] for i in train_rows}),
    }
    source = ResolvedSource(data_args.train_data, None, f"Hugging Face dataset {Path(data_args.train_data).name}")
    return train, evaluation if eval_rows else None, source, info
