#!/usr/bin/env python
"""Masked-autoencoder pretraining of a ViT on medical images with the Hugging Face Trainer.

    accelerate launch recipes/pretrain_mae.py                       # tiny model on the embedded phantom X-rays
    accelerate launch recipes/pretrain_mae.py --config recipes/configs/mae_vit_base_cxr.yaml \
        --train_data az://container/xrays --output_dir out --bf16

Every TrainingArguments flag works; ``--config FILE.yaml`` holds the same argument names and flags override it.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_medvis.core.storage import describe
from hf_medvis.data import MAEDataArguments, build_datasets
from hf_medvis.data.folder import write_skipped_images
from hf_medvis.data.train_eval import first_examples
from hf_medvis.evaluation.metrics import classification_metrics
from hf_medvis.evaluation.reconstructions import reconstruct, save_reconstruction_grid
from hf_medvis.models import (
    MAEModelArguments,
    build_image_processor,
    build_model,
    count_parameters,
    resolve_normalization,
)
from hf_medvis.training.args import MonitoringArguments, PretrainingArguments, parse_recipe_args
from hf_medvis.training.batching import collate_pixels
from hf_medvis.training.callbacks import build_recipe_callbacks
from hf_medvis.training.callbacks.online_probe import OnlineProbeCallback, load_probe_set
from hf_medvis.training.callbacks.preemption import exit_if_preempted
from hf_medvis.training.cards import mae_model_card, write_model_card
from hf_medvis.training.distributed import end_distributed_process, setup_distributed_env
from hf_medvis.training.mae_baselines import trainer_baselines
from hf_medvis.training.reporting import report_final_metrics, reporting_run
from hf_medvis.training.run import fit_run_to_data, match_model_to_data, recipe_errors, setup_run
from hf_medvis.training.trainer import MedVisTrainer

logger = logging.getLogger("pretrain_mae")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mae_tiny_demo.yaml"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    launch = setup_distributed_env()  # launcher variables (torchrun, accelerate, Azure ML, MPI) -> torch's, first
    # 1. Arguments: dataclasses + optional YAML config; bad input fails here, before anything is written.
    model_args, data_args, training_args, monitoring_args = parse_recipe_args(
        (MAEModelArguments, MAEDataArguments, PretrainingArguments, MonitoringArguments), argv, DEFAULT_CONFIG
    )
    # Logging, environment report, the checks that fail before anything is written, seed; logs what it changed.
    run = setup_run(training_args, launch)
    with recipe_errors():
        # 2. Model: a checkpoint or a fresh preset architecture.
        model = build_model(model_args, task="mae").model
        image_size = model.config.image_size

        # 3. Data: uint8 crops from the workers (drawn per sample); normalisation happens on the device, with the
        # checkpoint's statistics, else the prepared shards' own, else X-ray defaults.
        with training_args.main_process_first(desc="preparing data"):
            data = build_datasets(data_args, task="mae", image_size=image_size, seed=training_args.seed)
        match_model_to_data(model.config, data.image_input)  # before the mean/std: names the channel mismatch
        mean, std = resolve_normalization(
            model_args.model_name_or_path,
            model.config.num_channels,
            data_args.image_mean,
            data_args.image_std,
            data_stats=data.normalization,
            cache_dir=model_args.cache_dir,
        )
        probe_set = None  # --probe_labels: the online probe's images, decoded now so a bad file fails before training
        if data_args.probe_labels:
            probe_set = load_probe_set(
                data_args.probe_data,
                data_args.probe_labels,
                image_size=image_size,
                max_images=data_args.probe_max_images,
                storage_options=data_args.parsed_storage_options(),
                labels_format=data_args.parsed_labels_format(),
            )
    fit_run_to_data(run, training_args, data.train, data.eval)  # a stream needs --max_steps; no eval set, no eval
    logger.info(
        "data: %s from %s; %s",
        data.source.description,
        describe(data.source.location),
        ", ".join(f"{k} {v}" for k, v in data.info.items()),
    )
    logger.info(
        "model: ViTMAE %s parameters, image %d, patch %d, %d channels, mask ratio %.2f",
        f"{count_parameters(model):,}",
        image_size,
        model.config.patch_size,
        model.config.num_channels,
        model.config.mask_ratio,
    )
    logger.info("world size %d; %s", training_args.world_size, run.lr_line)

    # 4. Trainer.
    card_state: dict = {"metrics": {}}

    def write_card(output_dir: str) -> None:
        content = mae_model_card(
            trainer.model if hasattr(trainer.model, "config") else model,
            model_args,
            data_args,
            training_args,
            data_description=data.source.description,
            data_info=data.info,
            lr_line=run.lr_line,
            metrics=card_state["metrics"],
            synthetic=data.source.synthetic,
        )
        write_model_card(output_dir, content)

    trainer = MedVisTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_pixels,
        processing_class=build_image_processor(image_size, mean, std),
        callbacks=build_recipe_callbacks(training_args, monitoring_args, data.train, run.checkpoint),
        image_mean=mean,
        image_std=std,
        model_card_writer=write_card,
        train_augment=data.device_augmentation,
        sample_augmentation=data.augmentation,
    )
    if probe_set is not None:  # logs through the Trainer, scores with the evaluation metrics (not importable there)
        trainer.add_callback(OnlineProbeCallback(trainer, probe_set, classification_metrics, data_args.probe_steps))

    # 5. Train and evaluate, all of it in one MLflow run per job where MLflow reports (reporting.py).
    with reporting_run(training_args):
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
        exit_if_preempted(trainer)  # SIGTERM: the checkpoint is saved; exit 0 and let the restart resume
        metrics = dict(train_result.metrics)
        metrics["global_step"] = trainer.state.global_step
        if data.eval is not None:
            metrics.update(trainer.evaluate())  # the Trainer logs it to the reporters
            # What the held-out loss means: the same loss of predicting the mean patch, or the mean image, everywhere.
            baselines = trainer_baselines(trainer, data.eval)
            report_final_metrics(trainer, baselines)
            metrics.update(baselines)
        trainer.log_metrics("all", metrics)

        # 6. Save (model, processor, card, reconstructions) and push.
        trainer.save_model()
        trainer.save_state()
        card_state["metrics"] = {
            k: v
            for k, v in metrics.items()
            if k in ("train_loss", "eval_loss", "eval_loss_mean_patch", "eval_loss_position_mean", "global_step")
        }
        if trainer.is_world_process_zero():
            write_card(training_args.output_dir)
            write_skipped_images(training_args.output_dir, data.skipped_images)  # the files left out, and why
            if data.eval is not None and data_args.num_reconstruction_images > 0:
                batch = collate_pixels(first_examples(data.eval, data_args.num_reconstruction_images))["pixel_values"]
                original, masked, recon = reconstruct(trainer.model, batch, mean, std, seed=training_args.seed)
                save_reconstruction_grid(
                    Path(training_args.output_dir) / "reconstructions.png",
                    original,
                    masked,
                    recon,
                    title=f"held-out images, step {trainer.state.global_step}",
                )
            written = sorted(p.name for p in Path(training_args.output_dir).iterdir() if not p.name.startswith("."))
            logger.info("outputs in %s: %s", Path(training_args.output_dir).resolve(), ", ".join(written))
        trainer.save_metrics("all", metrics)  # last: a folder with all_results.json holds a finished run
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message=f"MAE pretraining, step {trainer.state.global_step}")
    return metrics


if __name__ == "__main__":
    main()
    end_distributed_process()  # several processes: exit without the interpreter's teardown (distributed.py)
