"""Labelled datasets for classification: images with their labels from a labels file or prepared shards, split by
patient (label-stratified), checked patient-disjoint. ``build.build_datasets`` is the front door."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.tasks import CLASSIFICATION
from .arguments import ClassificationDataArguments
from .folder import dataset_from_records
from .hf_inputs import hf_dataset_kind, load_hf_table, make_image_column_transform
from .labels import (
    IMAGE_COL,
    LABEL_COL,
    PATIENT_COL,
    LabelError,
    LabelSpec,
    encode_labels,
    infer_label_spec,
    is_labelled,
    label_matrix,
    positive_weights,
    read_labels_table,
    sample_key,
)
from .labels.layouts import LabelsFormat
from .mix import (
    assemble_mix,
    is_data_mix,
    mix_records,
    read_data_mix,
    refuse_run_level_inputs,
    resolve_mix_source,
    split_mix,
)
from .provenance import data_origin, describe_origin
from .shard_dataset import load_shard_table, make_shard_transform, shard_metadata
from .splits import check_patient_disjoint, split_report, stratified_group_assignment, stratified_subsample
from .streaming import ShardLocation, find_manifest
from .train_eval import ResolvedSource, build_train_eval_datasets, resolve_train_source
from .transforms import SeededAugmentation, create_transform

logger = logging.getLogger(__name__)


@dataclass
class LabelledData:
    train_dataset: Any
    eval_dataset: Any | None  # every validation image (final metrics)
    eval_during_training: Any | None  # the fixed subsample, or eval_dataset
    spec: LabelSpec
    source: ResolvedSource
    info: dict[str, Any]
    split_report: dict[str, Any] | None = None
    train_augmentation: SeededAugmentation | None = None  # the Trainer sets its epoch
    skipped_images: list[dict[str, str]] = field(default_factory=list)  # raw-folder files that cannot be decoded


class _LabelledRecords:
    """``filter_records`` / ``split_records`` hooks: keep labelled images, encode labels, split by patient."""

    def __init__(
        self,
        data_args: ClassificationDataArguments,
        explicit_labels: bool,
        seed: int,
        label_names: Sequence[str] | None,
    ) -> None:
        self.args = data_args
        self.label_names = label_names
        self.explicit = explicit_labels
        self.seed = seed
        self.spec: LabelSpec | None = None
        self.report: dict[str, Any] | None = None

    def __call__(self, records: dict[str, list[Any]]) -> dict[str, list[Any]]:
        total = len(records["group"])  # folder records and shard records both carry ``group``
        values = records["finding_labels"]
        labelled = [i for i, v in enumerate(values) if is_labelled(v)]
        not_listed = sum(1 for v in values if v is None)
        blank = total - len(labelled) - not_listed
        if not labelled:
            raise LabelError(
                f"none of the {total} images has a label: give an NIH-style labels CSV "
                "(Image Index, Patient ID, Finding Labels) with --labels_file, or put labels.csv beside the images"
            )
        if not_listed and not self.explicit:
            raise LabelError(f"{not_listed} of {total} images have no row in the labels file")
        if not_listed or blank:
            parts = [f"{not_listed} not listed in the labels file"] if not_listed else []
            parts += [f"{blank} with an empty Finding Labels (unlabelled)"] if blank else []
            logger.info("using %d of %d images: %s skipped", len(labelled), total, " and ".join(parts))
            records = {k: [v[i] for i in labelled] for k, v in records.items()}
        if self.spec is None:  # the first call sees the training data: it defines the classes
            self.spec = infer_label_spec(records["finding_labels"], self.label_names, self.args.problem_type)
        records["labels"] = encode_labels(records["finding_labels"], self.spec)
        return records

    def split(self, records: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        fraction = self.args.validation_split_percentage / 100
        matrix = label_matrix(records["labels"], self.spec)
        assignment = stratified_group_assignment(records["group"], matrix, [1 - fraction, fraction], self.seed)
        self.report = split_report(assignment, records["group"], matrix, self.spec, split_names=("train", "val"))
        for warning in self.report["warnings"]:
            logger.warning("%s", warning)
        parts = [{k: [v[i] for i in np.flatnonzero(assignment == s)] for k, v in records.items()} for s in (0, 1)]
        if not parts[0]["group"] or not parts[1]["group"]:
            raise LabelError(f"too few patients ({len(set(records['group']))}) for a patient-level validation split")
        return parts[0], parts[1]


def build_labelled_data(
    data_args: ClassificationDataArguments, image_size: int, seed: int = 0, label_names: Sequence[str] | None = None
) -> LabelledData:
    """Training and validation datasets with ``labels``; one labelled set is split by patient (stratified).
    ``label_names`` fixes the classes and their order (default: every finding in the training labels).
    ``--train_data`` is a raw folder (labels from a CSV) or prepared shards (labels stored in the shards)."""
    options = data_args.parsed_storage_options()
    augmentation = create_transform(
        CLASSIFICATION,
        True,
        image_size=image_size,
        crop_scale=data_args.crop_scale,
        rotation_degrees=data_args.rotation_degrees,
        rand_augment_magnitude=data_args.rand_augment_magnitude,
        hflip=data_args.hflip,
        seed=seed,
    )
    if is_data_mix(data_args.train_data):
        return _build_mix_data(data_args, image_size, seed, label_names, augmentation)
    if hf_dataset_kind(data_args.train_data) is not None:
        hooks = _LabelledRecords(data_args, explicit_labels=True, seed=seed, label_names=label_names)
        source, train, evaluation, info = _build_hf_datasets(data_args, image_size, hooks, augmentation)
        return _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)
    shards = find_manifest(data_args.train_data, options) if data_args.train_data is not None else None
    if shards is not None:  # looked up once, carried through
        hooks = _LabelledRecords(data_args, explicit_labels=True, seed=seed, label_names=label_names)
        source, train, evaluation, info = _build_shard_datasets(
            data_args, image_size, hooks, options, augmentation, shards
        )
        return _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)
    source = resolve_train_source(
        data_args.train_data,
        data_args.labels_file,
        data_args.phantom_patients,
        phantom_image_size=data_args.phantom_image_size,
        storage_options=options,
    )
    if source.labels_file is None:
        remote = "://" in (data_args.train_data or "")
        where = "(looked for beside local folders only)" if remote else "beside --train_data"
        raise LabelError(
            f"images without labels: no labels.csv {where}; pass --labels_file (NIH layout: Image Index, Patient ID, "
            "Finding Labels)"
        )
    for labels_file in (source.labels_file, data_args.validation_labels_file):
        if labels_file:  # without a patient column every image would be its own "patient": a silent leak
            read_labels_table(
                labels_file, required=(PATIENT_COL, LABEL_COL), labels_format=data_args.parsed_labels_format()
            )
    explicit = data_args.labels_file is not None or data_args.validation_labels_file is not None
    hooks = _LabelledRecords(data_args, explicit_labels=explicit, seed=seed, label_names=label_names)
    split = data_args.validation_data is None and data_args.validation_split_percentage > 0
    skipped: list[dict[str, str]] = []
    train, evaluation, info = build_train_eval_datasets(
        source,
        data_args.validation_data,
        validation_labels_file=data_args.validation_labels_file,
        train_transform=augmentation,
        eval_transform=create_transform(CLASSIFICATION, False, image_size=image_size),
        storage_options=data_args.parsed_storage_options(),
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        filter_records=hooks,
        split_records=hooks.split if split else None,
        holdout_percentage=0.0,
        labels_format=data_args.parsed_labels_format(),
        skipped=skipped,
    )
    data = _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)
    data.skipped_images = skipped
    return data


def _build_mix_data(
    data_args: ClassificationDataArguments,
    image_size: int,
    seed: int,
    label_names: Sequence[str] | None,
    augmentation: SeededAugmentation,
) -> LabelledData:
    """``--train_data mix.yaml``: every source read with its layout and names onto the mix's labels, split by patient
    on its own, its training images weighted; one training and one validation set carrying each image's ``source``."""
    refuse_run_level_inputs(data_args.validation_data, data_args.labels_file)
    mix = read_data_mix(data_args.train_data)
    if label_names and tuple(label_names) != mix.labels:
        raise LabelError(f"--classes {', '.join(label_names)} differ from the mix's labels {', '.join(mix.labels)}")
    options = data_args.parsed_storage_options()
    skipped: list[dict[str, str]] = []
    per_source, sources = mix_records(mix, options, skipped)
    fraction = data_args.validation_split_percentage / 100
    hooks = _LabelledRecords(data_args, explicit_labels=True, seed=seed, label_names=mix.labels)
    hooks.spec = mix.spec
    evals = None
    if fraction > 0:
        per_source, evals, reports = split_mix(per_source, mix.spec, fraction, seed)
        hooks.report = {"sources": reports}
        for name, report in reports.items():
            for warning in report["warnings"]:
                logger.warning("mix source '%s': %s", name, warning)
    train_records, eval_records, info = assemble_mix(
        mix, per_source, evals, sources, seed, data_args.max_train_samples, data_args.max_eval_samples
    )
    evaluation = None
    if eval_records is not None:
        eval_transform = create_transform(CLASSIFICATION, False, image_size=image_size)
        evaluation = dataset_from_records(eval_records, eval_transform, options)
    if skipped:
        info["skipped_images"] = len(skipped)
    source = resolve_mix_source(mix, options)
    train = dataset_from_records(train_records, augmentation, options)
    data = _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)
    data.skipped_images = skipped
    return data


