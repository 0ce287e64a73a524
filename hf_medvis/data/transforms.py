"""Image transforms, every one made by ``create_transform(task, is_training, ...)``. CPU workers only crop and resize
uint8 tensors; float conversion, normalisation and channel replication happen on the accelerator (``normalize_batch``),
so loader workers are not the bottleneck on a GPU host."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..core.tasks import CLASSIFICATION, MAE, SEGMENTATION, check_task

# The options each training transform takes, with their defaults. Evaluation takes none.
_TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    MAE: {"crop_scale": (0.2, 1.0), "hflip": True},
    CLASSIFICATION: {"crop_scale": (0.8, 1.0), "rotation_degrees": 5.0, "rand_augment_magnitude": 0, "hflip": False},
    SEGMENTATION: {"crop_scale": (0.8, 1.0), "rotation_degrees": 5.0, "hflip": False},
}
# The mask value of unlabelled pixels (transformers' segmentation losses ignore it): pixels a rotation brings in from
# outside the image get it.
IGNORE_INDEX = 255


def create_transform(
    task: str,
    is_training: bool,
    *,
    image_size: int,
    crop_scale: Sequence[float] | None = None,
    hflip: bool | None = None,
    rotation_degrees: float | None = None,
    rand_augment_magnitude: int | None = None,
    load_size: int | None = None,
    seed: int | None = None,
) -> Callable[..., torch.Tensor]:
    """The image transform of ``task`` ("mae" or "classification") on a uint8 [C, H, W] tensor; it gives uint8
    [C, image_size, image_size] (normalisation happens on the accelerator, ``normalize_batch``). "segmentation": a
    joint transform of (image, mask) (``SegmentationTransform``).

    - evaluation (``is_training=False``), "mae" and "classification": shorter side to ``image_size`` (bicubic), centre
      crop. "segmentation": the whole image to ``image_size`` x ``image_size`` (bicubic; the mask nearest), no crop,
      so every input pixel has a prediction.
    - "mae" training: RandomResizedCrop(``crop_scale`` (0.2, 1.0), bicubic) + horizontal flip (``hflip`` True).
    - "classification" training, X-ray safe: RandomResizedCrop(``crop_scale`` (0.8, 1.0), ratio 0.9-1.1, bicubic),
      RandomRotation(``rotation_degrees`` 5, bilinear; 0 = off), RandAugment(2 ops, ``rand_augment_magnitude``; 0 =
      off), horizontal flip (``hflip`` False).
    - "segmentation" training: the same geometric draws on image and mask (torchvision v2 with ``tv_tensors.Mask``,
      which the v2 ops resample nearest): RandomResizedCrop(``crop_scale`` (0.8, 1.0), ratio 0.9-1.1),
      RandomRotation(``rotation_degrees`` 5; pixels brought in are 0 in the image and ``IGNORE_INDEX`` in the mask),
      horizontal flip (``hflip`` False). No photometric op: a mask has none to follow.
    - "mae" training with ``load_size``: only the worker half of on-device augmentation, a fixed-size uint8
      [C, load_size, load_size] (shorter side, centre crop; images already that size pass untouched), so batches stack
      for ``DeviceRandomResizedCrop`` on the accelerator -- a batch transform the Trainer applies, not built here.

    Options a task does not use are refused rather than ignored. ``seed`` (training) wraps the transform in a
    ``SeededAugmentation``, called as ``t(image, key)``: its draws then depend only on (seed, epoch, key)."""
    check_task(task)
    given = {
        name: value
        for name, value in (
            ("crop_scale", crop_scale),
            ("hflip", hflip),
            ("rotation_degrees", rotation_degrees),
            ("rand_augment_magnitude", rand_augment_magnitude),
            ("load_size", load_size),
            ("seed", seed),
        )
        if value is not None
    }
    if not is_training:
        allowed: set[str] = set()
    elif load_size is not None and task == MAE:
        allowed = {"load_size"}  # crop scale and flip then belong to DeviceRandomResizedCrop
    else:
        allowed = {*_TRAIN_OPTIONS[task], "seed"}
    refused = [name for name in given if name not in allowed]
    if refused:
        mode = "training" if is_training else "evaluation"
        raise ValueError(f"the {task} {mode} transform takes no {', '.join(refused)}")
    if not is_training:
        return (
            SegmentationTransform(_resize_whole(image_size))
            if task == SEGMENTATION
            else _resize_centre_crop(image_size)
        )
    if load_size is not None:
        return _load_transform(load_size)
    options = {**_TRAIN_OPTIONS[task], **{k: v for k, v in given.items() if k != "seed"}}
    builders = {MAE: _mae_train, CLASSIFICATION: _classification_train, SEGMENTATION: _segmentation_train}
    transform = builders[task](image_size, **options)
    return transform if seed is None else SeededAugmentation(transform, seed=seed)


def _mae_train(image_size: int, crop_scale: Sequence[float], hflip: bool) -> v2.Compose:
    steps: list = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _fine_tuning_crop(image_size: int, crop_scale: Sequence[float]) -> v2.RandomResizedCrop:
    """The random resized crop of fine-tuning (classification and segmentation): near-square, bicubic."""
    return v2.RandomResizedCrop(
        image_size,
        scale=tuple(crop_scale),
        ratio=(0.9, 1.1),
        interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True,
    )


def _classification_train(
    image_size: int, crop_scale: Sequence[float], rotation_degrees: float, rand_augment_magnitude: int, hflip: bool
) -> v2.Compose:
    steps: list = [_fine_tuning_crop(image_size, crop_scale)]
    if rotation_degrees:
        steps.append(v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
    if rand_augment_magnitude:
        steps.append(v2.RandAugment(num_ops=2, magnitude=rand_augment_magnitude))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _segmentation_train(
    image_size: int, crop_scale: Sequence[float], rotation_degrees: float, hflip: bool
) -> SegmentationTransform:
    steps: list = [_fine_tuning_crop(image_size, crop_scale)]
    if rotation_degrees:
        fill = {tv_tensors.Mask: IGNORE_INDEX, "others": 0}
        steps.append(v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return SegmentationTransform(v2.Compose(steps))


def _resize_whole(image_size: int) -> v2.Compose:
    return v2.Compose([v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)])


class SegmentationTransform:
    """A torchvision v2 pipeline applied jointly to an image and its mask: called as ``t(image, mask)`` or
    ``t((image, mask))`` (the form ``SeededAugmentation`` passes), with a uint8 [C, H, W] image and an integer [H, W]
    mask of class indices; returns (uint8 [C, S, S], int64 [S, S]). The mask travels as ``tv_tensors.Mask``, so every
    geometric op draws once for both and resamples the mask nearest (class indices are never blended)."""

    def __init__(self, pipeline: v2.Compose) -> None:
        self.pipeline = pipeline

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.pipeline!r})"

    @property
    def transforms(self) -> list:
        return self.pipeline.transforms

    def __call__(
        self, image: torch.Tensor | tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            image, mask = image
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ in size")
        mask = mask.reshape(1, *mask.shape[-2:]).to(torch.uint8)  # class indices <= 255: resampled as bytes
        out_image, out_mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)[0].long()


def _resize_centre_crop(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            functools.partial(_centre_crop, size=image_size),
        ]
    )


def _centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    # The offset transformers' image processors use, (H - size) // 2, so the processor saved beside a model
    # (models.build_image_processor) crops where evaluation does; torchvision's CenterCrop rounds half to even.
    height, width = image.shape[-2:]
    return v2.functional.crop(image, (height - size) // 2, (width - size) // 2, size, size)


def _load_transform(load_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    resize = _resize_centre_crop(load_size)

    def load(image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] == (load_size, load_size):  # prepared shards are already at that size
            return image
        return resize(image)

    return load


class SeededAugmentation:
    """A random image transform whose draws depend only on (seed, epoch, sample key): each sample gets its own
    generator state, so a sample's crop is the same whichever DataLoader worker decodes it, with any worker count,
    and after a resume (the interrupted epoch continues with exactly the crops it would have had).

    ``epoch`` is set by the Trainer (``MedVisTrainer``) before each epoch's iterator starts; outside the Trainer it stays
    0 unless the caller sets it. It lives in shared memory, so persistent DataLoader workers see it change too. The
    global CPU generator is left as it was (``fork_rng``), so the training process's own draws (MAE masks, dropout) do
    not depend on how many samples were decoded in it."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], seed: int) -> None:
        self.transform, self.seed = transform, int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def __repr__(self) -> str:
        return f"SeededAugmentation({self.transform!r}, seed={self.seed}, epoch={self.epoch})"

    def sample_seed(self, key: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}\x00{self.epoch}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    def __call__(self, image: torch.Tensor, key: str) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.sample_seed(key))  # CPU only: CUDA generators untouched
            return self.transform(image)


