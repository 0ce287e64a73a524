"""Stochastic depth (drop-path) for transformers' ViT and DeiT encoders, which have none: the regulariser the MAE and
medical_mae fine-tuning recipes use (0.1-0.2). BEiT, Dinov2, Swin and ConvNeXt have their own (config
``drop_path_rate``, set at load by ``transfer.build_classifier``): this is placed only where a model has none. Each
layer's residual branches (attention, MLP) are dropped per sample with a rate rising linearly from 0 at the first layer
to ``rate`` at the last, and the kept ones scaled by 1 / (1 - rate_i) (torchvision's ``StochasticDepth``, "row" mode);
off in evaluation.

Why in place: transformers' ``ViTLayer`` (and ``DeiTLayer``, its copy) applies one ``dropout`` module to each branch
just before its residual add, so putting ``StochasticDepth`` after that dropout is exactly drop-path, and it adds no
parameter: the saved model is a plain ViT (DeiT) that transformers reloads without our code and that scores the same.
``tests/test_drop_path.py`` fails if a transformers release moves that dropout."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import StochasticDepth
from transformers import PreTrainedModel

from .build import ModelSetupError


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers of a ViT / ViTMAE / DeiT model: ``<base model>.layers`` (transformers 5), or
    ``<base model>.encoder.layer`` (transformers 4)."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelSetupError(f"--drop_path_rate: {type(model).__name__} has no ViT encoder layers")
    return layers


def add_drop_path(model: PreTrainedModel, rate: float) -> list[float]:
    """Drop-path on ``model``'s encoder layers with ``rate`` at the last layer; returns the per-layer rates. Calling it
    again replaces the rates (0 removes drop-path)."""
    if not 0 <= rate < 1:
        raise ModelSetupError(f"--drop_path_rate must be in [0, 1), got {rate}")
    layers = encoder_layers(model)
    rates = torch.linspace(0, rate, len(layers)).tolist()  # as the MAE fine-tuning code spaces them
    for index, (layer, layer_rate) in enumerate(zip(layers, rates, strict=True)):
        branch_dropout = getattr(layer, "dropout", None)
        if isinstance(branch_dropout, nn.Sequential):  # ours, from an earlier call
            branch_dropout = branch_dropout[0]
        if not isinstance(branch_dropout, nn.Dropout):
            raise ModelSetupError(
                f"--drop_path_rate: layer {index} ({type(layer).__name__}) has no dropout before its residual adds in "
                "this transformers version; drop-path cannot be placed"
            )
        layer.dropout = nn.Sequential(branch_dropout, StochasticDepth(layer_rate, "row")) if rate else branch_dropout
    return rates