def _finish_classification_data(
    data_args: ClassificationDataArguments,
    seed: int,
    source: ResolvedSource,
    train: Any,
    evaluation: Any | None,
    info: dict[str, Any],
    hooks: _LabelledRecords,
    augmentation: SeededAugmentation,
) -> LabelledData:
    """Checks shared by folders and shards: patient-disjoint validation, classes without positives, eval subsample."""
    spec = hooks.spec
    during = evaluation
    if evaluation is not None:
        train_raw, eval_raw = train.with_format(None), evaluation.with_format(None)
        check_patient_disjoint(train_raw["group"], eval_raw["group"])
        eval_matrix = label_matrix(eval_raw["labels"], spec)
        for c, name in enumerate(spec.names):
            if (eval_matrix[:, c] == 1).sum() == 0:
                logger.warning("class '%s' has no positives in the validation set: its AUROC is undefined", name)
        if data_args.eval_subsample and data_args.eval_subsample < len(evaluation):
            during = evaluation.select(stratified_subsample(eval_matrix, data_args.eval_subsample, seed).tolist())
            info["eval_subsample"] = len(during)
    return LabelledData(train, evaluation, during, spec, source, info, hooks.report, augmentation)


def _shard_records(
    table: Any, labels_file: str | None, flag: str, labels_format: LabelsFormat | None = None
) -> dict[str, list[Any]]:
    """Records (``index`` into ``table``, ``key``, ``group``, ``finding_labels``) of the labelled samples of a shard
    table; an explicit labels file keeps only the samples it lists (as for folders), its labels are not used."""
    records = shard_metadata(table)
    records["index"] = list(range(len(table)))
    total = len(records["key"])
    labelled = [is_labelled(v) for v in records["finding_labels"]]
    if not any(labelled):
        raise LabelError(
            f"{flag} holds prepared shards without labels: re-run `hf-medvis prepare` with --labels (NIH-style CSV: "
            "Image Index, Patient ID, Finding Labels)"
        )
    keep = labelled
    if labels_file:
        # Keys are the labels file's Image Index stems (prepare stores them so), so a split CSV selects its samples.
        table = read_labels_table(labels_file, labels_format=labels_format)
        listed = {sample_key(row[IMAGE_COL]) for row in table.rows}
        keep = [ok and key in listed for ok, key in zip(labelled, records["key"], strict=True)]
        if not any(keep):
            raise LabelError(f"none of the {total} labelled samples of {flag} is listed in {Path(labels_file).name}")
        logger.info("%s: using the %d of %d samples listed in %s", flag, sum(keep), total, Path(labels_file).name)
    elif not all(labelled):
        raise LabelError(
            f"{total - sum(labelled)} of {total} samples of {flag} have no labels (no labels row at prepare): pass a "
            "labels file listing the samples to use"
        )
    return {k: [v[i] for i in range(total) if keep[i]] for k, v in records.items()}