def apply_image_transform(transform: Callable | None, image: torch.Tensor, key: str) -> torch.Tensor:
    """``transform(image)``, or ``transform(image, key)`` for a ``SeededAugmentation``."""
    if transform is None:
        return image
    if isinstance(transform, SeededAugmentation):
        return transform(image, key)
    return transform(image)


def to_uint8_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float [0, 1] or uint8 H x W (or H x W x C, as read_image gives colour) array to a uint8 [C, H, W] tensor."""
    tensor = torch.as_tensor(image)
    if tensor.dtype != torch.uint8:
        tensor = (tensor.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim == 3 and tensor.shape[2] in (1, 3) and tensor.shape[0] not in (1, 3):
        tensor = tensor.permute(2, 0, 1).contiguous()
    return tensor


def normalize_batch(
    pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float], num_channels: int
) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> normalised float [B, C, H, W]; float inputs are taken as already normalised."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    scale, shift = _scale_and_shift(pixel_values, mean, std, num_channels, 255.0, torch.float32)
    return torch.addcmul(shift, pixel_values, scale)  # one pass: to float, scale, shift, replicate channels


def normalize_unit_batch(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], num_channels: int
) -> torch.Tensor:
    """float [B, 1 or C, H, W] in [0, 1] -> normalised float [B, C, H, W]."""
    scale, shift = _scale_and_shift(x, mean, std, num_channels, 1.0, x.dtype)
    return torch.addcmul(shift, x, scale)


def _scale_and_shift(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], num_channels: int, divisor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (divisor * std), -mean / std) as [1, C, 1, 1] tensors on ``x``'s device; C is ``num_channels`` for a
    one-channel ``x`` (grey images feed a C-channel model), else ``x``'s own."""
    channels = max(num_channels, len(mean), len(std)) if x.shape[1] == 1 else x.shape[1]
    return _constants(tuple(map(float, mean)), tuple(map(float, std)), channels, divisor, dtype, x.device)


