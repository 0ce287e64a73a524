"""MAE reconstructions of held-out images and their figure (rows: original / masked input / reconstruction)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import normalize_batch
from .plots import pyplot, save_figure


@torch.no_grad()
def reconstruct(
    model: Any, pixel_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (original, masked, reconstruction) display images in [0, 1], each [N, H, W] (first channel).

    With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; they are mapped back with each target
    patch's own mean and variance, as the MAE paper's figures do.
    """
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = model.config
    pixels = normalize_batch(pixel_uint8.to(device), mean, std, config.num_channels).float()
    num_patches = (config.image_size // config.patch_size) ** 2
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(pixels.shape[0], num_patches, generator=generator).to(device)
    outputs = model(pixel_values=pixels, noise=noise)
    prediction = outputs.logits.float()
    if config.norm_pix_loss:
        target = model.patchify(pixels)
        patch_mean = target.mean(dim=-1, keepdim=True)
        patch_var = target.var(dim=-1, keepdim=True)
        prediction = prediction * (patch_var + 1e-6) ** 0.5 + patch_mean
    reconstruction = model.unpatchify(prediction)
    mask = outputs.mask.unsqueeze(-1).repeat(1, 1, config.patch_size**2 * config.num_channels)
    mask = model.unpatchify(mask)  # 1 = masked
    masked = pixels * (1 - mask)
    # Show visible patches as they were and the masked ones as predicted (the usual MAE figure).
    pasted = pixels * (1 - mask) + reconstruction * mask
    if model_was_training:
        model.train()

    def to_display(x: torch.Tensor, fill_masked: bool = False) -> np.ndarray:
        channel = x[:, 0] * std[0] + mean[0]
        if fill_masked:
            channel = torch.where(mask[:, 0] > 0, torch.full_like(channel, 0.5), channel)
        return channel.clamp(0, 1).cpu().numpy()

    return to_display(pixels), to_display(masked, fill_masked=True), to_display(pasted)


def save_reconstruction_grid(
    path: str | os.PathLike, original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray, title: str = ""
) -> Path:
    """Writes a 3-row PNG (original / masked input / reconstruction), atomically."""
    plt = pyplot()
    n = original.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for row, (name, images) in enumerate(
        (("original", original), ("masked", masked), ("reconstruction", reconstruction))
    ):
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(images[col], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
