"""Optimizer parameter groups for ViT fine-tuning: layer-wise learning-rate decay and selective weight decay.

Layer-wise decay (BEiT; used by MAE fine-tuning): the head and final norm train at the full lr, block i at
lr x decay^(L - i), the embeddings at lr x decay^(L + 1); pretrained low layers move least. Weight decay does not apply to
norms, biases, the CLS token and position embeddings (MAE/timm convention: shrinking them towards zero only hurts).
"""

from __future__ import annotations

import re
from typing import Any

import torch

_NO_DECAY_NAMES = ("cls_token", "position_embeddings", "mask_token", "pos_embed")
_BLOCK = re.compile(
    r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\."
)  # transformers 5 ViT: "layers"; ViTMAE: "encoder.layer"


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder block i, num_layers + 1 for the final norm and the head."""
    if ".embeddings." in f".{name}":
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in _NO_DECAY_NAMES)


def vit_param_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Groups keyed by (layer, decay / no decay), each with its own ``lr``; trainable parameters only.

    The Trainer's schedulers are LambdaLR-based: they scale each group's own initial lr, so the per-layer ratios hold
    through warmup and cosine decay.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1], got {layer_decay}")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_layers)
        no_decay = skips_weight_decay(name, param)
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer)
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
