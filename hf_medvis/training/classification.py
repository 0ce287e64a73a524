"""Fine-tuning-specific arguments, data, loss, optimizer and model card for the ViT classification recipe."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2
from transformers import EarlyStoppingCallback, TrainerCallback, ViTForImageClassification

from ..data.labels import (
    IMAGE_COL,
    LABEL_COL,
    MULTI_LABEL,
    PATIENT_COL,
    LabelError,
    LabelSpec,
    encode_labels,
    infer_label_spec,
    is_labelled,
    label_matrix,
    read_labels_table,
)
from ..data.shard_table import load_shard_table, make_shard_transform, shard_metadata
from ..data.sources import ResolvedSource, build_train_eval_datasets, resolve_train_source
from ..data.splits import (
    check_patient_disjoint,
    split_report,
    stratified_group_assignment,
    stratified_subsample,
)
from ..data.streaming import find_manifest
from ..data.transforms import SeededAugmentation, build_eval_transform
from ..models.build import count_parameters, preset_names
from ..models.param_groups import vit_param_groups
from ..models.transfer import POOLINGS, LoadReport
from .args import DataArguments, RecipeTrainingArguments
from .model_card import render_model_card
from .trainer import MedVisTrainer

logger = logging.getLogger(__name__)


# ---- arguments -------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from a Hub id (e.g. google/vit-base-patch16-224), a local ViT folder, or an MAE "
                  "pretraining output (encoder transferred, decoder dropped). Default: a new model from --model_preset."},
    )  # fmt: skip
    model_preset: str = field(
        default="tiny", metadata={"help": f"Architecture for a new model: one of {', '.join(preset_names())}."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Input size; differing from the checkpoint's interpolates position embeddings."}
    )
    patch_size: int | None = field(default=None, metadata={"help": "Patch size of a new model (default: the preset's)."})
    num_channels: int | None = field(
        default=None, metadata={"help": "Channels of a new model: 3 (grayscale replicated, default) or 1."}
    )
    pooling: str = field(
        default="cls",
        metadata={"help": "cls: the CLS token (plain ViTForImageClassification, loads anywhere); mean: global average "
                  "of patch tokens (the MAE fine-tuning default; load with hf_medvis)."},
    )  # fmt: skip
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout in the encoder MLPs and embeddings."})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout on attention weights."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value overrides of the ViT config, e.g. 'hidden_size=128'."}
    )
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "Attention kernel: sdpa or eager."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the checkpoint's repository."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.num_channels not in (None, 1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}")
        if self.model_name_or_path is None and self.model_preset not in preset_names():
            raise ValueError(f"--model_preset must be one of {', '.join(preset_names())}, got '{self.model_preset}'")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ClassificationDataArguments(DataArguments):
    validation_labels_file: str | None = field(
        default=None, metadata={"help": "Labels CSV of --validation_data (e.g. val.csv of `hf-medvis split`). Images "
                                "not listed in an explicit labels file are skipped."}
    )
    problem_type: str = field(
        default="auto",
        metadata={"help": "multi_label (BCE; 'A|B', 'No Finding' = all negative), single_label (softmax over "
                  "classes) or auto (multi-label if any image has 0 or several findings)."},
    )  # fmt: skip
    pos_weight: bool = field(
        default=False, metadata={"help": "Multi-label: weight positives by negatives/positives of the training set."}
    )
    threshold: float = field(default=0.5, metadata={"help": "Probability threshold for F1 (multi-label)."})
    crop_scale: list[float] = field(
        default_factory=lambda: [0.8, 1.0], metadata={"help": "RandomResizedCrop scale range (aspect ratio 0.9-1.1)."}
    )
    rotation_degrees: float = field(default=5.0, metadata={"help": "Random rotation range (degrees); 0 disables."})
    rand_augment_magnitude: int = field(
        default=0, metadata={"help": "RandAugment magnitude (2 ops); 0 disables (X-ray MAE recipe: 6)."}
    )
    hflip: bool = field(
        default=False,
        metadata={"help": "Random horizontal flips. Off by default: chest X-rays are not left-right symmetric "
                  "(heart on the patient's left; laterality of findings matters)."},
    )  # fmt: skip
    eval_subsample: int | None = field(
        default=None, metadata={"help": "Evaluate during training on a fixed label-stratified subsample of this many "
                                "validation images (the final evaluation uses all of them)."}
    )
    phantom_image_size: int = field(
        default=256, metadata={"help": "Pixel size of the embedded phantom images (smaller decodes faster on CPU)."}
    )
    dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset id of the training data, recorded in the model card's metadata."}
    )
    ci_bootstrap_samples: int = field(
        default=200, metadata={"help": "Patient-level bootstrap resamples for the final metrics' 95%% CIs (0: none)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop_scale needs two values 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.rand_augment_magnitude <= 30:
            raise ValueError(f"--rand_augment_magnitude must be in [0, 30], got {self.rand_augment_magnitude}")
        if self.problem_type not in ("auto", "multi_label", "single_label"):
            raise ValueError(f"--problem_type must be auto, multi_label or single_label, got '{self.problem_type}'")


@dataclass
class FinetuningArguments(RecipeTrainingArguments):
    output_dir: str | None = field(default="outputs/finetune_vit", metadata={"help": "Where outputs are written."})
    layer_decay: float = field(
        default=1.0, metadata={"help": "Layer-wise lr decay: block i trains at lr x decay^(L - i) (MAE: 0.65 for "
                               "ViT-B; X-ray MAE: 0.55); 1 disables."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improving --metric_for_best_model."}
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Minimum improvement that counts."})
    # TrainingArguments.label_names names the *input keys* holding labels; here --label_names names the classes, as
    # the interface asks. __post_init__ moves the classes to ``classes`` and restores the input key.
    label_names: list[str] | None = field(
        default=None, metadata={"help": "Classes to learn, in order (default: every finding in the training labels)."}
    )
    classes: list[str] | None = field(default=None, metadata={"help": "Internal: set from --label_names."})

    def __post_init__(self) -> None:
        if self.label_names and self.label_names != ["labels"]:
            self.classes = list(self.label_names)
        self.label_names = ["labels"]
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        super().__post_init__()
        if self.early_stopping_patience is not None and not (self.load_best_model_at_end and self.metric_for_best_model):
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end and --metric_for_best_model")


# ---- data ------------------------------------------------------------------------------------------------------------


def build_finetune_transform(
    image_size: int,
    crop_scale: Sequence[float] = (0.8, 1.0),
    rotation_degrees: float = 5.0,
    rand_augment_magnitude: int = 0,
    hflip: bool = False,
) -> v2.Compose:
    """X-ray-safe augmentation on uint8 [1, H, W]: mild crops and rotations, optional RandAugment; no flip by default."""
    steps: list = [
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=(0.9, 1.1),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    ]
    if rotation_degrees:
        steps.append(v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if rand_augment_magnitude:
        steps.append(v2.RandAugment(num_ops=2, magnitude=rand_augment_magnitude))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


@dataclass
class ClassificationData:
    train_dataset: Any
    eval_dataset: Any | None  # every validation image (final metrics)
    eval_during_training: Any | None  # the fixed subsample, or eval_dataset
    spec: LabelSpec
    source: ResolvedSource
    info: dict[str, Any]
    split_report: dict[str, Any] | None = None
    train_augmentation: SeededAugmentation | None = None  # the Trainer sets its epoch


class _LabelledRecords:
    """``filter_records`` / ``split_records`` hooks: keep labelled images, encode labels, split by patient."""

    def __init__(
        self, data_args: ClassificationDataArguments, explicit_labels: bool, seed: int, label_names: Sequence[str] | None
    ):
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


def build_classification_data(
    data_args: ClassificationDataArguments, image_size: int, seed: int = 0, label_names: Sequence[str] | None = None
) -> ClassificationData:
    """Training and validation datasets with ``labels``; one labelled set is split by patient (stratified).
    ``label_names`` fixes the classes and their order (default: every finding in the training labels).
    ``--train_data`` is a raw folder (labels from a CSV) or prepared shards (labels stored in the shards)."""
    options = data_args.parsed_storage_options()
    augmentation = SeededAugmentation(
        build_finetune_transform(image_size, data_args.crop_scale, data_args.rotation_degrees,
                                 data_args.rand_augment_magnitude, data_args.hflip),
        seed=seed,
    )
    if data_args.train_data is not None and find_manifest(data_args.train_data, options) is not None:
        hooks = _LabelledRecords(data_args, explicit_labels=True, seed=seed, label_names=label_names)
        source, train, evaluation, info = _build_shard_datasets(data_args, image_size, hooks, options, augmentation)
        return _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)
    source = resolve_train_source(data_args.train_data, data_args.labels_file, data_args.phantom_patients,
                                  phantom_image_size=data_args.phantom_image_size)
    if source.labels_file is None:
        raise LabelError(
            "images without labels: no labels.csv beside --train_data; pass --labels_file (NIH layout: Image Index, "
            "Patient ID, Finding Labels)"
        )
    for labels_file in (source.labels_file, data_args.validation_labels_file):
        if labels_file:  # without a patient column every image would be its own "patient": a silent leak
            read_labels_table(labels_file, required=(PATIENT_COL, LABEL_COL))
    explicit = data_args.labels_file is not None or data_args.validation_labels_file is not None
    hooks = _LabelledRecords(data_args, explicit_labels=explicit, seed=seed, label_names=label_names)
    split = data_args.validation_data is None and data_args.validation_split_percentage > 0
    train, evaluation, info = build_train_eval_datasets(
        source,
        data_args.validation_data,
        validation_labels_file=data_args.validation_labels_file,
        train_transform=augmentation,
        eval_transform=build_eval_transform(image_size),
        storage_options=data_args.parsed_storage_options(),
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        filter_records=hooks,
        split_records=hooks.split if split else None,
        holdout_percentage=0.0,
    )
    return _finish_classification_data(data_args, seed, source, train, evaluation, info, hooks, augmentation)


def _finish_classification_data(
    data_args: ClassificationDataArguments,
    seed: int,
    source: ResolvedSource,
    train: Any,
    evaluation: Any | None,
    info: dict[str, Any],
    hooks: _LabelledRecords,
    augmentation: SeededAugmentation,
) -> ClassificationData:
    """Checks shared by folders and shards: patient-disjoint validation, classes without positives, eval subsample."""
    spec = hooks.spec
    during = evaluation
    if evaluation is not None:
        train_raw, eval_raw = train.with_format(None), evaluation.with_format(None)
        check_patient_disjoint(train_raw["group"], eval_raw["group"])
        eval_matrix = label_matrix(eval_raw["labels"], spec)
        for c, name in enumerate(spec.names):
            if eval_matrix[:, c].sum() == 0:
                logger.warning("class '%s' has no positives in the validation set: its AUROC is undefined", name)
        if data_args.eval_subsample and data_args.eval_subsample < len(evaluation):
            during = evaluation.select(stratified_subsample(eval_matrix, data_args.eval_subsample, seed).tolist())
            info["eval_subsample"] = len(during)
    return ClassificationData(train, evaluation, during, spec, source, info, hooks.report, augmentation)


def _shard_records(table: Any, labels_file: str | None, flag: str) -> dict[str, list[Any]]:
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
        listed = {Path(row[IMAGE_COL]).stem for row in read_labels_table(labels_file).rows}
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


def _shard_dataset(table: Any, records: dict[str, list[Any]], transform: Any) -> Any:
    """The selected rows of ``table`` with their encoded ``labels``, decoding pixels on access."""
    labels: list[Any] = [None] * len(table)
    for index, encoded in zip(records["index"], records["labels"], strict=True):
        labels[index] = encoded
    # add_column joins an in-memory column to the memory-mapped table (no copy of the pixels); select only maps indices.
    return table.add_column("labels", labels).select(records["index"]).with_transform(make_shard_transform(transform))


def _build_shard_datasets(
    data_args: ClassificationDataArguments,
    image_size: int,
    hooks: _LabelledRecords,
    options: dict | None,
    train_transform: SeededAugmentation,
) -> tuple[ResolvedSource, Any, Any | None, dict[str, Any]]:
    """Prepared shards -> map-style train/validation datasets; the split and label logic is the folders' (hooks)."""
    train_table = load_shard_table(data_args.train_data, options)
    source = ResolvedSource(data_args.train_data, data_args.labels_file, "user-provided prepared shards")
    records = hooks(_shard_records(train_table, data_args.labels_file, "--train_data"))
    eval_table, eval_records = None, None
    if data_args.validation_data is not None:
        if find_manifest(data_args.validation_data, options) is None:
            raise LabelError("--validation_data must be prepared shards too when --train_data is (run `hf-medvis prepare`)")
        eval_table = load_shard_table(data_args.validation_data, options)
        eval_records = hooks(_shard_records(eval_table, data_args.validation_labels_file, "--validation_data"))
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
        evaluation = _shard_dataset(eval_table, eval_records, build_eval_transform(image_size))
    return source, train, evaluation, info