def _shard_dataset(table: Any, records: dict[str, list[Any]], transform: Any, image_column: str | None = None) -> Any:
    """The selected rows of ``table`` with their encoded ``labels``, decoding pixels on access (prepared shards, or a
    ``datasets`` input's ``image_column``)."""
    labels: list[Any] = [None] * len(table)
    for index, encoded in zip(records["index"], records["labels"], strict=True):
        labels[index] = encoded
    # add_column joins an in-memory column to the memory-mapped table (no copy of the pixels); select only maps indices.
    # The shards' own ``labels`` (indices into every class of the labels file) give way to the training encoding.
    if "labels" in table.column_names:
        table = table.remove_columns("labels")
    decode = make_image_column_transform(image_column, transform) if image_column else make_shard_transform(transform)
    return table.add_column("labels", labels).select(records["index"]).with_transform(decode)


def _build_hf_datasets(
    data_args: ClassificationDataArguments,
    image_size: int,
    hooks: _LabelledRecords,
    train_transform: SeededAugmentation,
) -> tuple[ResolvedSource, Any, Any | None, dict[str, Any]]:
    """A ``datasets`` input -> train/validation datasets; split and labels as for folders and shards (hooks)."""
    columns = {
        "image_column": data_args.image_column_name,
        "label_column": data_args.label_column_name,
        "group_column": data_args.group_column_name,
    }
    table, records, image_col = load_hf_table(data_args.train_data, **columns)
    source = ResolvedSource(data_args.train_data, None, f"Hugging Face dataset {Path(data_args.train_data).name}")
    unlabelled = sum(1 for v in records["finding_labels"] if not is_labelled(v))
    if unlabelled:
        logger.info("--train_data: %d image(s) without a label left out", unlabelled)
        records = {
            k: [v[i] for i, t in enumerate(records["finding_labels"]) if is_labelled(t)] for k, v in records.items()
        }
    records = hooks(records)
    eval_table, eval_records, eval_col = None, None, image_col
    if data_args.validation_data is not None:
        eval_table, eval_records, eval_col = load_hf_table(
            data_args.validation_data,
            split="validation" if data_args.validation_data == data_args.train_data else "train",
            **columns,
        )
        eval_records = hooks(eval_records)
    elif data_args.validation_split_percentage > 0:
        records, eval_records = hooks.split(records)
        eval_table = table
    info: dict[str, Any] = {"train_images": len(records["key"]), "train_patients": len(set(records["group"]))}
    train = _shard_dataset(table, records, train_transform, image_col)
    evaluation = None
    if eval_records is not None:
        info.update(eval_images=len(eval_records["key"]), eval_patients=len(set(eval_records["group"])))
        evaluation = _shard_dataset(
            eval_table, eval_records, create_transform(CLASSIFICATION, False, image_size=image_size), eval_col
        )
    return source, train, evaluation, info


