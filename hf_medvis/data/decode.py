"""Decoding of medical images (DICOM, PNG, JPEG, TIFF) into display-oriented float32 arrays in [0, 1]."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from ..core.storage import describe, read_bytes


class ImageDecodeError(ValueError):
    """An input that cannot be decoded into an image; the message names the source and the reason."""

    def __init__(self, source: Any, reason: str) -> None:
        self.source = _describe(source)
        self.reason = " ".join(reason.split())  # one line: decoder messages span several (quarantine is line-based)
        super().__init__(f"{self.source}: {reason}")


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return describe(str(source))  # never echo credentials carried in a URL


def _read_bytes(src: str | os.PathLike | bytes, storage_options: dict | None = None) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    text = os.fspath(src)
    if "://" in text and not text.startswith("file://"):
        return read_bytes(text, storage_options)
    return Path(text.removeprefix("file://")).read_bytes()


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


# Named CT windows, (center, width) in Hounsfield units (common radiology presets).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "liver": (60.0, 160.0),
}


def parse_windows(windows: Any) -> list[tuple[float, float]] | None:
    """Window names (``CT_WINDOWS``), ``(center, width)`` pairs or ``"center,width"`` strings -> pairs."""
    if windows is None:
        return None
    pairs = []
    for item in windows:
        if isinstance(item, str) and item in CT_WINDOWS:
            pairs.append(CT_WINDOWS[item])
        elif isinstance(item, str) and item.count(",") == 1:
            center, width = (float(v) for v in item.split(","))
            pairs.append((center, width))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((float(item[0]), float(item[1])))
        else:
            raise ValueError(
                f"window {item!r}: use a name ({', '.join(CT_WINDOWS)}) or 'center,width' in Hounsfield units"
            )
    if not pairs:
        raise ValueError("windows: give at least one window")
    return pairs


def read_image(
    src: str | os.PathLike | bytes,
    *,
    window: str | tuple[float, float] | None = "auto",
    frame: int | None = None,
    storage_options: dict | None = None,
    channels: int = 1,
    windows: Any = None,
) -> np.ndarray:
    """Reads one image into a float32 array in [0, 1], higher = brighter (as MONOCHROME2): [H, W] with ``channels=1``,
    [H, W, 3] with ``channels=3`` (colour kept: RGB/YBR/palette DICOM, colour PNG/JPEG/TIFF; grey images
    replicated), [H, W, len(windows)] with ``windows`` (one channel per CT window, from the Hounsfield units of a CT
    DICOM: names in ``CT_WINDOWS`` or ``(center, width)`` pairs).

    ``src`` is a local path, an fsspec URL (``az://``, ``abfs://``, ``file://``, ...; credentials from
    ``storage_options`` or the environment) or the file's bytes. The format is recognised by content, not by extension.

    DICOM: Modality LUT -> VOI (``window="auto"``: VOI LUT Sequence, else Window Center/Width; a ``(center, width)``
    tuple overrides; ``None`` scales by the stored range) -> MONOCHROME1 inverted. Colour images become luminance.
    Multi-frame DICOM needs ``frame``. 16-bit PNG/TIFF keep their full depth.

    Raises ``ImageDecodeError`` (a ``ValueError``) naming the source and the reason.
    """
    if window is not None and window != "auto" and not (isinstance(window, tuple) and len(window) == 2):
        raise ValueError(f"window must be 'auto', None or (center, width), got {window!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    pairs = parse_windows(windows)
    try:
        data = _read_bytes(src, storage_options)
    except FileNotFoundError:
        raise ImageDecodeError(src, "file not found") from None
    except (OSError, ValueError) as err:
        raise ImageDecodeError(src, f"cannot read: {type(err).__name__}") from None
    if not data:
        raise ImageDecodeError(src, "empty file (0 bytes)")
    name = "" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src).lower().split("?", 1)[0]
    colour = channels == 3 and pairs is None
    if _is_dicom(data):
        image = _decode_dicom(src, data, window=window, frame=frame, colour=colour, windows=pairs)
    elif _looks_like_raster(data) or not name.endswith((".dcm", ".dicom")):
        if pairs is not None:
            raise ImageDecodeError(src, "CT windows need a DICOM image with Hounsfield units, not a raster image")
        image = _decode_raster(src, data, colour=colour)
    else:  # a .dcm without the 128-byte preamble + "DICM" (old ACR-NEMA style files): parse it leniently
        image = _decode_dicom(src, data, window=window, frame=frame, strict=False, colour=colour, windows=pairs)
    if colour and image.ndim == 2:  # a grey image where colour was asked for: the same grey in each channel
        image = np.repeat(image[..., None], 3, axis=2)
    if not np.isfinite(image).all():  # NaN would otherwise become black pixels, silently
        raise ImageDecodeError(src, "non-finite pixel values (NaN or Inf)")
    return image


# Magic numbers of the raster formats Pillow reads for us: PNG, JPEG, TIFF (both byte orders), BMP, JPEG 2000.
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"\x00\x00\x00\x0cjP  ")


def _looks_like_raster(data: bytes) -> bool:
    return data.startswith(_RASTER_MAGIC)


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file carry a DICOM (preamble + ``DICM``) or PNG/JPEG/TIFF/BMP/JPEG 2000 signature."""
    return _is_dicom(head) or _looks_like_raster(head)