def collate_classification(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """uint8 pixels (normalised on the device) and labels: float multi-hot or long class indices."""
    labels = [example["labels"] for example in examples]
    dtype = torch.float32 if isinstance(labels[0], (list, tuple)) else torch.long
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "labels": torch.tensor(labels, dtype=dtype)}


def training_pos_weight(train_dataset, spec: LabelSpec) -> torch.Tensor:
    from ..data.labels import positive_weights

    return torch.from_numpy(positive_weights(label_matrix(train_dataset.with_format(None)["labels"], spec)))


# ---- trainer ---------------------------------------------------------------------------------------------------------


class ClassificationTrainer(MedVisTrainer):
    """BCE (optional ``pos_weight``) or cross-entropy (optional label smoothing), and layer-wise lr decay groups."""

    # compute_loss returns a per-batch mean: the Trainer must divide it by the gradient-accumulation steps. (ViT's
    # forward takes **kwargs, which would otherwise make the Trainer assume a loss normalised by num_items_in_batch.)
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, pos_weight: torch.Tensor | None = None, layer_decay: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pos_weight = pos_weight
        self.layer_decay = layer_decay
        self.can_return_loss = False  # the loss needs labels; Trainer's label handling applies

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        if self.model.config.problem_type == MULTI_LABEL:  # self.model: `model` may be wrapped (DDP, DeepSpeed)
            pos_weight = self.pos_weight.to(logits.device, logits.dtype) if self.pos_weight is not None else None
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                                        pos_weight=pos_weight)
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels.long(),
                                                     label_smoothing=self.args.label_smoothing_factor)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = vit_param_groups(opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay)
            for group in groups:
                group.pop("names")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def build_classification_callbacks(args: FinetuningArguments) -> list[TrainerCallback]:
    if args.early_stopping_patience is None:
        return []
    return [EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold)]


