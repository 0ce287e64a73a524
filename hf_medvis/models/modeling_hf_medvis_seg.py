"""Semantic segmentation with a plain ViT encoder: the patch tokens, as a grid, go through a small progressive-upsampling
decoder (SETR-PUP, Zheng et al. 2021: conv + norm + GELU, then 2x bilinear upsampling, down to 1/4 of the input) and a
1x1 convolution gives one logit per class at 1/4 of the input size. The loss upsamples the logits bilinearly to the
label size: cross-entropy plus a soft Dice loss (pooled over the batch, every class), pixels labelled 255 ignored.

Saved under its own ``model_type`` ("hf_medvis_seg") with this file beside the weights and an ``auto_map`` in
config.json (``save_pretrained`` copies the file: both classes are registered for their Auto classes below), so
``AutoModelForSemanticSegmentation`` and ``pipeline("image-segmentation")`` load it with ``trust_remote_code=True``;
config.json's ``custom_pipelines`` names ``ViTSegmentationPipeline`` below for that task.
The encoder is transformers' ``ViTModel`` under the prefix ``vit``: an MAE's or a ViT's encoder weights load key for key.

This file is copied into every saved folder and must stay self-contained: it imports torch and transformers only, never
hf_medvis (which a user of the saved model may not have installed).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import ImageSegmentationPipeline, ViTConfig, ViTModel, ViTPreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

MODEL_TYPE = "hf_medvis_seg"


class ViTSegmentationConfig(ViTConfig):
    """``ViTConfig`` of the encoder plus the decoder's width, the Dice weight of the loss and the ignored label.

    The decoder fields are plain class defaults (not dataclass fields), so the file works with transformers 4 and 5."""

    model_type = MODEL_TYPE
    decoder_hidden_size = 256  # channels of the upsampling convolutions
    dice_loss_weight = 1.0  # loss = cross-entropy + dice_loss_weight x (1 - soft Dice)
    semantic_loss_ignore_index = 255  # unlabelled pixels (transformers' segmentation models use the same name)


def upsampling_steps(patch_size: int) -> int:
    """How many 2x upsamplings take the patch grid (stride ``patch_size``) to stride 4, or as close as it gets."""
    return max(0, round(math.log2(patch_size / 4)))


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: batches of a few images per device, no SyncBatchNorm needed
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ProgressiveUpsamplingDecoder(nn.Module):
    """Token grid [B, D, h, w] -> logits [B, K, h * 2^n, w * 2^n] (n = ``upsampling_steps(patch_size)``)."""

    def __init__(self, config: ViTSegmentationConfig) -> None:
        super().__init__()
        width = config.decoder_hidden_size
        self.project = nn.Sequential(nn.Conv2d(config.hidden_size, width, 1), _norm(width), nn.GELU())
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(width, width, 3, padding=1),
                _norm(width),
                nn.GELU(),
            )
            for _ in range(upsampling_steps(config.patch_size))
        )
        self.classifier = nn.Conv2d(width, config.num_labels, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        features = self.project(grid)
        for stage in self.stages:
            features = stage(features)
        return self.classifier(features)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice of softmax(``logits``) [B, K, H, W] and one-hot ``labels`` [B, H, W],
    each class pooled over the batch's labelled pixels (MONAI's ``DiceLoss(softmax=True, batch=True)``)."""
    valid = (labels != ignore_index).unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(dim=1) * valid
    one_hot = nn.functional.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)
    one_hot = one_hot.to(logits.dtype) * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    return 1 - ((2 * intersection + smooth) / (total + smooth)).mean()


class ViTForSemanticSegmentation(ViTPreTrainedModel):
    """ViT encoder (no pooler) + progressive upsampling decoder. ``forward(pixel_values, labels=None)`` returns a
    ``SemanticSegmenterOutput`` with logits at 1/4 of the input (patch 16: 4x the patch grid; patch 8: 2x)."""

    config_class = ViTSegmentationConfig

    def __init__(self, config: ViTSegmentationConfig) -> None:
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.decode_head = ProgressiveUpsamplingDecoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> SemanticSegmenterOutput:
        # No **kwargs: the Trainer then treats the loss as a per-batch mean (gradient accumulation divides it).
        outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        tokens = outputs.last_hidden_state[:, 1:, :]  # the CLS token has no place on the grid
        patch = self.config.patch_size
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        logits = self.decode_head(grid)
        loss = None
        if labels is not None:
            upsampled = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            ignore = self.config.semantic_loss_ignore_index
            loss = nn.functional.cross_entropy(upsampled, labels.long(), ignore_index=ignore)
            if self.config.dice_loss_weight:
                loss = loss + self.config.dice_loss_weight * soft_dice_loss(upsampled.float(), labels.long(), ignore)
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ViTSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' image-segmentation pipeline, unchanged (the saved processor's resize, the upsampling of the
    logits to each input's size, one mask per class present), without its check of the model's class against the
    segmentation classes transformers ships, which logs an error for every model it does not ship."""

    def check_model_type(self, supported_models: object) -> None:
        return None


# The entry of config.json's custom_pipelines (hf_medvis.models.segmentation.segmentation_config sets it).
PIPELINES = {
    "image-segmentation": {
        "impl": f"{__name__.rsplit('.', 1)[-1]}.{ViTSegmentationPipeline.__name__}",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    }
}

# save_pretrained (ours, the Trainer's checkpoints, push_to_hub) copies this file and writes config.json's auto_map.
ViTSegmentationConfig.register_for_auto_class()
ViTForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
