"""The Trainer subclass shared by the recipes: uint8 batches are normalised on the accelerator, and the model card is
ours (written by the recipe) rather than the Trainer's generic one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Trainer

from ..data.transforms import normalize_batch


class MedVisTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        model_card_writer: Callable[[str], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.model_card_writer = model_card_writer
        # Self-supervised models return a loss without a labels key; let evaluation report it.
        self.can_return_loss = True

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)  # moves the uint8 batch to the device first: 4x fewer bytes
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            num_channels = getattr(self.model.config, "num_channels", pixel_values.shape[1])
            inputs["pixel_values"] = normalize_batch(pixel_values, self.image_mean, self.image_std, num_channels)
        return inputs

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # push_to_hub() calls this and would overwrite README.md with a generic card.
        if self.model_card_writer is not None and self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir)
