"""Segmentation masks in prepared shards (``hf-medvis prepare --masks_dir / --masks_rle``): each mask is stored beside
its pixels, resized as they are (nearest-neighbour), reads back equal to the mask folder through the same eval
transform, an image whose mask is missing or does not fit is quarantined without its file name, and the recipe trains
on the shards."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import load_recipe, run_recipe
from PIL import Image
from test_masks import encode_rle
from test_segmentation import RECIPE_ARGS

from hf_medvis.cli import main as cli_main
from hf_medvis.core.tasks import SEGMENTATION
from hf_medvis.data import SegmentationDataArguments, build_datasets
from hf_medvis.data.decode import read_image
from hf_medvis.data.masks import decode_rle, read_mask_png
from hf_medvis.data.phantoms import MASK_CLASSES
from hf_medvis.data.prepare import prepare
from hf_medvis.data.shard_dataset import load_shard_table
from hf_medvis.data.shard_format import stored_mask
from hf_medvis.data.transforms import create_transform, to_uint8_tensor

SIZE = 32  # shards at half the phantoms' 64 px: the masks are really resized


@pytest.fixture(scope="module")
def masked_shards(masked_phantom_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("masked_shards") / "shards"
    root = masked_phantom_dir
    labels = str(root / "labels.csv")
    prepare(
        str(root / "images"), str(dst), size=SIZE, shard_size=16, salt="x", labels=labels, masks_dir=str(root / "masks")
    )
    return dst


def folder_example(root: Path, key: str, masks: Path | None = None, mask: np.ndarray | None = None):
    """The image and mask of ``key`` read from the folders (``read_image`` + the mask PNG), through the eval transform."""
    image = to_uint8_tensor(read_image(str(root / "images" / f"{key}.png")))
    mask = read_mask_png(str(masks / f"{key}.png")) if mask is None else mask
    return create_transform(SEGMENTATION, False, image_size=SIZE)(image, torch.from_numpy(mask.astype(np.uint8)))


def test_masks_in_shards_read_back_equal_to_the_mask_folder(masked_shards, masked_phantom_dir, tmp_path):
    manifest = json.loads((masked_shards / "manifest.json").read_text())
    classes = json.loads((masked_phantom_dir / "masks" / "classes.json").read_text())
    assert manifest["preprocessing"]["mask_labels"] == classes == list(MASK_CLASSES)
    args = SegmentationDataArguments(train_data=str(masked_shards), validation_split_percentage=25)
    data = build_datasets(args, SEGMENTATION, image_size=SIZE, seed=0)
    assert data.mask_labels == tuple(classes)
    assert data.info["train_images"] + data.info["eval_images"] == manifest["totals"]["written"]
    rows = data.eval.with_format(None)
    assert not set(rows["group"]) & set(data.train.with_format(None)["group"])  # split by patient
    for i, key in enumerate(rows["key"]):
        example = data.eval[i]
        pixels, labels = folder_example(masked_phantom_dir, key, masked_phantom_dir / "masks")
        assert torch.equal(example["labels"], labels.long()), key
        # Pixels: prepare resizes bilinearly, the eval transform with its own interpolation: the same image, not the
        # same bytes (the phantoms' noise differs most).
        assert np.corrcoef(example["pixel_values"].ravel(), pixels.ravel())[0, 1] > 0.95, key
    # datasets reads the shards as a dataset (the card's features): the mask column decodes (PIL) to the same classes.
    loaded = datasets.load_dataset(str(masked_shards), split="train")
    by_key = {row["key"]: np.asarray(row["mask"]) for row in loaded}
    assert len(by_key) == manifest["totals"]["written"]
    for key, mask in by_key.items():
        _, labels = folder_example(masked_phantom_dir, key, masked_phantom_dir / "masks")
        assert np.array_equal(mask, labels.numpy()), key
    # An explicit labels file (a split of `hf-medvis split`) selects the samples it lists, as for a mask folder.
    with open(masked_phantom_dir / "labels.csv", newline="") as f:
        reader = csv.reader(f)
        header, listed = next(reader), [row for row, _ in zip(reader, range(5), strict=False)]
    with open(tmp_path / "five.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *listed])
    five = SegmentationDataArguments(
        train_data=str(masked_shards), labels_file=str(tmp_path / "five.csv"), validation_split_percentage=0
    )
    keys = build_datasets(five, SEGMENTATION, image_size=SIZE, seed=0).train.with_format(None)["key"]
    assert sorted(keys) == sorted(row[header.index("Image Index")][:-4] for row in listed)
    nodules = sum(int((data.eval[i]["labels"] == MASK_CLASSES.index("nodule")).any()) for i in range(len(rows)))
    assert nodules == data.split_report["splits"]["val"]["images_with_class"]["nodule"]


def test_a_missing_or_bad_mask_is_quarantined_and_rle_masks_are_stored(masked_phantom_dir, tmp_path):
    src = tmp_path / "set"
    keys = sorted(p.stem for p in (masked_phantom_dir / "images").glob("*.png"))[:5]
    for folder in ("images", "masks"):
        (src / folder).mkdir(parents=True)
        for key in keys:
            shutil.copy(masked_phantom_dir / folder / f"{key}.png", src / folder / f"{key}.png")
    shutil.copy(masked_phantom_dir / "masks" / "classes.json", src / "masks")
    (src / "masks" / f"{keys[0]}.png").unlink()
    Image.fromarray(np.zeros((64, 60), dtype=np.uint8)).save(src / "masks" / f"{keys[1]}.png")
    argv = ["prepare", str(src / "images"), str(tmp_path / "shards"), "--size", str(SIZE), "--salt", "x"]
    assert cli_main([*argv, "--masks", str(src / "masks")]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 3 and manifest["totals"]["quarantined"] == 2
    report = (tmp_path / "shards" / "quarantine.jsonl").read_text()
    reasons = sorted(json.loads(line)["reason"] for line in report.splitlines())
    assert reasons[0] == "mask is 60x64 but its image is 64x64 (width x height): a mask has its image's size"
    assert reasons[1].startswith("no mask")
    assert not any(key in report for key in keys) and str(tmp_path) not in report  # salted hashes only

    # RLE (one foreground class): the lung of each image, as SIIM lists it; the stored mask is the decoded one resized.
    lung = {key: read_mask_png(str(src / "masks" / f"{key}.png")) == 1 for key in keys[2:]}
    with open(tmp_path / "rle.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", " EncodedPixels"])
        writer.writerows([key, run] for key, mask in lung.items() for run in encode_rle(mask))
    labels = str(masked_phantom_dir / "labels.csv")  # sample keys = the labels file's image names
    prepare(str(src / "images"), str(tmp_path / "rle_shards"), size=SIZE, salt="x", labels=labels,
            masks_rle=str(tmp_path / "rle.csv"))  # fmt: skip
    args = SegmentationDataArguments(train_data=str(tmp_path / "rle_shards"), validation_split_percentage=0)
    data = build_datasets(args, SEGMENTATION, image_size=SIZE)
    assert data.mask_labels == ("background", "foreground") and len(data.train) == 3
    rows = load_shard_table(str(tmp_path / "rle_shards"))  # the stored masks, before any augmentation
    stored = {row["key"]: torch.from_numpy(stored_mask(row).astype(np.int64)) for row in rows}
    rle_rows = {}
    with open(tmp_path / "rle.csv", newline="") as f:
        for row in csv.DictReader(f):
            rle_rows.setdefault(row["ImageId"], []).append(row[" EncodedPixels"])
    for key, runs in rle_rows.items():
        decoded = np.zeros((64, 64), dtype=np.uint8)
        for encoded in runs:
            decoded |= decode_rle(encoded, 64, 64)
        _, expected = folder_example(src, key, mask=decoded)
        assert torch.equal(stored[key], expected.long()) and stored[key].any(), key


@pytest.mark.slow
def test_the_recipe_trains_on_shards_with_masks(masked_shards, tmp_path):
    out = tmp_path / "run"
    argv = ["--train_data", str(masked_shards), *RECIPE_ARGS, "--max_steps", "2", "--output_dir", str(out)]
    log = run_recipe(load_recipe("finetune_segmentation"), argv)
    assert "mask classes: 0 background, 1 lung, 2 heart, 3 nodule" in log
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 2 and 0 <= results["eval_dice_macro"] <= 1


def test_mask_flags_are_checked_before_any_work(tmp_path, capsys):
    argv = ["prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--salt", "x"]
    assert cli_main([*argv, "--mask_labels", "background,lung"]) == 2
    assert cli_main([*argv, "--masks", "m", "--masks_rle", "r.csv"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--masks_dir DIR or --masks_rle FILE" in errors[0] and "not both" in errors[1]
    assert not (tmp_path / "dst").exists()
