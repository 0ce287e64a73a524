"""Data plane: decoding, phantoms, raw folders, shards and streaming. Never imports ``hf_medvis.training``."""

from .decode import ImageDecodeError, read_image
from .streaming import load_image_dataset

__all__ = ["ImageDecodeError", "load_image_dataset", "read_image"]
