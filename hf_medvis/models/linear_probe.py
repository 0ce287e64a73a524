"""Linear probing, the MAE paper's second protocol: the pretrained encoder frozen, a linear head trained on its
features through a BatchNorm without affine parameters (the features of an MAE encoder are not normalised; the paper
adds this BatchNorm so one learning rate fits every encoder).

The BatchNorm is only a reparametrisation of the linear head at inference: ``fold_linear_probe`` folds its running
statistics into the linear layer, so the saved model is a plain ``ViTForImageClassification`` with an ``nn.Linear``
classifier that transformers loads as it is (checkpoints written during training keep the BatchNorm, for resuming).
"""

from __future__ import annotations

import torch
from torch import nn


class ProbeHead(nn.Sequential):
    """BatchNorm1d(affine=False) then Linear: the MAE linear-probing head."""

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        linear = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(linear.weight, std=0.01)  # as the MAE repository's linear probe
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(hidden_size, affine=False, eps=1e-6), linear)


def attach_linear_probe(model: nn.Module) -> nn.Module:
    """Freezes every parameter of ``model`` and replaces its ``classifier`` with a trainable ``ProbeHead``."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = model.classifier
    model.classifier = ProbeHead(head.in_features, head.out_features).to(head.weight.device, head.weight.dtype)
    return model


def is_linear_probe(model: nn.Module) -> bool:
    return isinstance(getattr(model, "classifier", None), ProbeHead)


@torch.no_grad()
def fold_linear_probe(model: nn.Module) -> nn.Module:
    """Folds the head's BatchNorm (running statistics, as in evaluation) into its Linear layer: same outputs in eval
    mode, one plain ``nn.Linear`` classifier."""
    if not is_linear_probe(model):
        return model
    norm, linear = model.classifier[0], model.classifier[1]
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device, linear.weight.dtype)
    weight = linear.weight.double() * scale
    folded.weight.copy_(weight)
    folded.bias.copy_(linear.bias.double() - weight @ norm.running_mean.double())
    model.classifier = folded
    return model
