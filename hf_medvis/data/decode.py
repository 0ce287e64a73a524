"""Decoding of medical images (DICOM, PNG, JPEG, TIFF) into display-oriented float32 arrays in [0, 1]."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np


class ImageDecodeError(ValueError):
    """An input that cannot be decoded into an image; the message names the source and the reason."""

    def __init__(self, source: Any, reason: str):
        self.source = _describe(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    # Never echo credentials carried in a URL's query (SAS tokens).
    return text.split("?", 1)[0]


def _read_bytes(src: str | os.PathLike | bytes) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    text = os.fspath(src)
    if "://" in text:
        import fsspec

        with fsspec.open(text, "rb") as f:
            return f.read()
    return Path(text).read_bytes()


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(
    src: str | os.PathLike | bytes,
    *,
    window: str | tuple[float, float] | None = "auto",
    frame: int | None = None,
) -> np.ndarray:
    """Reads one image into a 2-D float32 array in [0, 1], higher = brighter (as MONOCHROME2).

    DICOM: Modality LUT -> VOI (``window="auto"``: VOI LUT Sequence, else Window Center/Width; a ``(center, width)``
    tuple overrides; ``None`` scales by the stored range) -> MONOCHROME1 inverted. Colour images become luminance.
    """
    try:
        data = _read_bytes(src)
    except FileNotFoundError:
        raise ImageDecodeError(src, "file not found") from None
    except OSError as err:
        raise ImageDecodeError(src, f"cannot read: {err}") from None
    if not data:
        raise ImageDecodeError(src, "empty file")
    name = "" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src).lower()
    if _is_dicom(data) or name.endswith((".dcm", ".dicom")):
        return _decode_dicom(src, data, window=window, frame=frame)
    return _decode_raster(src, data)


def _decode_raster(src: Any, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
                return np.clip(arr / scale, 0.0, 1.0)
            if im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ImageDecodeError(src, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(src, f"truncated or corrupt image: {err}") from None


def _decode_dicom(src: Any, data: bytes, *, window, frame: int | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError) as err:
        raise ImageDecodeError(src, f"not a readable DICOM file: {err}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(src, "DICOM has no pixel data")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise ImageDecodeError(src, f"multi-frame DICOM ({n_frames} frames): pass frame=")
    if frame is not None and not 0 <= frame < n_frames:
        raise ImageDecodeError(src, f"frame {frame} out of range (the file has {n_frames})")
    try:
        pixels = ds.pixel_array if n_frames == 1 else ds.pixel_array[frame]
    except (NotImplementedError, RuntimeError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageDecodeError(
            src, f"unsupported or undecodable transfer syntax {name}: install hf_medvis[dicom] ({err})"
        ) from None
    except (ValueError, AttributeError, EOFError) as err:
        raise ImageDecodeError(src, f"truncated or corrupt DICOM pixel data: {err}") from None

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1 or photometric in ("RGB", "PALETTE COLOR") or photometric.startswith("YBR"):
        return _colour_to_luminance(ds, pixels, photometric)

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if isinstance(window, tuple):
        center, width = window
        values = _linear_window(values, float(center), float(width))
    elif window == "auto" and "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        values = values / float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif window == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR")).upper()
        values = _linear_window(values, center, width, exact=function == "LINEAR_EXACT", sigmoid=function == "SIGMOID")
    else:
        values = _normalise_stored_range(values, ds, pixels)
    values = np.clip(values, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    return values.astype(np.float32)


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued: the first pair is the default view."""
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and len(value) > 0 else float(value)
    except TypeError:
        return float(value)


def _linear_window(
    values: np.ndarray, center: float, width: float, exact: bool = False, sigmoid: bool = False
) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing into [0, 1]."""
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if exact:
        return ((values - center) / max(width, 1e-6) + 0.5).clip(0.0, 1.0)
    if width < 1:
        raise ValueError("window width must be >= 1")
    return ((values - (center - 0.5)) / max(width - 1, 1e-6) + 0.5).clip(0.0, 1.0)


def _normalise_stored_range(values: np.ndarray, ds, pixels: np.ndarray) -> np.ndarray:
    bits = int(getattr(ds, "BitsStored", pixels.dtype.itemsize * 8))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    stored_lo, stored_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    lo, hi = sorted((stored_lo * slope + intercept, stored_hi * slope + intercept))
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _colour_to_luminance(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        depth = 65535.0 if rgb.dtype.itemsize > 1 else 255.0
    else:
        rgb = pixels  # pydicom >= 3 already converts YBR pixel data to RGB in pixel_array
        depth = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
    rgb = rgb.astype(np.float32) / depth
    luminance = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(luminance, 0.0, 1.0).astype(np.float32)
