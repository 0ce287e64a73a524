"""The image processor and pipeline saved beside every classifier, so that transformers alone reads a new image as
training and ``hf-medvis predict`` do: at its full bit depth (16-bit PNG/TIFF), grey or colour as the model was
trained, with the model's channel count (1 or 3), then shorter side to the input size (bicubic), centre crop,
normalise.

- ``MedVisImageProcessor``: transformers' ``BitImageProcessor`` (the resize, crop and normalisation are its own) that
  first turns each PIL image, array or tensor into the uint8 [C, H, W] image training saw. Its
  preprocessor_config.json says ``"image_processor_type": "BitImageProcessor"`` and has no ``auto_map``, so every
  reader of the folder (``AutoImageProcessor``, plain ``pipeline``, ``hf-medvis predict``) loads ``BitImageProcessor``
  without a remote-code prompt; 8-bit inputs of a 3-channel model then score as before.
- ``MedVisImageClassificationPipeline``: transformers' image-classification pipeline with this processor, whose
  files, URLs and PIL images reach it at full depth (transformers' ``load_image`` converts every input to 8-bit RGB
  first, which clips a 16-bit X-ray to white). config.json's ``custom_pipelines`` names it
  (``hf_medvis.models.build.classifier_image_processor``), so ``pipeline(model=DIR, trust_remote_code=True)`` runs it.

This file is copied into every saved folder and must stay self-contained: it imports numpy, PIL, torch and
transformers only, never hf_medvis (which a user of the saved model may not have installed). It re-states, as briefly
as it can, the raster depth rule of ``hf_medvis.data.decode._decode_raster`` and the quantisation of
``hf_medvis.data.transforms.to_uint8_tensor``; tests/test_pipeline_parity.py checks that they agree.
"""

from __future__ import annotations

import io
import os
import urllib.request
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import BitImageProcessor, ImageClassificationPipeline
from transformers.image_utils import load_image

# PIL modes read as grey whether or not colour is kept (``_decode_raster``'s list).
_GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F", "1")


def _unit_float(image: PIL.Image.Image, colour: bool) -> np.ndarray:
    """float32 [H, W] or [H, W, 3] in [0, 1]: the depth rule of ``hf_medvis.data.decode._decode_raster``."""
    image = PIL.ImageOps.exif_transpose(image)
    if colour and image.mode not in _GREY_MODES:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if arr.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        return np.clip(arr / scale, 0.0, 1.0)
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("the image has non-finite pixel values (NaN or Inf)")
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32) / 255.0


def _as_pil(image: Any) -> PIL.Image.Image:
    """An array or tensor as the PIL image its pixels make (uint16 -> I;16, other integers -> I, floats -> F)."""
    if isinstance(image, PIL.Image.Image):
        return image
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):  # channels first -> last
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return PIL.Image.fromarray(arr)
    if arr.ndim != 2:
        raise ValueError(
            f"an image array must be H x W (grey) or H x W x 3 uint8 (colour), got {arr.shape} {arr.dtype}"
        )
    if arr.dtype in (np.uint8, np.uint16):
        return PIL.Image.fromarray(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return PIL.Image.fromarray(arr.astype(np.int32))
    if np.issubdtype(arr.dtype, np.floating):
        return PIL.Image.fromarray(arr.astype(np.float32))
    raise ValueError(f"an image array of dtype {arr.dtype} is not an image")


class MedVisImageProcessor(BitImageProcessor):
    """``BitImageProcessor`` whose inputs are first read as training read them; ``hf_medvis_colour`` (saved in
    preprocessor_config.json) keeps colour for a model trained on colour images, else colour becomes luminance."""

    hf_medvis_colour = False

    def __init__(self, hf_medvis_colour: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hf_medvis_colour = bool(hf_medvis_colour)

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> Any:
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2:  # one grey image, H x W
            images = _as_pil(images)  # (transformers cannot tell a 2-D array from a batch)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(self, image: Any, device: torch.device | None = None, **kwargs: Any) -> torch.Tensor:
        """One PIL image, array or tensor -> the uint8 [C, H, W] tensor of training (C: the model's channels)."""
        pixels = torch.from_numpy(_unit_float(_as_pil(image), self.hf_medvis_colour))
        # hf_medvis.data.transforms.to_uint8_tensor: float [0, 1] -> uint8, rounded
        pixels = (pixels.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        channels = len(self.image_mean) if isinstance(self.image_mean, (list, tuple)) else 1
        if pixels.shape[0] != channels:
            if pixels.shape[0] != 1:
                raise ValueError(f"a colour image for a {channels}-channel model")
            pixels = pixels.expand(channels, -1, -1)  # a grey image feeds each channel of a 3-channel model
        pixels = pixels.contiguous()
        return pixels.to(device) if device is not None else pixels

    def to_dict(self) -> dict[str, Any]:
        # Saved as the built-in class, with no auto_map: plain transformers (and its pipeline's probe for a video
        # processor, which would prompt for remote code) reads BitImageProcessor, and the saved pipeline makes it this.
        settings = {**super().to_dict(), "image_processor_type": "BitImageProcessor"}
        settings.pop("auto_map", None)
        settings.pop("_auto_class", None)
        return settings


class MedVisImageClassificationPipeline(ImageClassificationPipeline):
    """transformers' image-classification pipeline with files, URLs and PIL images kept at their full bit depth."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.image_processor, MedVisImageProcessor):  # the saved settings, loaded as Bit's
            self.image_processor = MedVisImageProcessor.from_dict(self.image_processor.to_dict())

    def preprocess(self, image: Any, timeout: float | None = None) -> Any:
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            with urllib.request.urlopen(image, timeout=timeout) as response:
                image = PIL.Image.open(io.BytesIO(response.read()))
        elif isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
            with open(image, "rb") as file:  # in memory: no file handle left open behind the lazy PIL image
                image = PIL.Image.open(io.BytesIO(file.read()))
        elif not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            image = load_image(image, timeout=timeout)  # base64 text: transformers' reading
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)