def _decode_raster(src: Any, data: bytes, colour: bool = False) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            # Camera/scanner JPEGs may store orientation in EXIF; display orientation is what we promise.
            im = ImageOps.exif_transpose(im)
            if colour and im.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1"):
                return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # RGBA, P, CMYK, YCbCr, LAB ...
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
                return np.clip(arr / scale, 0.0, 1.0)
            if im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    raise ImageDecodeError(src, f"non-finite pixel values ({bad} NaN or Inf pixels in a float image)")
                lo, hi = float(arr.min()), float(arr.max())
                return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.float32) / 255.0
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(src, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(src, f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(src, f"truncated or corrupt image: {err}") from None


_DECODER_LIBRARIES = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "PIL")
_decoding = threading.local()
_loggers_seen = [0]


def _not_while_decoding(record: logging.LogRecord) -> bool:
    return not getattr(_decoding, "depth", 0)


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """Silences the decoder libraries' logs and warnings for the decode call in this thread: pydicom logs each failed
    plugin attempt at ERROR with a traceback and each lenient fix at WARNING (and warns it again), while the
    ``ImageDecodeError`` raised here names what matters once, and the caller handles it (prepare quarantines the file
    with that reason). A filter on the libraries' loggers, attached once per new logger: no global level changes."""
    loggers = logging.Logger.manager.loggerDict
    if len(loggers) != _loggers_seen[0]:  # a plugin imported since: its logger gets the filter too
        for name, found in list(loggers.items()):
            if name.split(".")[0] in _DECODER_LIBRARIES and isinstance(found, logging.Logger):
                found.addFilter(_not_while_decoding)  # once: addFilter skips a filter already there
        _loggers_seen[0] = len(loggers)
    _decoding.depth = getattr(_decoding, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _decoding.depth -= 1


def read_dicom_header(data: bytes, src: Any = "<bytes>", strict: bool = True) -> pydicom.Dataset:
    """The DICOM dataset of ``data`` (pixels included, not decoded); ``ImageDecodeError`` when unreadable."""
    try:
        with _quiet_decoders():  # pydicom warns about every lenient fix; the error path says what matters
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ImageDecodeError(src, f"not a readable DICOM file: {type(err).__name__}") from None
    if not strict and len(ds) == 0:
        raise ImageDecodeError(src, "not an image (neither DICOM nor a known raster format)")
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID | None:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _check_decoder(src: Any, ds: pydicom.Dataset) -> None:
    """A clear error before decoding when the transfer syntax has no decoder, or needs the [dicom] extra."""
    syntax = _transfer_syntax(ds)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(
            src, f"unsupported transfer syntax {syntax.name} ({syntax}): no DICOM decoder exists"
        ) from None
    if not decoder.is_available:
        raise ImageDecodeError(
            src,
            f"compressed transfer syntax {syntax.name} ({syntax}) needs a codec that is not installed: "
            "pip install 'hf_medvis[dicom]' (pylibjpeg and its plugins)",
        )


def _decode_dicom(
    src: Any,
    data: bytes,
    *,
    window: str | tuple[float, float] | None,
    frame: int | None,
    strict: bool = True,
    colour: bool = False,
    windows: list[tuple[float, float]] | None = None,
) -> np.ndarray:
    ds = read_dicom_header(data, src, strict=strict)
    try:
        with _quiet_decoders():
            return _decode_dicom_dataset(src, ds, window=window, frame=frame, colour=colour, windows=windows)
    except ImageDecodeError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as err:
        # Malformed attributes (e.g. NumberOfFrames "1A", an inconsistent LUT descriptor).
        raise ImageDecodeError(src, f"invalid DICOM image attributes: {type(err).__name__}: {err}") from None


def _decode_dicom_dataset(
    src: Any,
    ds: pydicom.Dataset,
    *,
    window: str | tuple[float, float] | None,
    frame: int | None,
    colour: bool = False,
    windows: list[tuple[float, float]] | None = None,
) -> np.ndarray:

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(src, "DICOM has no pixel data")
    _check_decoder(src, ds)
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1 and frame is None:
        raise ImageDecodeError(src, f"multi-frame DICOM ({n_frames} frames): pass frame=")
    if frame is not None and not 0 <= frame < n_frames:
        raise ImageDecodeError(src, f"frame {frame} out of range (the file has {n_frames})")
    try:
        # Decode only the requested frame: a 1,000-frame cine loop need not be decoded whole.
        pixels = ds.pixel_array if n_frames == 1 else _frame_array(ds, frame)
    except NotImplementedError as err:
        raise ImageDecodeError(src, f"unsupported DICOM pixel data: {err}") from None
    except RuntimeError as err:
        syntax = _transfer_syntax(ds)
        raise ImageDecodeError(src, f"cannot decode {getattr(syntax, 'name', syntax)} pixel data: {err}") from None
    except (ValueError, AttributeError, EOFError, KeyError, TypeError, IndexError) as err:
        raise ImageDecodeError(src, f"truncated or corrupt DICOM pixel data: {err}") from None
    if pixels.ndim not in (2, 3) or pixels.size == 0:
        raise ImageDecodeError(src, f"unexpected DICOM pixel array shape {pixels.shape}")

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if (
        int(getattr(ds, "SamplesPerPixel", 1)) > 1
        or photometric in ("RGB", "PALETTE COLOR")
        or photometric.startswith("YBR")
    ):
        if windows is not None:
            raise ImageDecodeError(src, f"CT windows need a monochrome CT image, not {photometric}")
        rgb = _colour_to_rgb(ds, pixels, photometric)
        return rgb if colour else _luminance(rgb)

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError(
            src,
            f"non-finite pixel values after the modality LUT (RescaleSlope {ds.get('RescaleSlope', 1)!s}, "
            f"RescaleIntercept {ds.get('RescaleIntercept', 0)!s})",
        )
    if windows is not None:
        modality = str(getattr(ds, "Modality", "")).upper()
        if modality != "CT":
            raise ImageDecodeError(src, f"CT windows need a CT image in Hounsfield units (Modality is '{modality}')")
        stacked = np.stack([_linear_window(values, c, w) for c, w in windows], axis=-1)
        stacked = np.clip(stacked, 0.0, 1.0)
        return (1.0 - stacked if photometric == "MONOCHROME1" else stacked).astype(np.float32)
    if isinstance(window, tuple):
        center, width = window
        values = _linear_window(values, float(center), float(width))
    elif window == "auto" and "VOILUTSequence" in ds:
        # The LUT is indexed by modality-LUT output, which is integral for integer pixels and slopes.
        values = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True).astype(np.float64)
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


def _frame_array(ds: pydicom.Dataset, frame: int) -> np.ndarray:

    # pixel_array(index=) decodes only the requested frame.
    return pixel_array(ds, index=frame)


def _first(value: Any) -> float:
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


def _normalise_stored_range(values: np.ndarray, ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    bits = int(getattr(ds, "BitsStored", pixels.dtype.itemsize * 8))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    stored_lo, stored_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    lo, hi = sorted((stored_lo * slope + intercept, stored_hi * slope + intercept))
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _colour_to_rgb(ds: pydicom.Dataset, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        depth = 65535.0 if rgb.dtype.itemsize > 1 else 255.0
    else:
        rgb = pixels  # pydicom >= 3 already converts YBR pixel data to RGB in pixel_array
        depth = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
    return np.clip(rgb.astype(np.float32) / depth, 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    luminance = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(luminance, 0.0, 1.0).astype(np.float32)
