"""Parameter counts of a model (any object with torch's ``parameters()`` / ``modules()``): model cards, recipe logs
and ``hf-medvis size`` count the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # duck-typed at run time: core imports no torch
    from torch.nn import Module


def count_parameters(model: Module) -> int:
    """All parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())


def parameter_counts(model: Module) -> dict[str, int]:
    """Total, trainable and largest-layer parameters (largest layer as DeepSpeed's ZeRO-3 estimator counts it: the
    most parameters held directly by one module)."""
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return {
        "total": count_parameters(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "largest_layer": largest,
    }
