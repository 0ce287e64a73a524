"""Image transforms. CPU workers only crop and resize uint8 tensors; float conversion, normalisation and channel
replication happen on the accelerator (``normalize_batch``), so loader workers are not the bottleneck on a GPU host."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# NIH ChestX-ray14 grayscale statistics (lambert-x/medical_mae); used when a model brings no processor of its own.
XRAY_MEAN = 0.5056
XRAY_STD = 0.252


def build_pretrain_transform(
    image_size: int, crop_scale: Sequence[float] = (0.2, 1.0), hflip: bool = True
) -> v2.Compose:
    """MAE augmentation: RandomResizedCrop (bicubic) + optional horizontal flip, on a uint8 [1, H, W] tensor."""
    steps: list = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def build_eval_transform(image_size: int) -> v2.Compose:
    """Deterministic: shorter side to ``image_size`` then centre crop."""
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def to_uint8_tensor(image) -> torch.Tensor:
    """A float [0, 1] or uint8 H x W array to a uint8 [1, H, W] tensor."""
    tensor = torch.as_tensor(image)
    if tensor.dtype != torch.uint8:
        tensor = (tensor.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    return tensor


def normalize_batch(
    pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float], num_channels: int
) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> normalised float [B, C, H, W]; float inputs are taken as already normalised."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    x = pixel_values.float().div_(255.0)
    if x.shape[1] == 1 and num_channels > 1:
        x = x.expand(-1, num_channels, -1, -1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
