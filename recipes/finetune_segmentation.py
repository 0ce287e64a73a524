#!/usr/bin/env python
"""Semantic segmentation of chest X-rays with a ViT encoder (from an MAE or a ViT) and the Hugging Face Trainer.

    accelerate launch recipes/finetune_segmentation.py          # tiny ViT on the embedded phantoms' lung/heart/nodule masks
    accelerate launch recipes/finetune_segmentation.py --model_name_or_path outputs/demo/mae   # from an MAE output
    accelerate launch recipes/finetune_segmentation.py --model_name_or_path mae_out --train_data /data/images \
        --masks_dir /data/masks --labels_file /data/labels.csv --image_size 224 --layer_decay 0.65 \
        --output_dir out --bf16

The shape of transformers' examples/pytorch/semantic-segmentation/run_semantic_segmentation.py: image and mask go
through the same geometric augmentation; the whole image is resized to the model's size (every pixel gets a label);
loss = cross-entropy + Dice (pixels of 255 ignored). Evaluation: per-class Dice and IoU (``eval_dice_<class>``,
``eval_dice_macro``, ``eval_iou_macro``) and, at the end, their patient-bootstrap 95% CIs. Every TrainingArguments flag
works; ``--config FILE.yaml`` holds the same argument names and flags override it.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_medvis.core.storage import describe, write_json_atomic
from hf_medvis.core.tasks import SEGMENTATION
from hf_medvis.data import SegmentationDataArguments, build_datasets
from hf_medvis.data.folder import write_skipped_images
from hf_medvis.evaluation.segmentation_metrics import (
    build_segmentation_compute_metrics,
    format_segmentation_table,
    logits_to_counts,
    segmentation_metrics_with_ci,
)
from hf_medvis.models import build_model, count_parameters, input_image_size, resolve_normalization
from hf_medvis.models.arguments import SegmentationModelArguments
from hf_medvis.models.segmentation import build_segmentation_processor
from hf_medvis.training.args import FinetuningArguments, MonitoringArguments, parse_recipe_args
from hf_medvis.training.callbacks import build_recipe_callbacks
from hf_medvis.training.callbacks.preemption import exit_if_preempted
from hf_medvis.training.cards import segmentation_model_card, write_model_card
from hf_medvis.training.distributed import end_distributed_process, setup_distributed_env
from hf_medvis.training.reporting import report_final_metrics, reporting_run
from hf_medvis.training.run import match_model_to_data, recipe_errors, setup_run
from hf_medvis.training.trainer import SegmentationTrainer

logger = logging.getLogger("finetune_segmentation")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "seg_tiny_demo.yaml"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    launch = setup_distributed_env()  # launcher variables (torchrun, accelerate, Azure ML, MPI) -> torch's, first
    # 1. Arguments: dataclasses + optional YAML config; bad input fails here, before anything is written.
    model_args, data_args, training_args, monitoring_args = parse_recipe_args(
        (SegmentationModelArguments, SegmentationDataArguments, FinetuningArguments, MonitoringArguments),
        argv,
        DEFAULT_CONFIG,
    )
    run = setup_run(training_args, launch)
    with recipe_errors():
        # 2. Data: images with their masks, split by patient; uint8 images and int64 masks, cropped together.
        with training_args.main_process_first(desc="preparing data"):
            data = build_datasets(
                data_args, task=SEGMENTATION, image_size=input_image_size(model_args), seed=training_args.seed
            )
        mask_labels = data.mask_labels

        # 3. Model: a ViT encoder (new, a ViT checkpoint or an MAE output's encoder) with a new decoder.
        built = build_model(model_args, task=SEGMENTATION, labels=mask_labels)
        model, load_report = built.model, built.load_report
        match_model_to_data(model.config, data.image_input)
        mean, std = resolve_normalization(
            model_args.model_name_or_path,
            model.config.num_channels,
            data_args.image_mean,
            data_args.image_std,
            data_stats=data.normalization,
            cache_dir=model_args.cache_dir,
        )
    logger.info(
        "data: %s from %s; %s",
        data.source.description,
        describe(data.source.location),
        ", ".join(f"{k} {v}" for k, v in data.info.items()),
    )
    logger.info("mask classes: %s", ", ".join(f"{i} {name}" for i, name in enumerate(mask_labels)))
    logger.info(
        "model: ViT segmentation (%s) %s parameters, image %d, patch %d, decoder %d channels; %s",
        model.config.model_type,
        f"{count_parameters(model):,}",
        model.config.image_size,
        model.config.patch_size,
        model.config.decoder_hidden_size,
        load_report.summary(),
    )
    logger.info("world size %d; %s; layer decay %g", training_args.world_size, run.lr_line, training_args.layer_decay)

    # 4. Trainer.
    card_state: dict = {"metrics": {}}

    def write_card(output_dir: str) -> None:
        content = segmentation_model_card(
            trainer.model if hasattr(trainer.model, "config") else model,
            model_args,
            data_args,
            training_args,
            data_description=data.source.description,
            data_info=data.info,
            load_report=load_report,
            lr_line=run.lr_line,
            metrics=card_state["metrics"],
            checkpoint=card_state.get("checkpoint"),
            synthetic=data.source.synthetic,
        )
        write_model_card(output_dir, content)

    trainer = SegmentationTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval_during_training,
        processing_class=build_segmentation_processor(model.config.image_size, mean, std),
        compute_metrics=build_segmentation_compute_metrics(mask_labels),
        # per-image confusion counts [N, classes, 3] instead of the logits of every evaluation image
        preprocess_logits_for_metrics=logits_to_counts,
        callbacks=build_recipe_callbacks(training_args, monitoring_args),
        image_mean=mean,
        image_std=std,
        model_card_writer=write_card,
        layer_decay=training_args.layer_decay,
        sample_augmentation=data.augmentation,
    )

    # 5. Train, then evaluate on every validation image with patient-bootstrap 95% CIs.
    with reporting_run(training_args):
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
        exit_if_preempted(trainer)  # SIGTERM: the checkpoint is saved; exit 0 and let the restart resume
        metrics = dict(train_result.metrics)
        metrics["global_step"] = trainer.state.global_step
        if data.eval is not None:
            prediction = trainer.predict(data.eval, metric_key_prefix="eval")
            counts = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
            final = segmentation_metrics_with_ci(
                counts,
                data.eval.with_format(None)["group"],  # the salted patient hashes
                mask_labels,
                n_resamples=data_args.ci_bootstrap_samples,
                seed=training_args.seed,
            )
            metrics.update({f"eval_{k}": v for k, v in final.items()})
            metrics["eval_loss"] = prediction.metrics.get("eval_loss")
            if trainer.is_world_process_zero():
                logger.info("held-out patients:\n%s", format_segmentation_table(final, mask_labels))
        trainer.log_metrics("all", metrics)

        # 6. Save (model with id2label, processor, card, split report) and push.
        trainer.save_model()
        trainer.save_state()
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
            write_skipped_images(training_args.output_dir, data.skipped_images)
            logger.info(
                "outputs in %s (model, preprocessor, README.md, all_results.json, loss_history.jsonl)",
                Path(training_args.output_dir).resolve(),
            )
        trainer.save_metrics("all", metrics)  # last: a folder with all_results.json holds a finished run
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message=f"ViT segmentation fine-tuning, step {trainer.state.global_step}")
    return metrics


if __name__ == "__main__":
    main()
    end_distributed_process()  # several processes: exit without the interpreter's teardown (distributed.py)