def _build_shard_datasets(
    data_args: ClassificationDataArguments,
    image_size: int,
    hooks: _LabelledRecords,
    options: dict | None,
    train_transform: SeededAugmentation,
    shards: ShardLocation,
) -> tuple[ResolvedSource, Any, Any | None, dict[str, Any]]:
    """Prepared shards -> map-style train/validation datasets; the split and label logic is the folders' (hooks)."""
    train_table = load_shard_table(data_args.train_data, options, shards=shards)
    origin = data_origin(data_args.train_data, options)
    source = ResolvedSource(
        data_args.train_data,
        data_args.labels_file,
        f"{describe_origin(origin)} (prepared shards)",
        synthetic=bool(origin and origin.get("synthetic")),
        shards=shards,
    )
    fmt = data_args.parsed_labels_format()
    records = hooks(_shard_records(train_table, data_args.labels_file, "--train_data", fmt))
    eval_table, eval_records = None, None
    if data_args.validation_data is not None:
        validation_shards = find_manifest(data_args.validation_data, options)
        if validation_shards is None:
            raise LabelError(
                "--validation_data must be prepared shards too when --train_data is (run `hf-medvis prepare`)"
            )
        eval_table = load_shard_table(data_args.validation_data, options, shards=validation_shards)
        eval_records = hooks(_shard_records(eval_table, data_args.validation_labels_file, "--validation_data", fmt))
    elif data_args.validation_split_percentage > 0:
        records, eval_records = hooks.split(records)
        eval_table = train_table
    if data_args.max_train_samples is not None:
        records = {k: v[: data_args.max_train_samples] for k, v in records.items()}
    info: dict[str, Any] = {"train_images": len(records["key"]), "train_patients": len(set(records["group"]))}
    train = _shard_dataset(train_table, records, train_transform)
    evaluation = None
    if eval_records is not None:
        if data_args.max_eval_samples is not None:
            eval_records = {k: v[: data_args.max_eval_samples] for k, v in eval_records.items()}
        info.update(eval_images=len(eval_records["key"]), eval_patients=len(set(eval_records["group"])))
        evaluation = _shard_dataset(
            eval_table, eval_records, create_transform(CLASSIFICATION, False, image_size=image_size)
        )
    return source, train, evaluation, info


def positive_class_weights(train_dataset: Any, spec: LabelSpec) -> np.ndarray:
    """BCE ``pos_weight`` per class: negatives / positives in the training set (``labels.positive_weights``)."""
    return positive_weights(label_matrix(train_dataset.with_format(None)["labels"], spec))
