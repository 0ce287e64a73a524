"""``build_model(model_args, task)``: the one way the recipes build their model (a preset, a Hub id or a local folder),
and the input size the data transforms need before it exists."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from ..core.presets import load_presets
from ..core.tasks import MAE, SEGMENTATION, check_task
from .arguments import ModelArguments
from .backbones import VIT, backbone_of, set_pooling
from .build import build_mae_model
from .segmentation import build_segmenter, is_segmentation_model, is_segmenter, segmentation_source_config
from .transfer import LabelSet, LoadReport, build_classifier, load_config


@dataclass
class BuiltModel:
    model: PreTrainedModel
    load_report: LoadReport  # what was loaded, dropped, missing or re-initialised


def build_model(model_args: ModelArguments, task: str, labels: LabelSet | Sequence[str] | None = None) -> BuiltModel:
    """``task`` "mae": a ``ViTMAEForPreTraining`` (``MAEModelArguments``); "classification": an image
    classifier for ``labels`` (``ClassifierModelArguments``): a new ViT from a preset, or the checkpoint's architecture
    (ViT, or an MAE's encoder as a ViT; DeiT, BEiT, Dinov2, Swin, ConvNeXt: ``backbones.BACKBONES``) with a new head;
    "segmentation": a ViT encoder with a decoder for the mask classes ``labels`` (names, index = class value;
    ``SegmentationModelArguments``, ``segmentation.build_segmenter``)."""
    check_task(task)
    if task == MAE:
        model = build_mae_model(
            model_args.model_name_or_path,
            preset=model_args.model_preset,
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            num_channels=model_args.num_channels,
            mask_ratio=model_args.mask_ratio,
            norm_pix_loss=model_args.norm_pix_loss,
            config_overrides=model_args.config_overrides,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )
        source = model_args.model_name_or_path
        if source is None:
            return BuiltModel(model, LoadReport(f"preset {model_args.model_preset}", "new"))
        return BuiltModel(model, LoadReport(source, "vit_mae", loaded=sorted(model.state_dict())))
    if labels is None:
        raise ValueError(f"build_model(task='{task}') needs the labels")
    # What the encoder of either head is built from: the checkpoint's config, the preset, the flags.
    encoder = {
        "preset": model_args.model_preset,
        "image_size": input_image_size(model_args),
        "patch_size": model_args.patch_size,
        "num_channels": model_args.num_channels,
        "hidden_dropout_prob": model_args.hidden_dropout_prob,
        "attention_probs_dropout_prob": model_args.attention_probs_dropout_prob,
        "drop_path_rate": model_args.drop_path_rate,
        "config_overrides": model_args.config_overrides,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": model_args.trust_remote_code,
        "cache_dir": model_args.cache_dir,
    }
    if task == SEGMENTATION:
        model, report = build_segmenter(
            model_args.model_name_or_path,
            tuple(getattr(labels, "names", labels)),
            decoder_hidden_size=model_args.decoder_hidden_size,
            dice_loss_weight=model_args.dice_loss_weight,
            **encoder,
        )
    else:
        model, report = build_classifier(model_args.model_name_or_path, labels, pooling=model_args.pooling, **encoder)
    return BuiltModel(model, report)


def input_image_size(model_args: ModelArguments) -> int:
    """The input size before the model is built (data transforms need it): the flag, else the checkpoint's, else the
    preset's. A checkpoint of an unsupported architecture, or a ``--pooling`` its architecture cannot do, is a one-line
    ``ModelSetupError`` here, before any data is read."""
    if model_args.model_name_or_path:
        try:
            if is_segmentation_model(model_args.model_name_or_path):  # (not a classifier's starting point)
                config = segmentation_source_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
            else:
                config = load_config(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
        except (OSError, ValueError):
            config = None  # building the model reports the real problem with the checkpoint
        if config is not None:
            backbone = VIT if is_segmenter(config) else backbone_of(config, model_args.model_name_or_path)
            if backbone is not VIT:  # (a ViT's --pooling is checked with the arguments)
                set_pooling(copy.deepcopy(config), backbone, getattr(model_args, "pooling", None))
            if not model_args.image_size and isinstance(getattr(config, "image_size", None), int):
                return int(config.image_size)
    if model_args.image_size:
        return model_args.image_size
    return int(load_presets().get(model_args.model_preset, {}).get("image_size", 224))
