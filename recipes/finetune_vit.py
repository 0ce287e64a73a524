#!/usr/bin/env python
"""Fine-tuning of a ViT classifier on chest X-rays (multi-label findings or multi-class) with the Hugging Face Trainer.

    accelerate launch recipes/finetune_vit.py                       # tiny ViT on the embedded phantom X-rays
    accelerate launch recipes/finetune_vit.py --model_name_or_path outputs/demo/mae   # from an MAE pretraining output
    accelerate launch recipes/finetune_vit.py --config recipes/configs/vit_base_medical_mae.yaml \
        --model_name_or_path google/vit-base-patch16-224 --train_data /data/nih/images \
        --labels_file split/train.csv --validation_data /data/nih/images --validation_labels_file split/val.csv \
        --output_dir out --bf16

Every TrainingArguments flag works; ``--config FILE.yaml`` holds the same argument names and flags override it.
One labelled set is split by patient (label-stratified); a validation set that shares patients with training is refused.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_medvis.core.storage import describe, write_json_atomic
from hf_medvis.data import ClassificationDataArguments, build_datasets
from hf_medvis.data.folder import write_skipped_images
from hf_medvis.data.labelled import positive_class_weights
from hf_medvis.data.mix import source_names
from hf_medvis.evaluation import (
    build_compute_metrics,
    format_metrics_table,
    label_targets,
    metrics_with_ci,
    probabilities,
)
from hf_medvis.models import (
    ClassifierModelArguments,
    build_model,
    count_parameters,
    input_image_size,
    resolve_normalization,
)
from hf_medvis.models.backbones import describe_architecture
from hf_medvis.models.build import classifier_image_processor
from hf_medvis.models.linear_probe import attach_linear_probe, fold_linear_probe
from hf_medvis.training.args import FinetuningArguments, MonitoringArguments, parse_recipe_args
from hf_medvis.training.batching import collate_classification
from hf_medvis.training.callbacks import build_recipe_callbacks
from hf_medvis.training.callbacks.preemption import exit_if_preempted
from hf_medvis.training.cards import classifier_model_card, write_model_card
from hf_medvis.training.distributed import end_distributed_process, setup_distributed_env
from hf_medvis.training.reporting import report_final_metrics, reporting_run
from hf_medvis.training.run import match_model_to_data, recipe_errors, setup_run
from hf_medvis.training.trainer import ClassificationTrainer

logger = logging.getLogger("finetune_vit")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vit_tiny_demo.yaml"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    launch = setup_distributed_env()  # launcher variables (torchrun, accelerate, Azure ML, MPI) -> torch's, first
    # 1. Arguments: dataclasses + optional YAML config; bad input fails here, before anything is written.
    model_args, data_args, training_args, monitoring_args = parse_recipe_args(
        (ClassifierModelArguments, ClassificationDataArguments, FinetuningArguments, MonitoringArguments),
        argv,
        DEFAULT_CONFIG,
    )
    # Logging, environment report, the checks that fail before anything is written, seed; logs what it changed.
    run = setup_run(training_args, launch)
    with recipe_errors():
        # 2. Data: labelled images, split by patient; uint8 crops, normalised on the device (MedVisTrainer).
        with training_args.main_process_first(desc="preparing data"):
            data = build_datasets(
                data_args,
                task="classification",
                image_size=input_image_size(model_args),
                seed=training_args.seed,
                label_names=training_args.classes,
            )
        spec = data.labels

        # 3. Model: a new preset, a ViT checkpoint, an MAE output (encoder transferred, decoder dropped), or another
        # image backbone's checkpoint (DeiT, BEiT, Dinov2, Swin, ConvNeXt) with a new head.
        built = build_model(model_args, task="classification", labels=spec)
        model, load_report = built.model, built.load_report
        if model_args.linear_probe:  # encoder frozen: only the BatchNorm + linear head trains
            attach_linear_probe(model)
        match_model_to_data(model.config, data.image_input)  # before the mean/std: names the channel mismatch
        mean, std = resolve_normalization(
            model_args.model_name_or_path,
            model.config.num_channels,
            data_args.image_mean,
            data_args.image_std,
            data_stats=data.normalization,
            cache_dir=model_args.cache_dir,
        )
        pos_weight = None
        if data_args.pos_weight and spec.multi_label:
            pos_weight = torch.from_numpy(positive_class_weights(data.train, spec))
    logger.info(
        "data: %s from %s; %s",
        data.source.description,
        describe(data.source.location),
        ", ".join(f"{k} {v}" for k, v in data.info.items()),
    )
    logger.info("labels (%s): %s", spec.problem_type, ", ".join(spec.names))
    architecture = describe_architecture(model.config)
    logger.info(
        "model: %s (%s) %s parameters, image %d%s, pooling: %s; %s",
        architecture["name"],
        architecture["model_type"],
        f"{count_parameters(model):,}",
        architecture["image_size"],
        f", patch {architecture['patch_size']}" if architecture["patch_size"] else "",
        architecture["pooling"],
        load_report.summary(),
    )
    if pos_weight is not None:
        logger.info(
            "pos_weight: %s", ", ".join(f"{n} {w:.2f}" for n, w in zip(spec.names, pos_weight.tolist(), strict=True))
        )
    logger.info("world size %d; %s; layer decay %g", training_args.world_size, run.lr_line, training_args.layer_decay)

    # 4. Trainer.
    card_state: dict = {"metrics": {}}

    def write_card(output_dir: str) -> None:
        content = classifier_model_card(
            trainer.model if hasattr(trainer.model, "config") else model,
            model_args,
            data_args,
            training_args,
            spec=spec,
            data_description=data.source.description,
            data_info=data.info,
            load_report=load_report,
            lr_line=run.lr_line,
            metrics=card_state["metrics"],
            checkpoint=card_state.get("checkpoint"),
            synthetic=data.source.synthetic,
        )
        write_model_card(output_dir, content)

    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval_during_training,
        data_collator=collate_classification,
        processing_class=classifier_image_processor(model.config, mean, std),  # + config.json's custom_pipelines
        compute_metrics=build_compute_metrics(spec, data_args.threshold, source_names(data.eval_during_training)),
        callbacks=build_recipe_callbacks(training_args, monitoring_args),
        image_mean=mean,
        image_std=std,
        model_card_writer=write_card,
        pos_weight=pos_weight,
        layer_decay=training_args.layer_decay,
        sample_augmentation=data.augmentation,
    )

    # 5. Train, then evaluate on every validation image with patient-bootstrap 95% CIs.
    with reporting_run(training_args):  # one MLflow run per job where MLflow reports (reporting.py)
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
        exit_if_preempted(trainer)  # SIGTERM: the checkpoint is saved; exit 0 and let the restart resume
        metrics = dict(train_result.metrics)
        metrics["global_step"] = trainer.state.global_step
        if data.eval is not None:
            prediction = trainer.predict(data.eval, metric_key_prefix="eval")
            logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
            labels = label_targets(prediction.label_ids, spec)
            final = metrics_with_ci(
                labels,
                probabilities(logits, spec),
                data.eval.with_format(None)["group"],
                spec,
                threshold=data_args.threshold,
                n_resamples=data_args.ci_bootstrap_samples,
                seed=training_args.seed,
                sources=source_names(data.eval),  # a data mix: each source's figures too
            )
            metrics.update({f"eval_{k}": v for k, v in final.items()})
            metrics["eval_loss"] = prediction.metrics.get("eval_loss")
            if trainer.is_world_process_zero():
                logger.info("held-out patients:\n%s", format_metrics_table(final, spec))
        trainer.log_metrics("all", metrics)

        # 6. Save (model with id2label, processor, card, split report) and push.
        fold_linear_probe(trainer.model)  # a probe's BatchNorm folded into its linear head: a plain classifier is saved
        trainer.save_model()
        trainer.save_state()
        # The held-out numbers with their CIs and counts to the reporters, at the final step. After save_state:
        # trainer_state.json keeps the training's own log (its evaluations); all_results.json has these.
        report_final_metrics(trainer, {k: v for k, v in metrics.items() if k.startswith("eval_")})
        card_state["metrics"] = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_")}
        card_state["metrics"]["global_step"] = trainer.state.global_step
        card_state["checkpoint"] = {
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_metric": trainer.state.best_metric,
            "metric": training_args.metric_for_best_model,
            "load_best": training_args.load_best_model_at_end,
        }
        if trainer.is_world_process_zero():
            write_card(training_args.output_dir)
            if data.split_report is not None:  # counts only: no image names or patient ids
                write_json_atomic(Path(training_args.output_dir) / "split_report.json", data.split_report)
            write_skipped_images(training_args.output_dir, data.skipped_images)  # the files left out, and why
            logger.info(
                "outputs in %s (model, preprocessor, README.md, all_results.json, loss_history.jsonl)",
                Path(training_args.output_dir).resolve(),
            )
        trainer.save_metrics("all", metrics)  # last: a folder with all_results.json holds a finished run
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message=f"ViT fine-tuning, step {trainer.state.global_step}")
    return metrics


if __name__ == "__main__":
    main()
    end_distributed_process()  # several processes: exit without the interpreter's teardown (distributed.py)
