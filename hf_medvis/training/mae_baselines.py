"""The trivial baselines an MAE's held-out reconstruction loss must beat to have learned anything beyond the average:

- ``mean_patch``: every masked patch predicted as the mean training patch (one vector for all positions);
- ``position_mean``: each masked patch predicted as the mean training patch at its position (the mean image).

Both are measured on the held-out images with the model's own loss (per-patch mean squared error on the model's
target: pixels normalised as its inputs, per patch when ``norm_pix_loss``), over every patch: the MAE's loss averages
its randomly masked patches, whose expectation is the same. Training statistics come from up to ``max_images``
training images as the Trainer feeds them (the crops the MAE was trained on)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .sample_trace import BATCH_KEY as TRACE_BATCH_KEY


def _targets(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, patches, patch_dim] targets of ViTMAEForPreTraining's loss."""
    target = model.patchify(pixel_values)
    if model.config.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


@torch.no_grad()
def mae_trivial_baselines(
    model: Any,
    train_batches: Iterable[dict],
    eval_batches: Iterable[dict],
    *,
    prepare_train: Callable[[dict], dict],
    prepare_eval: Callable[[dict], dict],
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    max_images: int = 512,
) -> dict[str, float]:
    """``{"eval_loss_mean_patch": ..., "eval_loss_position_mean": ...}``. ``prepare_*`` turn a collated batch into
    model inputs on the device; ``reduce`` sums a tensor over ranks (each rank sees its share of the data)."""
    total, count = None, 0
    for batch in train_batches:
        target = _targets(model, prepare_train(batch)["pixel_values"]).double()
        total = target.sum(dim=0) if total is None else total + target.sum(dim=0)
        count += target.shape[0]
        if count >= max_images:
            break
    if total is None:
        return {}
    counted = reduce(torch.tensor([float(count)], dtype=torch.float64, device=total.device))
    position_mean = reduce(total) / counted  # [patches, patch_dim]
    mean_patch = position_mean.mean(dim=0, keepdim=True)  # [1, patch_dim]
    sums = torch.zeros(3, dtype=torch.float64, device=total.device)  # mean_patch, position_mean, patches
    for batch in eval_batches:
        target = _targets(model, prepare_eval(batch)["pixel_values"]).double()
        sums[0] += ((target - mean_patch) ** 2).mean(dim=-1).sum()
        sums[1] += ((target - position_mean) ** 2).mean(dim=-1).sum()
        sums[2] += target.shape[0] * target.shape[1]
    sums = reduce(sums)
    if not float(sums[2]):
        return {}
    return {"eval_loss_mean_patch": float(sums[0] / sums[2]), "eval_loss_position_mean": float(sums[1] / sums[2])}


def trainer_baselines(trainer: Any, eval_dataset: Any, max_images: int = 512) -> dict[str, float]:
    """The baselines for a finished ``MedVisTrainer`` run: its training loader (the crops it trained on) for the
    statistics, ``eval_dataset`` for the loss; every rank takes part (the loaders and the sums are collective)."""
    model = trainer.model
    was_training = model.training

    def prepare(training: bool) -> Callable[[dict], dict]:
        def run(batch: dict) -> dict:
            batch.pop(TRACE_BATCH_KEY, None)  # not a training step: nothing for the sample trace
            model.train(training)  # the trainer applies its on-device augmentation to training batches only
            return trainer._prepare_inputs(batch)

        return run

    try:
        return mae_trivial_baselines(
            model,
            trainer.get_train_dataloader(),
            trainer.get_eval_dataloader(eval_dataset),
            prepare_train=prepare(True),
            prepare_eval=prepare(False),
            reduce=lambda t: trainer.accelerator.reduce(t, reduction="sum"),
            max_images=max_images,
        )
    finally:
        model.train(was_training)
