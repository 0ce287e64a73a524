"""Collators: keep only model inputs, and keep pixels as uint8 until they reach the device."""

from __future__ import annotations

from typing import Any

import torch


def collate_pixels(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
