"""Data plane: decoding, phantoms, raw folders, shards and streaming. Never imports ``hf_medvis.training``."""

from .decode import ImageDecodeError, read_image

__all__ = ["ImageDecodeError", "read_image"]
