"""What the run actually got, logged once training starts: the optimizer as built (by the Trainer or by DeepSpeed from
its config) and its learning rate. The lr the recipe derived must be the lr the optimizer uses; with DeepSpeed the two
can silently differ (see ``lr.refresh_deepspeed_lr``), so this reads it back from the optimizer itself."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


def optimizer_peak_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Per param group: the lr before any schedule (torch schedulers keep it as ``initial_lr``), else the current lr."""
    groups = getattr(optimizer, "param_groups", None) or []
    return [float(group.get("initial_lr", group.get("lr", float("nan")))) for group in groups]


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    inner = getattr(optimizer, "optimizer", None)  # accelerate / DeepSpeed wrappers keep the real one inside
    names = [type(optimizer).__name__]
    while inner is not None and len(names) < 4:
        names.append(type(inner).__name__)
        inner = getattr(inner, "optimizer", None)
    return " > ".join(names)


class OptimizerReportCallback(TrainerCallback):
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None:
            return
        lrs = sorted(set(optimizer_peak_lrs(optimizer)))
        logger.info(
            "optimizer %s: peak lr %s in %d param groups (learning_rate argument %g)",
            describe_optimizer(optimizer),
            ", ".join(f"{lr:.6g}" for lr in lrs),
            len(getattr(optimizer, "param_groups", [])),
            args.learning_rate,
        )
