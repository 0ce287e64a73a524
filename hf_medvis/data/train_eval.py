"""From the recipes' data arguments to training and evaluation datasets.

Raw folders (and the embedded phantoms) become map-style ``datasets.Dataset`` objects that decode on access; without a
validation location, a deterministic patient-level holdout is taken from the training data.

Prepared shards stream (``streaming.load_image_dataset``) for pretraining. There the split is a preparation step
(``hf-medvis split`` then one ``prepare`` per split): a holdout filtered out of a stream would break its exact-once
resume accounting, so evaluation on streamed shards needs ``--validation_data``. (Fine-tuning reads labelled shards as a
map-style table instead: ``shard_dataset.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.storage import has_glob
from .folder import DataSourceError, build_folder_records, dataset_from_records, find_labels_file
from .labels.layouts import LabelsFormat
from .phantoms import ensure_phantom_dataset
from .privacy import in_holdout
from .provenance import data_origin, describe_origin
from .streaming import ShardLocation, find_manifest, load_image_dataset, load_shard_stream, stream_control

logger = logging.getLogger(__name__)


@dataclass
class ResolvedSource:
    location: str
    labels_file: str | None
    description: str  # safe for model cards and logs: no paths, no credentials
    synthetic: bool = False  # phantoms, not patient images (cards say so)
    # Prepared shards: the location and its manifest, read once (``find_manifest``) and used by every later step.
    shards: ShardLocation | None = field(default=None, repr=False)


def resolve_train_source(
    train_data: str | None,
    labels_file: str | None,
    phantom_patients: int,
    seed: int = 0,
    phantom_image_size: int = 256,
    storage_options: dict | None = None,
) -> ResolvedSource:
    if train_data is None:
        root = ensure_phantom_dataset(patients=phantom_patients, seed=seed, image_size=phantom_image_size)
        return ResolvedSource(
            str(root / "images"),
            labels_file or str(root / "labels.csv"),
            f"embedded synthetic chest X-ray phantoms (hf_medvis demo-data, {phantom_patients} patients, seed {seed})",
            synthetic=True,
        )
    if "://" not in train_data and not has_glob(train_data) and not Path(train_data).expanduser().exists():
        raise DataSourceError(
            f"--train_data does not exist: {train_data} (give a folder of images, a glob, an fsspec URL or prepared "
            "shards)"
        )
    labels = labels_file or (str(find_labels_file(train_data)) if find_labels_file(train_data) else None)
    origin = data_origin(train_data, storage_options)
    return ResolvedSource(
        train_data,
        labels,
        describe_origin(origin),
        synthetic=bool(origin and origin.get("synthetic")),
        shards=find_manifest(train_data, storage_options),
    )


def _select(records: dict[str, list[Any]], keep: Callable[[int], bool]) -> dict[str, list[Any]]:
    indices = [i for i in range(len(records["path"])) if keep(i)]
    return {key: [values[i] for i in indices] for key, values in records.items()}


def _truncate(records: dict[str, list[Any]], limit: int | None) -> dict[str, list[Any]]:
    if limit is None:
        return records
    return {key: values[:limit] for key, values in records.items()}


def build_train_eval_datasets(
    train: ResolvedSource,
    validation_data: str | None,
    *,
    train_transform: Callable,
    eval_transform: Callable,
    storage_options: dict | None = None,
    holdout_percentage: float = 5.0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    filter_records: Callable[[dict[str, list[Any]]], dict[str, list[Any]]] | None = None,
    split_records: Callable[[dict[str, list[Any]]], tuple[dict[str, list[Any]], dict[str, list[Any]]]] | None = None,
    validation_labels_file: str | None = None,
    seed: int = 0,
    labels_format: LabelsFormat | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> tuple[Any, Any | None, dict[str, Any]]:
    """Returns (train_dataset, eval_dataset or None, info dict with counts).

    Without ``validation_data``, ``split_records`` (if given) splits the training records into (train, eval) instead of
    the hash holdout; ``validation_labels_file`` labels ``validation_data`` when it has no labels.csv of its own.
    Raw-folder images that cannot be decoded are left out and added to ``skipped`` (``folder.check_image_files``).
    """
    skipped = [] if skipped is None else skipped
    shards = train.shards if train.shards is not None else find_manifest(train.location, storage_options)
    if shards is not None:
        return _build_stream_datasets(
            shards,
            validation_data,
            train_transform,
            eval_transform,
            storage_options,
            seed,
            max_train_samples,
            max_eval_samples,
        )
    records = build_folder_records(train.location, train.labels_file, storage_options, labels_format, skipped)
    if filter_records is not None:
        records = filter_records(records)
    if validation_data is not None:
        val_labels = validation_labels_file or find_labels_file(validation_data)
        eval_records = build_folder_records(
            validation_data,
            str(val_labels) if val_labels else train.labels_file,
            storage_options,
            labels_format,
            skipped,
        )
        if filter_records is not None:
            eval_records = filter_records(eval_records)
        train_records = records
    elif split_records is not None:
        train_records, eval_records = split_records(records)
    elif holdout_percentage > 0:
        held = [in_holdout(group, holdout_percentage) for group in records["group"]]
        train_records = _select(records, lambda i: not held[i])
        eval_records = _select(records, lambda i: held[i])
        if not eval_records["path"] or not train_records["path"]:
            # Too few patients for the requested percentage: keep everything for training rather than fail.
            logger.warning(
                "patient holdout of %.1f%% left one side empty; training without evaluation", holdout_percentage
            )
            train_records, eval_records = records, None
    else:
        train_records, eval_records = records, None
    train_records = _truncate(train_records, max_train_samples)
    info = {"train_images": len(train_records["path"]), "train_patients": len(set(train_records["group"]))}
    if skipped:
        info["skipped_images"] = len(skipped)
    train_ds = dataset_from_records(train_records, train_transform, storage_options)
    eval_ds = None
    if eval_records is not None:
        eval_records = _truncate(eval_records, max_eval_samples)
        info.update(eval_images=len(eval_records["path"]), eval_patients=len(set(eval_records["group"])))
        eval_ds = dataset_from_records(eval_records, eval_transform, storage_options)
    return train_ds, eval_ds, info


def _build_stream_datasets(
    train: ShardLocation,
    validation_data: str | None,
    train_transform: Callable,
    eval_transform: Callable,
    storage_options: dict | None,
    seed: int,
    max_train_samples: int | None,
    max_eval_samples: int | None,
) -> tuple[Any, Any | None, dict[str, Any]]:
    # Split by node here (RANK / WORLD_SIZE), the split StreamStateCallback's twin replays on resume; MedVisTrainer
    # then keeps accelerate from sharding this stream a second time (trainer.py, get_train_dataloader).
    train_ds = load_shard_stream(
        train.base,
        train.manifest,
        image_transform=train_transform,
        storage_options=storage_options,
        shuffle=True,
        seed=seed,
        split_by_node=True,
    )
    manifest = train.manifest
    info: dict[str, Any] = {"train_images": int(manifest["totals"]["written"]), "train_shards": len(manifest["shards"])}
    if max_train_samples is not None:
        control = stream_control(train_ds)
        train_ds = train_ds.take(max_train_samples)
        train_ds.stream_control = control
        info["train_images"] = min(info["train_images"], max_train_samples)
    eval_ds = None
    if validation_data is not None:
        found = find_manifest(validation_data, storage_options)
        common = {"image_transform": eval_transform, "storage_options": storage_options, "shuffle": False}
        if found is not None:  # streamed from the manifest found here
            eval_ds = load_shard_stream(found.base, found.manifest, **common, split_by_node=False)
        else:  # a raw folder
            eval_ds = load_image_dataset(validation_data, **common, split_by_node=False)
        if max_eval_samples is not None:
            eval_ds = eval_ds.take(max_eval_samples)
        info["eval_images"] = int(found.manifest["totals"]["written"]) if found else "?"
    else:
        logger.warning("prepared shards without --validation_data: training without evaluation (split before prepare)")
    return train_ds, eval_ds, info


def first_examples(dataset: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of a map-style or streaming dataset."""
    if hasattr(dataset, "__len__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(dataset.take(n))
