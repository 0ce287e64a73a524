"""The Trainer subclass shared by the recipes: uint8 batches are normalised (and optionally augmented) on the
accelerator, and the model card is ours (written by the recipe) rather than the Trainer's generic one."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer

from ..data.transforms import normalize_batch, normalize_unit_batch
from .preemption import CheckpointCommitCallback, mark_incomplete
from .sample_trace import BATCH_KEY as TRACE_BATCH_KEY
from .sample_trace import SampleTrace


class MedVisTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        model_card_writer: Callable[[str], None] | None = None,
        train_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        """``train_augment`` (e.g. ``transforms.DeviceRandomResizedCrop``) maps a uint8 training batch on the device to
        float [0, 1] crops; the workers then only hand over fixed-size uint8 images. Evaluation batches skip it."""
        super().__init__(*args, **kwargs)
        self.train_augment = train_augment
        # Checkpoints count for resume only once marked complete (preemption.py); tracing is opt-in (sample_trace.py).
        if not any(isinstance(cb, CheckpointCommitCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(CheckpointCommitCallback())
        self.sample_trace = SampleTrace.from_env(self.args.process_index)
        if self.sample_trace is not None:
            self.data_collator = self.sample_trace.wrap_collator(self.data_collator)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.model_card_writer = model_card_writer
        # Self-supervised models return a loss without a labels key; let evaluation report it.
        self.can_return_loss = True

    def train(self, *args: Any, **kwargs: Any):
        # The commit marker must come after every other on_save (e.g. the stream position), whenever they were added.
        commit = [cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointCommitCallback)]
        for callback in commit:
            self.callback_handler.callbacks.remove(callback)
            self.callback_handler.callbacks.append(callback)
        return super().train(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:  # re-saving into an existing folder: incomplete until the commit callback says so
            mark_incomplete(os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        keys = inputs.pop(TRACE_BATCH_KEY, None) if isinstance(inputs, dict) else None
        if keys is not None and self.sample_trace is not None and self.model.training:
            self.sample_trace.record(self.state.global_step + 1, keys)
        inputs = super()._prepare_inputs(inputs)  # moves the uint8 batch to the device first: 4x fewer bytes
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            num_channels = getattr(self.model.config, "num_channels", pixel_values.shape[1])
            if self.train_augment is not None and self.model.training:  # training_step calls model.train() first
                unit = self.train_augment(pixel_values)
                inputs["pixel_values"] = normalize_unit_batch(unit, self.image_mean, self.image_std, num_channels)
            else:
                inputs["pixel_values"] = normalize_batch(pixel_values, self.image_mean, self.image_std, num_channels)
        return inputs

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # push_to_hub() calls this and would overwrite README.md with a generic card.
        if self.model_card_writer is not None and self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir)
