"""Model cards (README.md with Hub metadata) for both recipes' outputs. They never carry patient data, local paths or
credentials: only what describes the model and how it was trained."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from transformers import PreTrainedModel

from ..core.param_count import count_parameters
from ..core.storage import write_text_atomic
from ..data.arguments import ClassificationDataArguments, MAEDataArguments
from ..data.labels import LabelSpec
from ..models.arguments import ClassifierModelArguments, MAEModelArguments
from ..models.backbones import describe_architecture
from ..models.transfer import LoadReport
from .args import FinetuningArguments, PretrainingArguments, precision_name
from .hub import hub_model_id

NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** This model is a research artifact. It has not been validated for diagnosis, triage or any "
    "other clinical decision, and must not be used as a medical device."
)


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def render_model_card(
    *,
    title: str,
    summary: str,
    metadata: Mapping[str, Any],
    sections: Mapping[str, str | Mapping[str, Any]],
) -> str:
    """Front matter from ``metadata`` (huggingface_hub ModelCardData), then one section per entry (text or a table)."""
    card_data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    parts = [f"---\n{card_data.to_yaml()}\n---", f"# {title}", summary]
    for heading, body in sections.items():
        parts.append(f"## {heading}")
        parts.append(_table(body) if isinstance(body, Mapping) else str(body))
    parts += ["## Intended use and limitations", NOT_FOR_CLINICAL_USE]
    return "\n\n".join(parts) + "\n"


def write_model_card(output_dir: str | os.PathLike, content: str) -> Path:
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, content)
    return path


def _sources_row(data_info: dict, metrics: dict) -> dict[str, str]:
    """A data mix's sources (``--train_data mix.yaml``): images and patients per source (train / validation, weighted
    training images), the classes a source does not label, its validation AUROC (macro) where measured."""
    sources = data_info.get("sources")
    if not sources:
        return {}
    parts = []
    for name, entry in sources.items():
        text = (
            f"{name}: {entry.get('train_images', '?')} / {entry.get('eval_images', 0)} images, "
            f"{entry.get('patients', '?')} patients"
        )
        if entry.get("not_labelled"):
            text += f", does not label {', '.join(entry['not_labelled'])} (masked)"
        if f"{name}_auroc_macro" in metrics:
            text += f", validation AUROC (macro) {_metric(metrics[f'{name}_auroc_macro'])}"
        parts.append(text)
    return {"sources (train / validation)": "; ".join(parts)}


def mae_model_card(
    model: PreTrainedModel,
    model_args: MAEModelArguments,
    data_args: MAEDataArguments,
    training_args: PretrainingArguments,
    *,
    data_description: str,
    data_info: dict,
    lr_line: str,
    metrics: dict,
    synthetic: bool = False,
) -> str:
    config = model.config
    architecture = {
        "encoder": f"ViT, {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads",
        "decoder": f"{config.decoder_num_hidden_layers} layer(s), hidden {config.decoder_hidden_size}",
        "patch size": config.patch_size,
        "image size": config.image_size,
        "channels": config.num_channels,
        "parameters": f"{count_parameters(model):,}",
    }
    training = {
        "objective": f"masked autoencoding, mask ratio {config.mask_ratio}, norm_pix_loss {config.norm_pix_loss}",
        "data": data_description,
        "images (train / held-out)": f"{data_info.get('train_images', '?')} / {data_info.get('eval_images', 0)}",
        **_sources_row(data_info, {}),
        "augmentation": f"RandomResizedCrop scale {tuple(data_args.crop_scale)}"
        + (", horizontal flip" if data_args.hflip else ""),
        "learning rate": lr_line,
        "optimizer": f"{_plain(training_args.optim)}, betas ({training_args.adam_beta1}, {training_args.adam_beta2}), "
        f"weight decay {training_args.weight_decay}",
        "schedule": f"{_plain(training_args.lr_scheduler_type)}, warmup {training_args.warmup_steps}",
        "precision": precision_name(training_args),
        "steps": metrics.get("global_step", "?"),
    }
    results = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "global_step"}
    if "eval_loss" in metrics and "eval_loss_position_mean" in metrics:
        best_trivial = min(metrics["eval_loss_position_mean"], metrics["eval_loss_mean_patch"])
        results["against trivial baselines"] = (
            "beats predicting the mean image and the mean patch"
            if metrics["eval_loss"] < best_trivial
            else "**does not beat** predicting the mean image / mean patch: it has not learned more than the average"
        )
    return render_model_card(
        title="ViT-MAE pretrained with hf_medvis",
        summary=f"A Masked Autoencoder (`ViTMAEForPreTraining`) pretrained on {data_description} with "
        "hf_medvis. Load the encoder into `ViTForImageClassification` to fine-tune; "
        "`reconstructions.png` shows masked reconstructions of held-out images.",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "tags": ["vit-mae", "masked-autoencoder", "medical-imaging", "chest-x-ray", "hf_medvis"]
            + (["synthetic-data"] if synthetic else []),
            "base_model": hub_model_id(model_args.model_name_or_path),
        },
        sections={
            "Architecture": architecture,
            "Training": training,
            "Results (held-out images, not trained on)": results or "No evaluation was run.",
        },
    )


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def classifier_model_card(
    model: PreTrainedModel,
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
    checkpoint: dict | None = None,
    synthetic: bool = False,
) -> str:
    """A model card with Hub metadata (base model, datasets, metrics with CIs in model-index) and no patient data.

    ``checkpoint``: which weights were kept (``kept_checkpoint_note``). Every number names its split; the test-patient
    results are added by ``hf-medvis evaluate --model DIR`` (``evaluation.card_results``)."""
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
            eval_results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_id or "private",
                    dataset_name=dataset_name,
                    dataset_split="validation",
                    metric_type=metric_type,
                    metric_value=round(float(metrics[key]), 4),
                    metric_name=f"{key}{ci}",
                )
            )
    base = hub_model_id(model_args.model_name_or_path)
    pos_weight = "training-set negatives/positives" if data_args.pos_weight and spec.multi_label else "none"
    loss = (
        f"BCE with logits, pos_weight {pos_weight}"
        if spec.multi_label
        else f"cross-entropy, label smoothing {training_args.label_smoothing_factor}"
    )
    augmentation = (
        f"RandomResizedCrop scale {tuple(data_args.crop_scale)}, rotation ±{data_args.rotation_degrees:g}°"
        + (f", RandAugment m{data_args.rand_augment_magnitude}" if data_args.rand_augment_magnitude else "")
        + (
            ", horizontal flip"
            if data_args.hflip
            else ", no horizontal flip (chest X-rays are not left-right symmetric)"
        )
    )
    described = describe_architecture(config)
    tag = described["name"].lower()  # "vit" for every ViT (ours with mean pooling too), else the architecture
    model_class = type(model).__name__
    patch = f"{described['patch_size']} / " if described["patch_size"] else ""
    architecture = {
        "model": f"{model_class} ({described['pooling']}; custom code shipped in this folder, load with "
        "`trust_remote_code=True`)"
        if getattr(config, "pooling", "cls") == "mean" and described["name"] == "ViT"
        else f"{model_class} ({described['name']}, model_type `{described['model_type']}`; {described['pooling']})",
        "encoder": described["encoder"],
        f"{'patch size / ' if patch else ''}image size / channels": f"{patch}{config.image_size} / {config.num_channels}",
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
        **_sources_row(data_info, metrics),
        "loss": loss,
        "augmentation": augmentation,
        "learning rate": lr_line,
        "layer-wise lr decay": training_args.layer_decay,
        **(
            {
                "stochastic depth": f"drop-path rate {model_args.drop_path_rate:g} at every layer (training only)"
                if described["model_type"] == "dinov2"  # Dinov2's own drop path is one rate throughout
                else f"drop-path rate 0 to {model_args.drop_path_rate:g} over the layers (training only)"
            }
            if model_args.drop_path_rate
            else {}
        ),  # fmt: skip
        "optimizer": f"{_plain(training_args.optim)}, weight decay {training_args.weight_decay} (none on norms, biases, "
        "position embeddings, CLS token)",
        "schedule": f"{_plain(training_args.lr_scheduler_type)}, warmup {training_args.warmup_steps}",
        "precision": precision_name(training_args),
        "steps": metrics.get("global_step", "?"),
        "weights kept": kept_checkpoint_note(checkpoint, metrics.get("global_step")),
    }
    validation = (
        "the `--validation_data` set"
        if data_args.validation_data
        else f"a patient-disjoint holdout of {data_args.validation_split_percentage:g}% of the training patients"
    )
    chose = bool(checkpoint and checkpoint.get("best_checkpoint") and checkpoint.get("load_best"))
    results_note = (
        f"Validation split: {validation} ({data_info.get('eval_images', 0)} images, {data_info.get('eval_patients', 0)}"
        " patients), 95% CIs from a patient-level bootstrap."
        + (
            " The same split chose the checkpoint kept, so these figures are optimistic; the held-out test result"
            " (below, once `hf-medvis evaluate --model` has run) is the one to quote."
            if chose
            else ""
        )
    )
    results = {k: _metric(v) for k, v in metrics.items() if k.startswith(("auroc", "ap_", "f1", "accuracy"))}
    usage = (
        '```python\nfrom hf_medvis.evaluation import Predictor\n\npredictor = Predictor("path/or/hub-id")\n'
        'probabilities = predictor.predict(["image.dcm", "image.png"])  # [N, classes], order of config.id2label\n```'
        "\n\nOr `hf-medvis predict --model DIR FILES...` (JSON lines). The image processor (size, mean/std) is saved "
        f"with the model; inputs are grayscale X-rays {'replicated to 3 channels' if config.num_channels == 3 else ''}."
    )
    return render_model_card(
        title=f"{described['name']} chest X-ray classifier ({task}) fine-tuned with hf_medvis",
        summary=f"A `{model_class}` fine-tuned for {task} classification of chest X-rays "
        f"({', '.join(spec.names)}) on {data_description}. Validation {headline} below; test-patient results are "
        "added by `hf-medvis evaluate --model`.",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "pipeline_tag": "image-classification",
            "tags": [tag, "image-classification", "medical-imaging", "chest-x-ray", "hf_medvis", task]
            + (["synthetic-data"] if synthetic else []),
            "base_model": base,
            "datasets": [dataset_id] if dataset_id else None,
            "metrics": sorted({r.metric_type for r in eval_results}) or None,
            "model_name": training_args.hub_model_id.split("/")[-1]
            if training_args.hub_model_id
            else f"hf_medvis-{tag}-cxr",
            "eval_results": eval_results or None,
        },
        sections={
            "Architecture": architecture,
            "Training": training,
            "Validation results": f"{results_note}\n\n{_table(results)}" if results else "No evaluation was run.",
            "How to use": usage,
        },
    )


def kept_checkpoint_note(checkpoint: dict | None, global_step: Any) -> str:
    """Which weights the folder holds, and why: the last step, or the best checkpoint by the validation metric."""
    if not checkpoint or not checkpoint.get("best_checkpoint") or not checkpoint.get("load_best"):
        return f"the last step ({global_step})"
    name = Path(checkpoint["best_checkpoint"]).name
    return (
        f"{name} of {global_step} steps: best validation {checkpoint['metric']} ({checkpoint['best_metric']:.4f}) "
        "among the evaluated checkpoints (load_best_model_at_end)"
    )


def _plain(value: Any) -> str:
    """Enum members (OptimizerNames, SchedulerType) as their plain value."""
    return str(getattr(value, "value", value))


def segmentation_model_card(
    model: PreTrainedModel,
    model_args: Any,
    data_args: Any,
    training_args: FinetuningArguments,
    *,
    data_description: str,
    data_info: dict,
    load_report: LoadReport,
    lr_line: str,
    metrics: dict,
    checkpoint: dict | None = None,
    synthetic: bool = False,
) -> str:
    """The card of a segmentation model (``recipes/finetune_segmentation.py``): architecture, training, validation
    Dice / IoU with patient-bootstrap CIs (``model_args``: ``SegmentationModelArguments``; ``data_args``:
    ``SegmentationDataArguments``)."""
    config = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    eval_results = []
    dataset_name = data_args.dataset_id or data_description
    for key, metric_type in (("dice_macro", "dice"), ("iou_macro", "mean_iou")):
        if key in metrics:
            ci = ""
            if f"{key}_ci95_low" in metrics:
                ci = f" (95% CI {metrics[f'{key}_ci95_low']:.3f}-{metrics[f'{key}_ci95_high']:.3f}, patient bootstrap)"
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    dataset_type=data_args.dataset_id or "private",
                    dataset_name=dataset_name,
                    dataset_split="validation",
                    metric_type=metric_type,
                    metric_value=round(float(metrics[key]), 4),
                    metric_name=f"{key}{ci}",
                )
            )
    architecture = {
        "model": f"{type(model).__name__} (ViT encoder + progressive-upsampling decoder to 1/4 of the input; custom "
        "code shipped in this folder, load with `trust_remote_code=True`)",
        "encoder": f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads",
        "decoder": f"{config.decoder_hidden_size} channels",
        "patch size / image size / channels": f"{config.patch_size} / {config.image_size} / {config.num_channels}",
        "parameters": f"{count_parameters(model):,}",
        "initialisation": load_report.summary() if load_report.source_type != "new" else "random (no pretraining)",
        "classes (index: name)": ", ".join(f"{i}: {name}" for i, name in enumerate(names)),
    }
    training = {
        "data": data_description,
        "images (train / validation)": f"{data_info.get('train_images', '?')} / {data_info.get('eval_images', 0)}",
        "patients (train / validation)": f"{data_info.get('train_patients', '?')} / {data_info.get('eval_patients', 0)}"
        " (patient-disjoint)",
        "input": "the whole image resized to the model's size (no crop); the mask nearest-neighbour",
        "loss": f"cross-entropy + {config.dice_loss_weight:g} x soft Dice; pixels labelled 255 ignored",
        "augmentation": f"RandomResizedCrop scale {tuple(data_args.crop_scale)}, rotation ±{data_args.rotation_degrees:g}°"
        + (", horizontal flip" if data_args.hflip else "")
        + ", the same draws on image and mask",
        "learning rate": lr_line,
        "layer-wise lr decay": training_args.layer_decay,
        "optimizer": f"{_plain(training_args.optim)}, weight decay {training_args.weight_decay}",
        "schedule": f"{_plain(training_args.lr_scheduler_type)}, warmup {training_args.warmup_steps}",
        "precision": precision_name(training_args),
        "steps": metrics.get("global_step", "?"),
        "weights kept": kept_checkpoint_note(checkpoint, metrics.get("global_step")),
    }
    results = {k: _metric(v) for k, v in metrics.items() if k.startswith(("dice_", "iou_"))}
    results_note = (
        f"Validation patients ({data_info.get('eval_images', 0)} images): per-image Dice / IoU averaged over the images "
        "whose ground truth has the class; macro over the foreground classes (background excluded); 95% CIs from a "
        "patient-level bootstrap."
    )
    usage = (
        '```python\nfrom transformers import pipeline\n\nsegment = pipeline("image-segmentation", model="path/or/hub-id", '
        'trust_remote_code=True)\nmasks = segment("image.png")  # one binary mask per class found, at the input size\n'
        "```\n\nWith hf_medvis (DICOM too): `hf_medvis.evaluation.segment.SegmentationPredictor(DIR).predict_masks(files)` "
        "(class indices at each input's size) and `write_mask_outputs` (`<stem>_mask.png`, `<stem>_overlay.png`)."
    )
    return render_model_card(
        title="ViT chest X-ray segmentation fine-tuned with hf_medvis",
        summary=f"A ViT segmentation model for {', '.join(names[1:])} (and background) trained on {data_description}.",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "pipeline_tag": "image-segmentation",
            "tags": ["vit", "image-segmentation", "medical-imaging", "chest-x-ray", "hf_medvis"]
            + (["synthetic-data"] if synthetic else []),
            "base_model": hub_model_id(model_args.model_name_or_path),
            "datasets": [data_args.dataset_id] if data_args.dataset_id else None,
            "metrics": sorted({r.metric_type for r in eval_results}) or None,
            "model_name": training_args.hub_model_id.split("/")[-1]
            if training_args.hub_model_id
            else "hf_medvis-vit-cxr-segmentation",
            "eval_results": eval_results or None,
        },
        sections={
            "Architecture": architecture,
            "Training": training,
            "Validation results": f"{results_note}\n\n{_table(results)}" if results else "No evaluation was run.",
            "How to use": usage,
        },
    )
