"""A ViT classifier that pools the mean of the patch tokens (the MAE fine-tuning default) instead of the CLS token.

Saved under its own ``model_type`` ("hf_medvis_vit") with this file beside the weights and an ``auto_map`` in
config.json (``save_pretrained`` copies the file: both classes are registered for their Auto classes below). So plain
transformers never mistakes such a folder for a CLS-pooled ``vit``: ``AutoModelForImageClassification`` and
``pipeline("image-classification")`` refuse it unless ``trust_remote_code=True``, and with it they run this code.

This file is copied into every saved folder and must stay self-contained: it imports torch and transformers only, never
hf_medvis (which a user of the saved model may not have installed).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

MODEL_TYPE = "hf_medvis_vit"


class MeanPoolViTConfig(ViTConfig):
    """``ViTConfig`` of a mean-pooled classifier; config.json also records ``pooling: "mean"``."""

    model_type = MODEL_TYPE


class MeanPoolViTForImageClassification(ViTForImageClassification):
    """Global average pooling of the patch tokens (the CLS token left out) before the classifier head."""

    config_class = MeanPoolViTConfig

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 1:, :].mean(dim=1))
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# save_pretrained (ours, the Trainer's checkpoints, push_to_hub) copies this file and writes config.json's auto_map.
MeanPoolViTConfig.register_for_auto_class()
MeanPoolViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
