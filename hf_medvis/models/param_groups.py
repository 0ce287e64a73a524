"""Optimizer parameter groups for fine-tuning: layer-wise learning-rate decay and selective weight decay.

Layer-wise decay (BEiT; used by MAE fine-tuning): the head and final norm train at the full lr, block i (of L, counted
from 1) at lr x decay^(L + 1 - i), the embeddings at lr x decay^(L + 1); pretrained low layers move least. ViT, DeiT, BEiT
and Dinov2 number their encoder layers; Swin and ConvNeXt their blocks stage by stage, in order (a stage's down-sampling
goes with the block next to it: Swin merges patches after a stage's last block, ConvNeXt down-samples before a stage's
first). Another architecture gets one lr (logged). Weight decay does not apply to norms, biases, tokens, position
embeddings and relative position bias tables (MAE/timm convention: shrinking them towards zero only hurts).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from .backbones import block_depths, find_backbone
from .modeling_hf_medvis_seg import MODEL_TYPE as SEGMENTATION_MODEL_TYPE

logger = logging.getLogger(__name__)

_NO_DECAY_NAMES = (
    "cls_token", "position_embeddings", "mask_token", "pos_embed", "distillation_token", "relative_position_bias_table",
)  # fmt: skip
# transformers 5 ViT / DeiT / BEiT: "layers.N"; ViTMAE, Dinov2: "encoder.layer.N"
_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")
# Swin: "encoder.layers.S.blocks.B"; ConvNeXt: "encoder.stages.S.layers.B"
_STAGE_BLOCK = re.compile(r"(?:^|\.)encoder\.(?:layers|stages)\.(\d+)\.(?:blocks|layers)\.(\d+)\.")
_SWIN_PATCH_MERGING = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.downsample\.")
_CONVNEXT_DOWNSAMPLING = re.compile(r"(?:^|\.)encoder\.stages\.(\d+)\.downsampling_layer\.")


def layer_id(name: str, num_layers: int, stage_depths: Sequence[int] | None = None) -> int:
    """0 for embeddings, i + 1 for encoder block i (counted over all stages when ``stage_depths`` gives the blocks per
    stage), num_layers + 1 for the final norm, the pooler and the head."""
    if ".embeddings." in f".{name}":
        return 0
    if stage_depths is not None:
        match = _STAGE_BLOCK.search(name)
        if match:
            return sum(stage_depths[: int(match.group(1))]) + int(match.group(2)) + 1
        match = _SWIN_PATCH_MERGING.search(name)
        if match:  # after stage S: with its last block
            return sum(stage_depths[: int(match.group(1)) + 1])
        match = _CONVNEXT_DOWNSAMPLING.search(name)
        if match:  # before stage S: with its first block
            return sum(stage_depths[: int(match.group(1))]) + 1
        return num_layers + 1
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in _NO_DECAY_NAMES)


def vit_param_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Groups keyed by (layer, decay / no decay), each with its own ``lr``; trainable parameters only. Any backbone of
    ``backbones.BACKBONES``; another model gets no layer decay (one lr, said in one log line).

    The Trainer's schedulers are LambdaLR-based: they scale each group's own initial lr, so the per-layer ratios hold
    through warmup and cosine decay.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1], got {layer_decay}")
    config = getattr(model, "config", None)
    stage_depths = block_depths(config) if config is not None else None
    if stage_depths is not None:
        num_layers = sum(stage_depths)
    elif find_backbone(config) is not None or getattr(config, "model_type", None) == SEGMENTATION_MODEL_TYPE:
        num_layers = config.num_hidden_layers  # (a segmentation model: its ViT encoder's layers, decoder at full lr)
    else:
        num_layers = 0
        if layer_decay < 1:
            logger.warning(
                "no layer decay for %s (its layers are not numbered here): one learning rate for every parameter",
                getattr(config, "model_type", type(model).__name__),
            )
        layer_decay = 1.0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_layers, stage_depths) if num_layers else 0
        no_decay = skips_weight_decay(name, param)
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer) if num_layers else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "lr": learning_rate * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]
