"""Inference with a fine-tuned segmentation model on image files (DICOM, PNG, JPEG; local or fsspec URLs): each image
read as training read it, resized whole to the model's size, normalised; the logits upsampled bilinearly to the image's
own size and the argmax taken (what transformers' ``pipeline("image-segmentation")`` does with the saved processor).
``write_mask_outputs`` writes ``hf-medvis predict``'s files for one image."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from ..core.storage import write_bytes_atomic
from ..core.tasks import SEGMENTATION
from ..data.decode import read_image
from ..data.transforms import create_transform, normalize_batch, to_uint8_tensor
from ..models.segmentation import load_segmenter
from .segmentation_metrics import mask_counts, segmentation_metrics_with_ci

# Overlay colours of the classes 1, 2, ... (RGB; the background is left as it is), then repeated.
_PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)],
    dtype=np.float32,
)
OVERLAY_ALPHA = 0.4


class SegmentationPredictor:
    """A saved segmentation model plus the preprocessing of evaluation: read_image -> the whole image resized to the
    model's size (bicubic) -> normalised with the processor's mean/std."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None) -> None:
        self.model = load_segmenter(model_dir).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_size = int(processor.size["height"])
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        config = self.model.config
        self.class_names: tuple[str, ...] = tuple(config.id2label[i] for i in range(config.num_labels))
        # the image half of evaluation's joint (image, mask) transform
        self.resize = create_transform(SEGMENTATION, False, image_size=self.image_size).pipeline
        image_input = getattr(config, "hf_medvis_input", None) or {}
        self.read_options = {
            "channels": int(image_input.get("channels", 1)),
            "windows": image_input.get("windows") or None,
        }

    def read(self, source: str, storage_options: dict | None = None) -> torch.Tensor:
        """The uint8 [C, H, W] image at its own size, as training read it."""
        image = read_image(source, storage_options=storage_options, **self.read_options)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        return to_uint8_tensor(image)

    @torch.no_grad()
    def predict_masks(
        self, sources: Sequence[str], batch_size: int = 16, storage_options: dict | None = None
    ) -> list[np.ndarray]:
        """One uint8 [H, W] mask of class indices per image, at the image's own size."""
        masks: list[np.ndarray] = []
        for start in range(0, len(sources), batch_size):
            images = [self.read(src, storage_options) for src in sources[start : start + batch_size]]
            masks += self.masks_of_images(images)
        return masks

    @torch.no_grad()
    def masks_of_images(self, images: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """``predict_masks`` of images already read (``read``: uint8 [C, H, W] at their own sizes), one batch."""
        masks: list[np.ndarray] = []
        if images:
            batch = torch.stack([self.resize(image) for image in images]).to(self.device)
            pixels = normalize_batch(batch, self.mean, self.std, self.model.config.num_channels)
            logits = self.model(pixel_values=pixels).logits.float()
            for image, image_logits in zip(images, logits, strict=True):
                upsampled = torch.nn.functional.interpolate(
                    image_logits[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False
                )
                masks.append(upsampled[0].argmax(dim=0).to(torch.uint8).cpu().numpy())
        return masks


def evaluate_masks(
    predictor: SegmentationPredictor,
    sources: Sequence[str],
    true_masks: Sequence[np.ndarray],
    groups: Sequence[Any],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """``hf-medvis evaluate`` of a segmentation model: each image's predicted mask against its true mask (uint8
    [H, W] class indices at the image's own size, 255 not scored), per-class and macro Dice and IoU with
    patient-bootstrap CIs (``groups``: a patient id per image)."""
    predicted = predictor.predict_masks(sources, batch_size, storage_options)
    for source, mask, truth in zip(sources, predicted, true_masks, strict=True):
        if mask.shape != np.asarray(truth).shape:
            raise ValueError(f"the mask of {source} is {np.asarray(truth).shape}, the image {mask.shape}")
    counts = mask_counts(predicted, true_masks, len(predictor.class_names))
    return segmentation_metrics_with_ci(counts, groups, predictor.class_names, n_resamples=n_resamples, seed=seed)


def read_masked_images(
    data: str,
    class_names: Sequence[str],
    *,
    masks_dir: str | None = None,
    masks_rle: str | None = None,
    mask_labels: str | None = None,
    labels_file: str | None = None,
    labels_format: Any = None,
    storage_options: dict | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> tuple[list[str], list[np.ndarray], list[str]]:
    """The images of ``data`` with their true masks (``masks_dir`` or ``masks_rle``, read as the segmentation recipe
    reads them; classes named as there, and required to be the model's ``class_names``) and patient groups (salted
    hashes from ``labels_file``; without one, each image is its own patient). An image without a mask goes to
    ``skipped`` with the reason; a mask of the wrong size or with another class is a one-line error."""
    from ..data.folder import build_folder_records, only_listed_images
    from ..data.masks import MaskError, MaskSource, attach_masks, map_masks, read_rle_table, resolve_mask_labels
    from ..data.privacy import source_root

    skipped = [] if skipped is None else skipped
    rle = read_rle_table(masks_rle, storage_options) if masks_rle else None
    classes = resolve_mask_labels(mask_labels, masks_dir, rle is not None, storage_options)
    if tuple(classes) != tuple(class_names):
        raise MaskError(
            f"the masks' classes ({', '.join(classes)}) are not the model's ({', '.join(class_names)}), index by index"
        )
    records = build_folder_records(data, labels_file, storage_options, labels_format, skipped)
    if labels_file is not None:  # e.g. test.csv of `hf-medvis split`: only the images it lists
        records = only_listed_images(records)
    masks = MaskSource(classes, masks_dir, masks_rle, rle, storage_options)
    records = attach_masks(records, source_root(data), masks, skipped)
    return list(records["path"]), map_masks(records, masks, lambda mask: mask), list(records["group"])


def class_pixel_counts(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Pixels of each class in ``mask`` (every class named, 0 where absent)."""
    counts = np.bincount(np.asarray(mask, dtype=np.int64).ravel(), minlength=len(class_names))
    return {name: int(counts[index]) for index, name in enumerate(class_names)}


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3]: ``image`` (uint8 [H, W] or [H, W, C]) with each foreground class of ``mask`` tinted in
    its palette colour."""
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = rgb[..., 0]
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = rgb[..., :3]
    mask = np.asarray(mask)
    foreground = mask > 0
    colours = _PALETTE[(mask.astype(np.int64) - 1) % len(_PALETTE)]
    rgb[foreground] = (1 - OVERLAY_ALPHA) * rgb[foreground] + OVERLAY_ALPHA * colours[foreground]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask_outputs(
    source: str,
    mask: np.ndarray,
    out_dir: str | os.PathLike,
    class_names: Sequence[str],
    image: np.ndarray | torch.Tensor | None = None,
    stem: str | None = None,
) -> dict[str, Any]:
    """Writes ``<stem>_mask.png`` (uint8 class indices, the input's size) and ``<stem>_overlay.png`` (the image with
    the classes tinted) into ``out_dir``, each atomically; returns ``hf-medvis predict``'s JSON line for the image:
    the input (``file``, as the classifiers' lines name it), the two files, and the pixels of each class. ``image``: the uint8 image as read ([C, H, W] tensor or
    [H, W(, C)] array); default: ``source`` read again. ``stem``: the files' name stem (default: the source's)."""
    if image is None:
        image = to_uint8_tensor(read_image(source))
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} of {source} differ in size")
    stem = stem or Path(str(source).rstrip("/")).stem  # predict passes output_stems' (unique, file-name safe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    write_bytes_atomic(str(mask_path), _png_bytes(mask))
    write_bytes_atomic(str(overlay_path), _png_bytes(overlay(image, mask)))
    return {
        "file": str(source),
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "pixels": class_pixel_counts(mask, class_names),
    }