@functools.lru_cache(maxsize=64)
def _constants(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    channels: int,
    divisor: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: built from Python lists each batch they would be copied host-to-device every step, and on
    # CUDA such a copy (pageable memory) waits for the whole queue of the step before it -- a host sync per step.
    mean_t = torch.tensor(mean, dtype=torch.float64).expand(channels)
    std_t = torch.tensor(std, dtype=torch.float64).expand(channels)
    scale, shift = 1.0 / (divisor * std_t), -mean_t / std_t
    return tuple(t.to(dtype).view(1, channels, 1, 1).to(device) for t in (scale, shift))


# --------------------------------------------------------------------------------------------------------------------
# Augmentation on the accelerator (opt-in). The workers then only hand over fixed-size uint8 images (a memory copy for
# prepared shards) and the whole batch is cropped, flipped and resized in one grid_sample on the device.


class DeviceRandomResizedCrop:
    """``RandomResizedCrop(size, scale, ratio)`` + optional horizontal flip for a whole uint8 batch [B, C, H, W] on
    its device: per-sample boxes drawn like torchvision's (ten tries, then the centre crop), applied as one affine
    ``grid_sample`` (bicubic by default, like the CPU pipeline). Returns float [B, C, size, size] in [0, 1].

    Draws come from the device's default generator (seeded by ``set_seed``) with no host synchronisation. Antialiasing:
    a crop of an image at most ~1.25x ``size`` is never shrunk by more than that factor, where aliasing is negligible;
    larger images are first downscaled (antialiased) to ~1.14x ``size``, the shard size the recipes expect (256 for 224).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mode: str = "bicubic",
        tries: int = 10,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale needs 0 < min <= max <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio = (
            int(size),
            (float(scale[0]), float(scale[1])),
            (float(ratio[0]), float(ratio[1])),
        )
        self.hflip, self.mode, self.tries = hflip, mode, tries

    def __repr__(self) -> str:
        return f"DeviceRandomResizedCrop(size={self.size}, scale={self.scale}, hflip={self.hflip}, mode={self.mode!r})"

    def boxes(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[B, 4] crop boxes (top, left, h, w) in pixels, sampled as torchvision's RandomResizedCrop.get_params."""
        area = height * width
        t = self.tries
        target = area * torch.empty(batch, t, device=device).uniform_(*self.scale)
        log_ratio = torch.empty(batch, t, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.argmax(ok.float(), dim=1, keepdim=True)  # index of the first valid try
        any_ok = ok.any(dim=1)
        w = torch.gather(w, 1, first).squeeze(1)
        h = torch.gather(h, 1, first).squeeze(1)
        # torchvision's fallback: the largest centred crop with the ratio clamped to the range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = height, round(height * self.ratio[1])
        else:
            fw, fh = width, height
        w = torch.where(any_ok, w, torch.full_like(w, fw))
        h = torch.where(any_ok, h, torch.full_like(h, fh))
        top = torch.floor(torch.rand(batch, device=device) * (height - h + 1))
        left = torch.floor(torch.rand(batch, device=device) * (width - w + 1))
        top = torch.where(any_ok, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(any_ok, left, torch.full_like(left, (width - fw) // 2))
        return torch.stack([top, left, h, w], dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:

        if images.ndim != 4:
            raise ValueError(f"expected a batch [B, C, H, W], got shape {tuple(images.shape)}")
        x = images.float()
        if images.dtype == torch.uint8:
            x = x.div_(255.0)
        height, width = x.shape[-2:]
        if min(height, width) > 1.25 * self.size:
            factor = 1.143 * self.size / min(height, width)
            x = F.interpolate(
                x,
                size=(round(height * factor), round(width * factor)),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            height, width = x.shape[-2:]
        b = x.shape[0]
        top, left, h, w = self.boxes(b, height, width, x.device).unbind(1)
        # Output pixel centres map onto the crop box (align_corners=False keeps torchvision's pixel-centre convention).
        sx, sy = w / width, h / height
        cx = (2 * left + w) / width - 1
        cy = (2 * top + h) / height - 1
        if self.hflip:
            sx = sx * (torch.randint(0, 2, (b,), device=x.device) * 2 - 1).to(sx.dtype)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False)
        return out.clamp_(0.0, 1.0)  # bicubic overshoots, as the CPU path clamps to uint8
