"""Collators: keep only model inputs, and keep pixels as uint8 until they reach the device."""

from __future__ import annotations

from typing import Any

import torch


def collate_pixels(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


def collate_classification(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """uint8 pixels (normalised on the device) and labels: float multi-hot or long class indices."""
    labels = [example["labels"] for example in examples]
    dtype = torch.float32 if isinstance(labels[0], (list, tuple)) else torch.long
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor(labels, dtype=dtype),
    }
