"""Colour and multi-window images: pydicom's own colour ultrasound and CT files, a generated RGB tile set, through
read_image, prepare, the datasets reader, the recipes and predict."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from hf_medvis.data.decode import CT_WINDOWS, ImageDecodeError, read_image
from hf_medvis.data.prepare import prepare
from hf_medvis.data.shard_format import iter_shard_rows, stored_pixels


def test_colour_dicom_keeps_rgb_and_grey_is_its_luminance():
    for name in ("examples_rgb_color.dcm", "examples_palette.dcm"):
        path = get_testdata_file(name)
        rgb = read_image(path, channels=3)
        assert rgb.shape[2] == 3 and rgb.dtype == np.float32 and rgb.min() >= 0 and rgb.max() <= 1
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0.2  # really colour, not a replicated grey
        grey = read_image(path)
        np.testing.assert_allclose(grey, rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), atol=1e-5)
    frame = read_image(get_testdata_file("examples_ybr_color.dcm"), channels=3, frame=3)  # YBR multi-frame ultrasound
    assert frame.shape == (240, 320, 3)
    # A grey image asked for in colour: the same grey in each channel.
    mr = read_image(get_testdata_file("MR_small.dcm"), channels=3)
    np.testing.assert_array_equal(mr[..., 0], mr[..., 2])


def test_ct_windows_are_hounsfield_windows_one_channel_each():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    image = read_image(path, windows=["lung", "mediastinum", "bone"])
    assert image.shape == (128, 128, 3)
    for channel, name in enumerate(("lung", "mediastinum", "bone")):
        center, width = CT_WINDOWS[name]
        expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)  # DICOM linear VOI
        np.testing.assert_allclose(image[..., channel], expected, atol=1e-6, err_msg=name)
    custom = read_image(path, windows=[(40, 400)])
    np.testing.assert_allclose(custom[..., 0], read_image(path, window=(40, 400)), atol=1e-6)
    with pytest.raises(ImageDecodeError, match="Modality is 'MR'"):
        read_image(get_testdata_file("MR_small.dcm"), windows=["lung"])
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    with pytest.raises(ImageDecodeError, match="need a DICOM image with Hounsfield units"):
        read_image(png.getvalue(), windows=["lung"])
    with pytest.raises(ValueError, match="use a name"):
        read_image(path, windows=["lungs"])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    from hf_medvis.data.phantoms_pathology import write_pathology_phantoms

    return write_pathology_phantoms(tmp_path_factory.mktemp("tiles") / "set", patients=12, image_size=48)


def test_pathology_phantoms_are_colour_with_a_learnable_finding(tiles):
    """Tumour tiles hold more purple (nuclei) than the others: the finding is there to learn, and it is in colour."""
    with open(tiles / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["Finding Labels"] for r in rows} == {"Tumor", "No Finding"}
    purple = {}
    for row in rows:
        rgb = read_image(str(tiles / "images" / row["Image Index"]), channels=3)
        purple[row["Image Index"]] = float(((rgb[..., 2] - rgb[..., 1]) > 0.2).mean())  # blue above green: nuclei
    tumour = [purple[r["Image Index"]] for r in rows if r["Finding Labels"] == "Tumor"]
    normal = [purple[r["Image Index"]] for r in rows if r["Finding Labels"] != "Tumor"]
    assert min(tumour) > max(normal)
    assert json.loads((tiles / "phantoms.json").read_text())["synthetic"] is True


def test_prepare_stores_colour_and_windows_that_datasets_reads(tiles, tmp_path):
    from hf_medvis.data.dataset_card import load_prepared_dataset

    manifest = prepare(str(tiles / "images"), str(tmp_path / "rgb"), size=32, salt="s", channels=3)
    assert manifest["preprocessing"]["channels"] == 3
    rows = [r for s in manifest["shards"] for r in iter_shard_rows((tmp_path / "rgb" / s["path"]).read_bytes())]
    pixels = np.stack([stored_pixels(r) for r in rows]).astype(np.float64) / 255
    assert pixels.shape[-1] == 3
    # The manifest's per-channel statistics are those of the stored pixels (the recipes' default normalisation).
    np.testing.assert_allclose(manifest["normalization"]["mean"], pixels.reshape(-1, 3).mean(0), atol=1e-4)
    np.testing.assert_allclose(manifest["normalization"]["std"], pixels.reshape(-1, 3).std(0), atol=1e-4)
    ds = load_prepared_dataset(str(tmp_path / "rgb"))
    by_key = {r["key"]: r for r in rows}
    for example in ds:
        assert example["image"].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(example["image"]), stored_pixels(by_key[example["key"]]))

    ct = tmp_path / "ct"
    ct.mkdir()
    for name in ("CT_small.dcm", "693_J2KI.dcm"):
        shutil.copy(get_testdata_file(name), ct / name)
    manifest = prepare(str(ct), str(tmp_path / "ct_shards"), size=32, salt="s", windows=["lung", "mediastinum", "bone"])
    assert manifest["totals"]["written"] == 2 and manifest["preprocessing"]["channels"] == 3
    manifest = json.loads((tmp_path / "ct_shards" / "manifest.json").read_text())
    assert manifest["preprocessing"]["windows"] == [list(CT_WINDOWS[n]) for n in ("lung", "mediastinum", "bone")]
    with pytest.raises(ValueError, match="8-bit"):
        prepare(str(ct), str(tmp_path / "bad"), size=32, salt="s", windows=["lung", "bone", "brain"], bits=16)


def test_recipes_train_on_colour_shards_and_predict_reads_colour(tiles, tmp_path):
    import contextlib

    from conftest import load_recipe
    from transformers import AutoImageProcessor

    from hf_medvis.evaluation import Predictor

    shards = tmp_path / "rgb"
    manifest = prepare(
        str(tiles / "images"), str(shards), size=32, salt="s", channels=3, labels=str(tiles / "labels.csv")
    )
    out = tmp_path / "vit"
    args = f"--train_data {shards} --output_dir {out} --model_preset tiny --image_size 32 --patch_size 8 --max_steps 4 "
    args += "--per_device_train_batch_size 8 --eval_steps 2 --save_steps 2 --validation_split_percentage 30 "
    args += "--ci_bootstrap_samples 20 --eval_subsample 8"
    with contextlib.redirect_stdout(io.StringIO()):
        load_recipe("finetune_vit").main(args.split())
    config = json.loads((out / "config.json").read_text())
    assert config["hf_medvis_input"] == {"channels": 3, "windows": []} and config["num_channels"] == 3
    processor = AutoImageProcessor.from_pretrained(out)
    np.testing.assert_allclose(processor.image_mean, manifest["normalization"]["mean"])  # the data's own statistics
    predictor = Predictor(out)
    image = sorted((tiles / "images").glob("*.png"))[0]
    seen = predictor.preprocess(str(image))
    assert seen.shape == (3, 32, 32) and not np.array_equal(seen[0].numpy(), seen[2].numpy())
    assert predictor.predict([str(image)]).shape == (1, 1)


def test_mae_pretrains_on_ct_window_shards(tmp_path):
    """Three CT windows are three channels: the MAE recipe pretrains on them with their statistics and records them."""
    import contextlib

    from conftest import load_recipe

    ct = tmp_path / "ct"
    ct.mkdir()
    for index, name in enumerate(("CT_small.dcm", "693_J2KI.dcm") * 4):
        shutil.copy(get_testdata_file(name), ct / f"{index}_{name}")
    shards = tmp_path / "shards"
    manifest = prepare(str(ct), str(shards), size=32, salt="s", windows=["lung", "mediastinum", "bone"])
    out = tmp_path / "mae"
    args = f"--train_data {shards} --output_dir {out} --model_preset tiny --image_size 32 --patch_size 8 --max_steps 3 "
    args += "--per_device_train_batch_size 4 --eval_strategy no --dataloader_num_workers 0"
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = load_recipe("pretrain_mae").main(args.split())
    assert np.isfinite(metrics["train_loss"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_channels"] == 3 and config["hf_medvis_input"]["windows"] == [
        list(CT_WINDOWS[n]) for n in ("lung", "mediastinum", "bone")
    ]
    processor = json.loads((out / "preprocessor_config.json").read_text())
    np.testing.assert_allclose(processor["image_mean"], manifest["normalization"]["mean"])
