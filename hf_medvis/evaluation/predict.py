"""Inference with a fine-tuned classifier on image files (DICOM, PNG, JPEG; local or fsspec URLs), with the exact
preprocessing of training and, when config.json has them, the temperatures of ``hf-medvis evaluate --calibrate``."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoImageProcessor

from ..core.tasks import CLASSIFICATION
from ..data.decode import read_image
from ..data.labels import LabelSpec
from ..data.labels.table import strip_image_extension
from ..data.transforms import create_transform, normalize_batch, to_uint8_tensor
from ..models.transfer import load_classifier
from .calibration import scale_logits, temperatures_of
from .metrics import probabilities
from .operating_points import thresholds_of


class Predictor:
    """A saved classifier plus the exact preprocessing of training: read_image (DICOM/PNG/JPEG) -> resize + centre
    crop -> normalise with the processor's mean/std."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None) -> None:
        self.model = load_classifier(os.fspath(model_dir)).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        processor = AutoImageProcessor.from_pretrained(model_dir)
        # build_image_processor's crop size; folders saved before it have a ViTImageProcessor's square size
        self.image_size = int((getattr(processor, "crop_size", None) or processor.size)["height"])
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        config = self.model.config
        self.spec = LabelSpec(tuple(config.id2label[i] for i in range(config.num_labels)), config.problem_type)
        self.transform = create_transform(CLASSIFICATION, False, image_size=self.image_size)
        # Colour or multi-window models read new images as their training images were read (training/run.py).
        image_input = getattr(config, "hf_medvis_input", None) or {}
        self.read_options = {
            "channels": int(image_input.get("channels", 1)),
            "windows": image_input.get("windows") or None,
        }
        # Per-class thresholds saved by `hf-medvis evaluate --thresholds-from` (float32, NaN: none), or None.
        self.thresholds = thresholds_of(config, self.spec.names)
        # Per-class temperatures saved by `hf-medvis evaluate --calibrate` (float32, 1: none), or None.
        self.temperature = temperatures_of(config, self.spec.names)

    def preprocess(self, source: str, storage_options: dict | None = None) -> torch.Tensor:
        """The uint8 [C, size, size] image the model sees (before normalisation), as in training's evaluation."""
        image = read_image(source, storage_options=storage_options, **self.read_options)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        return self.transform(to_uint8_tensor(image))

    @torch.no_grad()
    def logits(self, sources: Sequence[str], batch_size: int = 32, storage_options: dict | None = None) -> np.ndarray:
        """[N, classes] float32 raw logits (before any temperature), in the order of ``config.id2label``."""
        out = []
        for start in range(0, len(sources), batch_size):
            batch = torch.stack([self.preprocess(src, storage_options) for src in sources[start : start + batch_size]])
            pixels = normalize_batch(batch.to(self.device), self.mean, self.std, self.model.config.num_channels)
            out.append(self.model(pixel_values=pixels).logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.spec.names)), dtype=np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[N, classes] probabilities of raw ``logits``: sigmoid (multi-label) or softmax of the logits divided by the
        temperatures, when the model has them."""
        return probabilities(scale_logits(logits, self.temperature), self.spec)

    def predict(self, sources: Sequence[str], batch_size: int = 32, storage_options: dict | None = None) -> np.ndarray:
        """[N, classes] probabilities (temperature-scaled when config.json has ``hf_medvis_temperature``), in the
        order of ``config.id2label``."""
        return self.probabilities(self.logits(sources, batch_size, storage_options))

    def findings(self, probs: np.ndarray) -> list[list[str]] | None:
        """Per image of ``probs`` ([N, classes], from ``predict``), the classes whose probability is >= their saved
        threshold, in the model's class order; None when the model has no thresholds."""
        if self.thresholds is None:
            return None
        called = np.asarray(probs, dtype=np.float32) >= self.thresholds  # float32, as evaluate chose and applied them
        return [[name for name, hit in zip(self.spec.names, row, strict=True) if hit] for row in called]


def output_stems(sources: Sequence[str]) -> list[str]:
    """One file-name stem per source, for the files ``hf-medvis predict`` writes (heatmaps, masks): its name without
    an image extension, ``-2``, ``-3``, ... appended to a stem an earlier source already has (same name in another
    folder; compared without case, for case-insensitive disks)."""
    names = [src.split("?", 1)[0].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for src in sources]
    return unique_names([file_part(strip_image_extension(name)) for name in names])


def file_part(name: str) -> str:
    """``name`` as a safe piece of a file name: runs of anything but letters, digits, '.', '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "image"  # no hidden files, no ".."


def unique_names(names: list[str]) -> list[str]:
    """``names`` with ``-2``, ``-3``, ... appended to a repeat (compared without case)."""
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 2
        while candidate.lower() in used:
            candidate, n = f"{name}-{n}", n + 1
        used.add(candidate.lower())
        unique.append(candidate)
    return unique