def resolve_image_size(model_args: ClassifierModelArguments) -> int:
    """The input size before the model is built (the data transforms need it)."""
    if model_args.image_size:
        return model_args.image_size
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        try:
            return int(AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir).image_size)
        except (OSError, ValueError, AttributeError):
            pass  # build_classifier reports the real problem with the checkpoint
    from ..models.build import load_presets

    return int(load_presets().get(model_args.model_preset, {}).get("image_size", 224))


# ---- model card ------------------------------------------------------------------------------------------------------


def _hub_id(name: str | None) -> str | None:
    """Only a Hub id is a base model; local folders are not named in the card."""
    if name and "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1 and "://" not in name:
        from pathlib import Path

        return None if Path(name).exists() else name
    return None


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def classifier_model_card(
    model: ViTForImageClassification,
    model_args: ClassifierModelArguments,
    data_args: ClassificationDataArguments,
    training_args: FinetuningArguments,
    *,
    spec: LabelSpec,
    data_description: str,
    data_info: dict,
    load_report: LoadReport,
    lr_line: str,
    metrics: dict,
) -> str:
    """A model card with Hub metadata (base model, datasets, metrics with CIs in model-index) and no patient data."""
    from huggingface_hub import EvalResult

    config = model.config
    task = "multi-label" if spec.multi_label else "multi-class"
    headline = "auroc_macro" if spec.multi_label or "accuracy" not in metrics else "accuracy"
    eval_results = []
    dataset_id = data_args.dataset_id
    dataset_name = dataset_id or data_description
    for key, metric_type in (("auroc_macro", "roc_auc"), ("accuracy", "accuracy"), ("ap_macro", "average_precision")):
        if key in metrics:
            ci = ""
            if f"{key}_ci95_low" in metrics:
                ci = f" (95% CI {metrics[f'{key}_ci95_low']:.3f}-{metrics[f'{key}_ci95_high']:.3f}, patient bootstrap)"
            eval_results.append(EvalResult(
                task_type="image-classification", dataset_type=dataset_id or "private", dataset_name=dataset_name,
                dataset_split="validation (held-out patients)", metric_type=metric_type,
                metric_value=round(float(metrics[key]), 4), metric_name=f"{key}{ci}",
            ))
    base = _hub_id(model_args.model_name_or_path)
    pos_weight = "training-set negatives/positives" if data_args.pos_weight and spec.multi_label else "none"
    loss = (f"BCE with logits, pos_weight {pos_weight}" if spec.multi_label
            else f"cross-entropy, label smoothing {training_args.label_smoothing_factor}")
    augmentation = (f"RandomResizedCrop scale {tuple(data_args.crop_scale)}, rotation ±{data_args.rotation_degrees:g}°"
                    + (f", RandAugment m{data_args.rand_augment_magnitude}" if data_args.rand_augment_magnitude else "")
                    + (", horizontal flip" if data_args.hflip else ", no horizontal flip (chest X-rays are not "
                       "left-right symmetric)"))
    architecture = {
        "model": f"ViTForImageClassification ({config.pooling if hasattr(config, 'pooling') else 'cls'} pooling)",
        "encoder": f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads",
        "patch size / image size / channels": f"{config.patch_size} / {config.image_size} / {config.num_channels}",
        "parameters": f"{count_parameters(model):,}",
        "initialisation": load_report.summary() if load_report.source_type != "new" else "random (no pretraining)",
        "labels": ", ".join(spec.names),
        "task": f"{task} ({spec.problem_type})",
    }
    training = {
        "data": data_description,
        "images (train / validation)": f"{data_info.get('train_images', '?')} / {data_info.get('eval_images', 0)}",
        "patients (train / validation)": f"{data_info.get('train_patients', '?')} / {data_info.get('eval_patients', 0)}"
        " (patient-disjoint)",
        "loss": loss,
        "augmentation": augmentation,
        "learning rate": lr_line,
        "layer-wise lr decay": training_args.layer_decay,
        "optimizer": f"{_plain(training_args.optim)}, weight decay {training_args.weight_decay} (none on norms, biases, "
        "position embeddings, CLS token)",
        "schedule": f"{_plain(training_args.lr_scheduler_type)}, warmup {training_args.warmup_steps}",
        "precision": "bf16" if training_args.bf16 else ("fp16" if training_args.fp16 else "fp32"),
        "steps": metrics.get("global_step", "?"),
    }
    results = {k: _metric(v) for k, v in metrics.items() if k.startswith(("auroc", "ap_", "f1", "accuracy"))}
    usage = (
        "```python\nfrom hf_medvis.training.evaluation import Predictor\n\npredictor = Predictor(\"path/or/hub-id\")\n"
        "probabilities = predictor.predict([\"image.dcm\", \"image.png\"])  # [N, classes], order of config.id2label\n```"
        "\n\nOr `hf-medvis predict --model DIR FILES...` (JSON lines). The image processor (size, mean/std) is saved "
        f"with the model; inputs are grayscale X-rays {'replicated to 3 channels' if config.num_channels == 3 else ''}."
    )
    return render_model_card(
        title=f"ViT chest X-ray classifier ({task}) fine-tuned with hf_medvis",
        summary=f"A `ViTForImageClassification` fine-tuned for {task} classification of chest X-rays "
        f"({', '.join(spec.names)}). Headline: {headline} on held-out patients.",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "pipeline_tag": "image-classification",
            "tags": ["vit", "image-classification", "medical-imaging", "chest-x-ray", "hf_medvis", task],
            "base_model": base,
            "datasets": [dataset_id] if dataset_id else None,
            "metrics": sorted({r.metric_type for r in eval_results}) or None,
            "model_name": training_args.hub_model_id.split("/")[-1] if training_args.hub_model_id else "hf_medvis-vit-cxr",
            "eval_results": eval_results or None,
        },
        sections={
            "Architecture": architecture,
            "Training": training,
            "Results (held-out patients)": results or "No evaluation was run.",
            "How to use": usage,
        },
    )


def _plain(value) -> str:
    return str(getattr(value, "value", value))
