"""read_image on the phantoms and on the real DICOM files pydicom ships, plus bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from hf_medvis.data import ImageDecodeError, read_image

warnings.filterwarnings("ignore", module="pydicom")
HAS_PYLIBJPEG = all(__import__("importlib").util.find_spec(m) for m in ("pylibjpeg", "libjpeg", "openjpeg"))
needs_codec = pytest.mark.skipif(not HAS_PYLIBJPEG, reason="needs the [dicom] extra (pylibjpeg)")


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_phantom_dicom_matches_png_both_photometrics(phantom_dir):
    seen = set()
    for dcm in sorted((phantom_dir / "dicom").glob("*.dcm"))[:6]:
        png = phantom_dir / "images" / f"{dcm.stem}.png"
        seen.add(pydicom.dcmread(dcm, stop_before_pixels=True).PhotometricInterpretation)
        a, b = read_image(dcm), read_image(png)
        assert a.dtype == np.float32 and a.shape == b.shape
        assert np.abs(a - b).max() <= 2.5 / 255  # window + MONOCHROME1 inversion land on the display image
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_real_mr_all_uncompressed_and_rle_syntaxes_agree():
    ref = read_image(get_testdata_file("MR_small.dcm"))
    assert ref.shape == (64, 64) and 0.0 <= ref.min() < ref.max() <= 1.0
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"):
        np.testing.assert_allclose(read_image(get_testdata_file(name)), ref, atol=1e-6, err_msg=name)


@needs_codec
def test_real_mr_lossless_jpeg_syntaxes_agree():
    ref = read_image(get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_allclose(read_image(get_testdata_file(name)), ref, atol=1e-6, err_msg=name)


def test_window_center_width_matches_dicom_formula_and_override():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)
    narrow = read_image(path, window=(c, w / 4))
    assert (narrow == 0).sum() > (read_image(path) == 0).sum()  # an explicit narrower window clips more


def test_window_none_scales_signed_ct_by_stored_range():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 16
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    values = ds.pixel_array.astype(np.float64) * slope + intercept
    lo, hi = -(2**15) * slope + intercept, (2**15 - 1) * slope + intercept
    np.testing.assert_allclose(read_image(path, window=None), (values - lo) / (hi - lo), atol=1e-6)


def test_monochrome1_is_inverted_on_a_real_file():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mono2 = read_image(dicom_bytes(ds))
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(read_image(dicom_bytes(ds)), 1.0 - mono2, atol=1e-6)


def test_voi_lut_sequence_is_preferred_over_window():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    first, n = int(ds.pixel_array.min()), int(ds.pixel_array.max() - ds.pixel_array.min() + 1)
    item = pydicom.Dataset()
    item.LUTDescriptor = [n, first, 16]
    item.LUTData = np.array([int(65535 * (1 - i / (n - 1))) for i in range(n)], "<u2").tobytes()  # inverting
    ds.VOILUTSequence = pydicom.Sequence([item])
    out = read_image(dicom_bytes(ds))
    expected = 1 - (ds.pixel_array.astype(np.float64) - first) / (n - 1)
    np.testing.assert_allclose(out, expected, atol=2e-5)


def _luminance(rgb: np.ndarray, depth: float) -> np.ndarray:
    rgb = rgb.astype(np.float64) / depth
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def test_rgb_ybr_and_palette_become_luminance():
    rle = read_image(get_testdata_file("SC_rgb_rle.dcm"))
    np.testing.assert_allclose(
        rle, _luminance(pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array, 255), atol=1e-5
    )
    ybr = read_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.shape == rle.shape and np.abs(ybr - rle).mean() < 0.02  # same picture, YBR 4:2:2 converted to RGB
    np.testing.assert_allclose(read_image(get_testdata_file("SC_rgb_rle_16bit.dcm")), rle, atol=0.01)
    from pydicom.pixels import apply_color_lut

    pal = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    out = read_image(get_testdata_file("examples_palette.dcm"))
    rgb = apply_color_lut(pal.pixel_array, pal)
    np.testing.assert_allclose(out, _luminance(rgb, 65535 if rgb.dtype.itemsize > 1 else 255), atol=1e-5)


@needs_codec
def test_compressed_jpeg_and_jpeg2000_decode():
    rle = read_image(get_testdata_file("SC_rgb_rle.dcm"))
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"):
        assert np.abs(read_image(get_testdata_file(name)) - rle).mean() < 0.02, name
    j2k = read_image(get_testdata_file("693_J2KI.dcm"))
    assert j2k.shape == (512, 512) and j2k.std() > 0.05


def test_multiframe_needs_frame():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    with pytest.raises(ImageDecodeError, match="multi-frame.*frame="):
        read_image(path)
    first, second = read_image(path, frame=0), read_image(path, frame=1)
    assert first.shape == (100, 100) and not np.allclose(first, second)
    with pytest.raises(ImageDecodeError, match="out of range"):
        read_image(path, frame=2)


def test_codec_absent_names_the_extra():
    # A fresh interpreter in which the codec packages cannot be imported, as on a base install (Pillow alone
    # decodes baseline JPEG, so the probe is JPEG-LS, which needs pylibjpeg-libjpeg).
    code = (
        "import sys\n"
        "for m in ('pylibjpeg','libjpeg','openjpeg','rle','gdcm','jpeg_ls','pyjpegls'): sys.modules[m] = None\n"
        "from pydicom.data import get_testdata_file\n"
        "from hf_medvis.data import read_image, ImageDecodeError\n"
        "try:\n"
        "    read_image(get_testdata_file('MR_small_jpeg_ls_lossless.dcm'))\n"
        "except ImageDecodeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert (
        "MR_small_jpeg_ls_lossless.dcm" in out.stdout and "hf_medvis[dicom]" in out.stdout and "JPEG-LS" in out.stdout
    )


def test_unsupported_syntax_is_a_clear_error():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists in pydicom
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    data = dicom_bytes(ds)
    with pytest.raises(ImageDecodeError, match="unsupported transfer syntax MPEG2"):
        read_image(data)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_keeps_full_depth_and_rgb_png_is_luminance(tmp_path):
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13 + 1).astype(np.uint16)
    (tmp_path / "deep.png").write_bytes(_png(values))
    out = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(np.round(out.astype(np.float64) * 65535).astype(np.uint16), values)
    assert len(np.unique(out)) > 256
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    (tmp_path / "rgb.png").write_bytes(_png(rgb))
    assert abs(float(read_image(tmp_path / "rgb.png").mean()) - 0.587 * 200 / 255) < 0.01


def test_sources_bytes_and_fsspec_urls(tmp_path):
    data = _png(np.full((4, 5), 255, np.uint8))
    (tmp_path / "a.png").write_bytes(data)
    assert read_image(data).shape == (4, 5)
    assert read_image(f"file://{tmp_path}/a.png").max() == 1.0
    import fsspec

    with fsspec.open("memory://x/b.png", "wb") as f:
        f.write(data)
    assert read_image("memory://x/b.png").shape == (4, 5)


# pydicom warns (UserWarning) about the invalid values these files hold on purpose, before we raise our error.
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_bad_inputs_raise_with_the_path(tmp_path):
    good = _png((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    cases = {
        "empty.png": (b"", "empty"),
        "truncated.png": (good[: len(good) // 2], "truncated or corrupt"),
        "notes.png": (b"hello, not an image\n" * 10, "not an image"),
        "notes.dcm": (b"hello, not an image\n" * 10, "not"),
        "nopixels.dcm": (Path(get_testdata_file("rtplan.dcm")).read_bytes(), "no pixel data"),
        "truncated.dcm": (Path(get_testdata_file("MR_truncated.dcm")).read_bytes(), "truncated or corrupt"),
        "bad_vr.dcm": (Path(get_testdata_file("badVR.dcm")).read_bytes(), "invalid DICOM"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageDecodeError, match=reason) as info:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ImageDecodeError, match="not found"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "really_png.dcm").write_bytes(good)  # wrong extension: content decides
    (tmp_path / "really_png.jpg").write_bytes(good)
    np.testing.assert_array_equal(read_image(tmp_path / "really_png.dcm"), read_image(tmp_path / "really_png.jpg"))


def test_sources_are_described_without_credentials():
    from hf_medvis.core.storage import describe

    assert describe("az://container/x.png?sv=2024&sig=SECRET") == "az://container/x.png"
    assert (
        describe("abfs://user:SECRET@account.dfs.core.windows.net/c/x.dcm")
        == "abfs://account.dfs.core.windows.net/c/x.dcm"
    )
    assert "SECRET" not in str(ImageDecodeError("https://a:SECRET@host/x.png?sig=SECRET", "empty file"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")  # the planted NaN RescaleSlope
def test_non_finite_pixels_are_an_error_not_black_pixels():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[2, 3] = np.inf
    tiff = io.BytesIO()
    Image.fromarray(values, mode="F").save(tiff, format="TIFF")
    with pytest.raises(ImageDecodeError, match="non-finite pixel values"):
        read_image(tiff.getvalue())
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = "NaN"
    dicom = io.BytesIO()
    ds.save_as(dicom)
    with pytest.raises(ImageDecodeError, match="non-finite pixel values after the modality LUT .RescaleSlope NaN"):
        read_image(dicom.getvalue())
