"""Reference data kept as files in the package (``hf_medvis/infra/data/*.yaml``): Azure GPU SKUs, GPU peaks and the
compatibility matrix. Code reads them here so the figures are edited in one place."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml


@functools.cache
def load_data(name: str) -> dict[str, Any]:
    """Parsed ``data/<name>.yaml`` (cached; treat as read-only)."""
    text = resources.files("hf_medvis.infra").joinpath("data", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def azure_skus() -> list[dict[str, Any]]:
    return load_data("azure_skus")["skus"]


def find_sku(name: str) -> dict[str, Any]:
    """A SKU by name, case-insensitive, with or without the ``Standard_`` prefix."""
    wanted = name.lower().removeprefix("standard_")
    for sku in azure_skus():
        if sku["name"].lower().removeprefix("standard_") == wanted:
            return sku
    known = ", ".join(s["name"] for s in azure_skus())
    raise ValueError(f"unknown Azure SKU '{name}' (known: {known})")


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Vendor dense peak for a GPU name as torch reports it, or None when the GPU is not in the table."""
    key = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}.get(precision)
    if key is None:
        raise ValueError(f"unknown precision '{precision}' (bf16, fp16 or fp32)")
    for entry in load_data("gpu_peaks")["gpus"]:
        if entry["match"].lower() in device_name.lower():
            return float(entry[key])
    return None
