"""The image-classification architectures a classifier can start from, and what each gets: its transformers class, how
its blocks are numbered for layer-wise lr decay, where drop-path lives, which ``--pooling`` values it can do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .build import ModelSetupError
from .modeling_hf_medvis_vit import MODEL_TYPE as MEAN_POOL_VIT


@dataclass(frozen=True)
class Backbone:
    """One supported architecture. ``poolings``: the ``--pooling`` values it can do (unset: its own pooling)."""

    name: str  # as people write it (logs, model cards)
    classifier: str  # the transformers class a fine-tuned model of it is
    example: str  # a Hub id of it
    poolings: tuple[str, ...]
    own_drop_path: bool  # config.drop_path_rate is its own stochastic depth; False: models/drop_path.py places ours
    staged: bool = False  # blocks numbered stage by stage (config.depths); else config.num_hidden_layers blocks

    def classifier_class(self) -> type[PreTrainedModel]:
        return getattr(transformers, self.classifier)


VIT = Backbone("ViT", "ViTForImageClassification", "google/vit-base-patch16-224", ("cls", "mean"), own_drop_path=False)
# Keyed by config.model_type. ViTMAE (pretraining) and our mean-pooled ViT classifiers are ViTs to a classifier.
BACKBONES: dict[str, Backbone] = {
    "vit": VIT,
    "vit_mae": VIT,
    MEAN_POOL_VIT: VIT,
    "deit": Backbone(
        "DeiT", "DeiTForImageClassification", "facebook/deit-base-distilled-patch16-224", ("cls",), own_drop_path=False
    ),
    # use_mean_pooling: the mean of the patch tokens (then a LayerNorm), or the CLS token.
    "beit": Backbone("BEiT", "BeitForImageClassification", "microsoft/beit-base-patch16-224", ("cls", "mean"), True),
    # the CLS token and the mean patch token, concatenated: neither --pooling value
    "dinov2": Backbone("Dinov2", "Dinov2ForImageClassification", "facebook/dinov2-base", (), own_drop_path=True),
    # global average pooling of the last stage
    "swin": Backbone(
        "Swin", "SwinForImageClassification", "microsoft/swin-tiny-patch4-window7-224", ("mean",), True, staged=True
    ),
    "convnext": Backbone(
        "ConvNeXt", "ConvNextForImageClassification", "facebook/convnext-tiny-224", ("mean",), True, staged=True
    ),
}
SUPPORTED_MODEL_TYPES = ", ".join(BACKBONES)


def find_backbone(config: PretrainedConfig | None) -> Backbone | None:
    """The entry of ``config``'s model_type, or None for an architecture this table does not know."""
    return BACKBONES.get(getattr(config, "model_type", None) or "")


def backbone_of(config: PretrainedConfig, source: str) -> Backbone:
    """``find_backbone``, or a one-line error naming the supported model types."""
    backbone = find_backbone(config)
    if backbone is None:
        raise ModelSetupError(
            f"--model_name_or_path: {source} is a '{config.model_type}' model; a ViT or ViT-MAE is needed, or another "
            f"supported image backbone (model_type {SUPPORTED_MODEL_TYPES})"
        )
    return backbone


def set_pooling(config: PretrainedConfig, backbone: Backbone, pooling: str | None) -> None:
    """``--pooling`` onto a non-ViT ``config`` (ViT: ``transfer.pooled_config``); None keeps the architecture's own.
    A value it cannot do is a one-line error."""
    if pooling is None:
        return
    if pooling not in backbone.poolings:
        can = f"--pooling {' or '.join(backbone.poolings)}" if backbone.poolings else "no --pooling value"
        raise ModelSetupError(
            f"--pooling {pooling}: {backbone.name} pools by {pooling_name(config)} and can do {can}; leave --pooling "
            "unset (a --config file may set it) to use its own"
        )
    if config.model_type == "beit":
        config.use_mean_pooling = pooling == "mean"


def pooling_name(config: PretrainedConfig) -> str:
    """How ``config``'s classifier pools the encoder output, in words."""
    model_type = config.model_type
    if model_type == "dinov2":
        return "the CLS token and the mean patch token concatenated"
    if model_type in ("swin", "convnext"):
        return "global average pooling"
    if model_type == "beit":
        return "the mean of the patch tokens" if config.use_mean_pooling else "the CLS token"
    return "the mean of the patch tokens" if getattr(config, "pooling", "cls") == "mean" else "the CLS token"


def block_depths(config: PretrainedConfig) -> list[int] | None:
    """Blocks per stage of a staged architecture (Swin, ConvNeXt: ``config.depths``), None for the others. Their
    ``num_hidden_layers`` counts stages, not blocks."""
    backbone = find_backbone(config)
    return list(config.depths) if backbone is not None and backbone.staged else None


def describe_architecture(config: PretrainedConfig) -> dict[str, Any]:
    """Name, encoder shape, input geometry and pooling of ``config``'s model, for logs and model cards."""
    backbone = find_backbone(config)
    depths = block_depths(config)
    if depths is not None:
        widths = getattr(config, "hidden_sizes", None) or [config.embed_dim * 2**i for i in range(len(depths))]
        encoder = f"{len(depths)} stages of {'/'.join(map(str, depths))} blocks, widths {'/'.join(map(str, widths))}"
    else:
        encoder = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads"
    return {
        "name": backbone.name if backbone else config.model_type,
        "model_type": config.model_type,
        "encoder": encoder,
        "image_size": config.image_size,
        "patch_size": getattr(config, "patch_size", None),  # a stem stride for ConvNeXt
        "num_channels": config.num_channels,
        "pooling": pooling_name(config),
    }
