"""Segmentation models for our mask classes: a ViT encoder (from a preset, a ViT checkpoint, an MAE pretraining output
or one of our segmentation models) with a progressive-upsampling decoder (``modeling_hf_medvis_seg``), the processor
saved beside it, and loading a saved one back.

The encoder weights come through ``transfer``'s transfer (loaded at the checkpoint's own image size, position
embeddings interpolated to a new one, a ``LoadReport`` of what was loaded, dropped and freshly initialised); the decoder
is new unless the checkpoint is itself a segmentation model with the same decoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig, SegformerImageProcessor

from ..core.errors import first_line
from .backbones import VIT, backbone_of
from .build import ModelSetupError
from .drop_path import add_drop_path
from .modeling_hf_medvis_seg import MODEL_TYPE, PIPELINES, ViTForSemanticSegmentation, ViTSegmentationConfig
from .transfer import LoadReport, _source_config, _transfer, build_vit_config

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # unlabelled pixels: no loss, no metric
DEFAULT_DECODER_HIDDEN_SIZE = 256


def segmentation_source_config(
    model_name_or_path: str, trust_remote_code: bool = False, cache_dir: str | None = None
) -> PretrainedConfig:
    """The config of a checkpoint to start from: one of our segmentation models (read with our class, without running
    the code saved beside it), else whatever ``transfer`` accepts (ViT, ViTMAE, ...)."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError):
        config_dict = {}  # transfer's reader names the problem below
    if config_dict.get("model_type") == MODEL_TYPE:
        return ViTSegmentationConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    return _source_config(model_name_or_path, trust_remote_code, cache_dir)


def segmentation_config(
    source: PretrainedConfig | None,
    mask_labels: Sequence[str],
    *,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int | None = None,
    decoder_hidden_size: int | None = None,
    dice_loss_weight: float = 1.0,
    config_overrides: str | None = None,
) -> ViTSegmentationConfig:
    """The encoder of ``source`` (or of ``preset``) with a decoder for ``mask_labels`` (index = class value)."""
    if len(mask_labels) < 2:
        raise ModelSetupError(f"segmentation needs at least 2 mask classes (background first), got {len(mask_labels)}")
    encoder = build_vit_config(
        source,
        preset=preset,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        overrides=config_overrides,
    )
    fields = encoder.to_dict()
    fields.pop("model_type", None)
    config = ViTSegmentationConfig.from_dict(fields)
    if decoder_hidden_size is None:
        decoder_hidden_size = getattr(source, "decoder_hidden_size", None) if is_segmenter(source) else None
    config.decoder_hidden_size = int(decoder_hidden_size or DEFAULT_DECODER_HIDDEN_SIZE)
    if config.decoder_hidden_size < 1:
        raise ModelSetupError(f"--decoder_hidden_size must be positive, got {config.decoder_hidden_size}")
    config.dice_loss_weight = float(dice_loss_weight)
    config.semantic_loss_ignore_index = IGNORE_INDEX
    config.num_labels = len(mask_labels)
    config.id2label = dict(enumerate(mask_labels))
    config.label2id = {name: i for i, name in enumerate(mask_labels)}
    config.custom_pipelines = PIPELINES
    return config


def is_segmenter(config: PretrainedConfig | None) -> bool:
    """Whether ``config`` is one of our segmentation models'."""
    return getattr(config, "model_type", None) == MODEL_TYPE


def build_segmenter(
    model_name_or_path: str | None,
    mask_labels: Sequence[str],
    *,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int | None = None,
    decoder_hidden_size: int | None = None,
    dice_loss_weight: float = 1.0,
    hidden_dropout_prob: float = 0.0,
    attention_probs_dropout_prob: float = 0.0,
    drop_path_rate: float = 0.0,
    config_overrides: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> tuple[ViTForSemanticSegmentation, LoadReport]:
    """A segmentation model for ``mask_labels`` and the report of what was transferred: a new ViT from ``preset``, or
    the encoder of a ViT / ViTMAE checkpoint (MAE decoder dropped, a classifier head unused) with a new decoder."""
    source = (
        segmentation_source_config(model_name_or_path, trust_remote_code, cache_dir) if model_name_or_path else None
    )
    if source is not None and not is_segmenter(source) and backbone_of(source, str(model_name_or_path)) is not VIT:
        raise ModelSetupError(
            f"--model_name_or_path: {model_name_or_path} is a '{source.model_type}' model; segmentation starts from a "
            "ViT, a ViT-MAE or one of our segmentation models"
        )
    config = segmentation_config(
        source,
        mask_labels,
        preset=preset,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        decoder_hidden_size=decoder_hidden_size,
        dice_loss_weight=dice_loss_weight,
        config_overrides=config_overrides,
    )
    config.hidden_dropout_prob = hidden_dropout_prob
    config.attention_probs_dropout_prob = attention_probs_dropout_prob
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if source is None:
        model, report = ViTForSemanticSegmentation(config), LoadReport(source=f"preset {preset}", source_type="new")
    else:
        # The same transfer as a classifier's: at the checkpoint's image size, then position embeddings resized.
        model, report = _transfer(
            ViTForSemanticSegmentation, config, source, str(model_name_or_path), trust_remote_code, cache_dir
        )
    if drop_path_rate:
        add_drop_path(model, drop_path_rate)
    return model, report


def build_segmentation_processor(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> SegformerImageProcessor:
    """The processor saved beside a segmentation model, so that transformers' ``pipeline("image-segmentation")``
    preprocesses as evaluation and ``hf-medvis predict`` do: the whole image resized to ``image_size`` squared (bicubic;
    no crop, every pixel gets a label), rescaled, normalised; its ``post_process_semantic_segmentation`` upsamples the
    logits bilinearly to the input's size and takes the argmax, as ``SegmentationPredictor`` does."""
    return SegformerImageProcessor(
        do_convert_rgb=len(mean) == 3,
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic, as in training
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=False,
    )


def load_segmenter(model_dir: str | os.PathLike, **kwargs: Any) -> ViTForSemanticSegmentation:
    """A saved segmentation model (the recipe's output or a checkpoint-N of it), loaded with our class (not the code
    saved beside it). Another kind of folder is a one-line ``ModelSetupError``."""
    model_dir = os.fspath(model_dir)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_dir)
    except (OSError, ValueError) as err:
        raise ModelSetupError(f"cannot read a model config in {model_dir}: {first_line(err)}") from None
    if config_dict.get("model_type") != MODEL_TYPE:
        raise ModelSetupError(
            f"{model_dir} is not a segmentation model (model_type '{config_dict.get('model_type')}', not '{MODEL_TYPE}')"
        )
    try:
        return ViTForSemanticSegmentation.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ModelSetupError(f"cannot load weights from {model_dir}: {first_line(err)}") from None


def is_segmentation_model(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir``'s config.json is one of our segmentation models (``hf-medvis evaluate`` / ``predict``
    dispatch on it)."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(os.fspath(model_dir))
    except (OSError, ValueError):
        return False
    return config_dict.get("model_type") == MODEL_TYPE
