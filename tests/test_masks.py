"""Segmentation masks in the data plane: phantom masks agree with the rendered phantoms, ``demo-data --masks`` writes
them, the joint image+mask transform keeps a mask drawn from the image aligned with it, SIIM RLE decodes as a direct
decode does, bad masks fail with one line naming the file, and ``build_datasets("segmentation")`` pairs each image
with its own mask and splits by patient."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MASKED_PATIENTS, MASKED_SEED, MASKED_SIZE
from PIL import Image

from hf_medvis.cli import main as cli_main
from hf_medvis.core.tasks import SEGMENTATION
from hf_medvis.data import SegmentationDataArguments, build_datasets
from hf_medvis.data.masks import MaskError, decode_rle
from hf_medvis.data.phantoms import (
    MASK_CLASSES,
    ensure_phantom_dataset,
    phantom_mask,
    plan_phantoms,
    render_phantom,
)
from hf_medvis.data.transforms import IGNORE_INDEX, create_transform

NODULE = MASK_CLASSES.index("nodule")
SET_PATIENTS, SET_SEED, SET_SIZE = MASKED_PATIENTS, MASKED_SEED, MASKED_SIZE


@pytest.fixture
def mask_set(masked_phantom_dir) -> Path:
    """The session's phantom set with masks (conftest.masked_phantom_dir; read-only: copy it to change files)."""
    return masked_phantom_dir


def copy_of(mask_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mask_set, tmp_path / "set"))


# ---- phantom masks -------------------------------------------------------------------------------------------------


def test_phantom_mask_agrees_with_the_rendered_phantom():
    plan = plan_phantoms(40, seed=1)
    size = 96
    nodule_contrast, heart_contrast = [], []
    for image in plan:
        mask = phantom_mask(image, size)
        assert mask.shape == (size, size) and mask.dtype == np.uint8 and mask.max() < len(MASK_CLASSES)
        assert ((mask == NODULE).any()) == ("Nodule" in image.findings)
        pixels = render_phantom(image, size)
        lung = pixels[mask == MASK_CLASSES.index("lung")]
        heart_contrast.append(pixels[mask == MASK_CLASSES.index("heart")].mean() - lung.mean())
        if "Nodule" in image.findings:
            disc = mask == NODULE
            # The lung right around the disc (a ring 2-4 px out), as it appears on the rendered image.
            grown = F.max_pool2d(torch.from_numpy(disc)[None].float(), 9, 1, 4)[0].numpy() > 0
            near = F.max_pool2d(torch.from_numpy(disc)[None].float(), 5, 1, 2)[0].numpy() > 0
            ring = grown & ~near & (mask == MASK_CLASSES.index("lung"))
            nodule_contrast.append(pixels[disc].mean() - pixels[ring].mean())
    assert len(nodule_contrast) >= 5
    assert min(nodule_contrast) > 0.1, "the nodule disc is the bright spot of the rendered image"
    assert np.mean(heart_contrast) > 0.1, "the heart is denser than the lung fields"


def test_demo_data_masks_read_back(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo-data", str(out), "--patients", "3", "--image-size", "40", "--masks", "--no-dicom"]) == 0
    assert "masks/" in capsys.readouterr().out
    assert json.loads((out / "masks" / "classes.json").read_text()) == list(MASK_CLASSES)
    plan = plan_phantoms(3, 0, version=3)  # demo-data's default version: non-square images
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == sorted(i.image_index for i in plan)
    for image in plan:
        stored = np.asarray(Image.open(out / "masks" / image.image_index))
        assert stored.shape == np.asarray(Image.open(out / "images" / image.image_index)).shape
        assert np.array_equal(stored, phantom_mask(image, 40))
    assert cli_main(["demo-data", str(tmp_path / "p"), "--modality", "pathology", "--masks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masks" in err[0]


def test_the_default_set_is_the_cached_phantoms_with_masks_added(tmp_path, monkeypatch):
    """Without --train_data: the cached phantom set; one cached before without masks gains them, images unchanged."""
    monkeypatch.setenv("HF_MEDVIS_CACHE", str(tmp_path))
    root = ensure_phantom_dataset(patients=4, image_size=32)
    assert not (root / "masks").exists()
    before = {p.name: p.read_bytes() for p in (root / "images").iterdir()}
    args = SegmentationDataArguments(phantom_patients=4, phantom_image_size=32, validation_split_percentage=40)
    data = build_datasets(args, SEGMENTATION, image_size=32)
    assert data.source.synthetic and data.mask_labels == MASK_CLASSES
    assert len(data.train) + len(data.eval) == len(before)
    assert {p.name: p.read_bytes() for p in (root / "images").iterdir()} == before
    assert sorted(p.stem for p in (root / "masks").glob("*.png")) == sorted(Path(n).stem for n in before)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [], "no temporary folder left behind"


# ---- the joint transform -------------------------------------------------------------------------------------------

# Grey levels of the classes in an image the mask is then read back from; 0 only where a rotation brings pixels in.
LEVELS = torch.tensor([40, 100, 160, 220], dtype=torch.uint8)


def mask_from_image(image: torch.Tensor) -> torch.Tensor:
    """The class whose grey level is nearest each pixel (an image drawn from LEVELS gives its mask back)."""
    return (image[0].long()[..., None] - LEVELS.long()).abs().argmin(-1)


def interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2 radius + 1)^2 neighbourhood lies inside the image and holds one value: away from the edges an
    interpolation blends (a region's edge, or the image's border, which a rotation blends with its fill)."""
    m = F.pad(mask[None, None].float(), (radius,) * 4, value=-1.0)
    k = 2 * radius + 1
    return (F.max_pool2d(m, k, 1) == -F.max_pool2d(-m, k, 1))[0, 0]


def non_square_phantom() -> tuple[torch.Tensor, torch.Tensor]:
    image = next(i for i in plan_phantoms(12, seed=2) if "Nodule" in i.findings)
    # 96 x 80, not square; background (class 0) on every border, so a pixel blended with the fill of a rotation is
    # read back as background, as its nearest mask pixel is.
    classes = torch.from_numpy(phantom_mask(image, 96)[:, 8:88].astype(np.int64))
    picture = LEVELS[classes][None]
    assert torch.equal(mask_from_image(picture), classes)
    return picture, mask_from_image(picture)


@pytest.mark.parametrize("is_training", [True, False])
def test_a_mask_drawn_from_the_image_stays_aligned_through_the_transform(is_training):
    picture, mask = non_square_phantom()
    size = 48
    for seed in range(6):
        transform = create_transform(
            SEGMENTATION, is_training, image_size=size, **({"seed": seed} if is_training else {})
        )
        args = ((picture, mask), f"key{seed}") if is_training else (picture, mask)
        image_t, mask_t = transform(*args)
        assert image_t.dtype == torch.uint8 and image_t.shape == (1, size, size)
        assert mask_t.dtype == torch.int64 and mask_t.shape == (size, size)
        inside = interior(mask_t)
        labelled = inside & (mask_t != IGNORE_INDEX)
        assert labelled.float().mean() > 0.3
        assert torch.equal(mask_from_image(image_t)[labelled], mask_t[labelled])
        assert (image_t[0][inside & (mask_t == IGNORE_INDEX)] == 0).all(), "pixels rotated in: fill and ignore"
        if not is_training:  # the whole image, resized: nearest for the mask, nothing cropped
            expected = F.interpolate(mask[None, None].float(), (size, size), mode="nearest")[0, 0].long()
            assert torch.equal(mask_t, expected)
            break
    if is_training:  # the check has teeth: a mask transformed with its own draws is out of line
        train = create_transform(SEGMENTATION, True, image_size=size, seed=0)
        image_a, _ = train((picture, mask), "a")
        _, mask_b = train((picture, mask), "b")
        labelled = interior(mask_b) & (mask_b != IGNORE_INDEX)
        assert not torch.equal(mask_from_image(image_a)[labelled], mask_b[labelled])


def test_segmentation_transform_options_are_checked():
    with pytest.raises(ValueError, match="takes no rand_augment_magnitude"):
        create_transform(SEGMENTATION, True, image_size=32, rand_augment_magnitude=5)
    with pytest.raises(ValueError, match="differ in size"):
        create_transform(SEGMENTATION, False, image_size=32)(
            torch.zeros(1, 10, 12, dtype=torch.uint8), torch.zeros(10, 10)
        )


# ---- SIIM run-length encoding ----------------------------------------------------------------------------------------


def direct_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """SIIM's rle2mask written another way: absolute positions one pixel at a time, column-major via unravel_index."""
    out = np.zeros((height, width), dtype=np.uint8)
    if encoded.strip() == "-1":
        return out
    numbers = [int(v) for v in encoded.split()]
    position = 0
    for start, length in zip(numbers[::2], numbers[1::2], strict=True):
        position += start
        for pixel in range(position, position + length):
            row, col = np.unravel_index(pixel, (height, width), order="F")
            out[row, col] = 1
        position += length
    return out


def test_decode_rle_equals_a_direct_decode():
    # Hand-checked: on a 2 x 3 image pixels run down the columns; "1 2 2 1" sets pixels 1, 2 and 5.
    assert decode_rle("1 2 2 1", 2, 3).tolist() == [[0, 1, 0], [1, 0, 1]]
    assert not decode_rle(" -1", 4, 5).any() and decode_rle("-1", 4, 5).shape == (4, 5)
    rng = np.random.default_rng(0)
    for height, width in ((7, 11), (16, 9), (32, 32)):
        for _ in range(10):
            runs = rng.integers(1, 6, size=2 * int(rng.integers(1, 8)))
            runs[0] = rng.integers(0, 4)  # a first run may start at pixel 0
            if runs.sum() > height * width:
                continue
            encoded = " " + " ".join(map(str, runs))
            assert np.array_equal(decode_rle(encoded, height, width), direct_decode(encoded, height, width)), encoded


@pytest.mark.parametrize(
    ("encoded", "reason"), [("3 4 5", "even count"), ("0 7", "beyond the 2x3 image"), ("a b", "integers")]
)
def test_bad_rle_strings_are_refused(encoded, reason):
    with pytest.raises(ValueError, match=reason):
        decode_rle(encoded, 3, 2)


def encode_rle(mask: np.ndarray) -> list[str]:
    """The SIIM encoding of a binary mask as two rows where it has several runs (the last run on its own row, as SIIM
    lists each pneumothorax of an image on a row of its own; the rows of an image are united when read)."""
    flat = np.concatenate([[0], mask.T.ravel(), [0]])
    changes = np.flatnonzero(np.diff(flat))
    runs = list(zip(changes[::2].tolist(), changes[1::2].tolist(), strict=True))
    if not runs:
        return []
    pairs, previous_end = [], 0
    for start, end in runs[:-1]:
        pairs += [start - previous_end, end - start]
        previous_end = end
    last = f"{runs[-1][0]} {runs[-1][1] - runs[-1][0]}"
    return [" ".join(map(str, pairs)), last] if pairs else [last]


def test_rle_masks_through_build_datasets(mask_set, tmp_path):
    """SIIM layout (DICOM images, an RLE CSV): a nodule-only mask per image, two rows where the nodule has several
    runs, -1 where none."""
    plan = {i.image_index[:-4]: i for i in plan_phantoms(SET_PATIENTS, SET_SEED)}
    rle = tmp_path / "train-rle.csv"
    multi_row = 0
    with open(rle, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", " EncodedPixels"])
        for stem, image in plan.items():
            runs = encode_rle(phantom_mask(image, SET_SIZE) == NODULE)
            multi_row += len(runs) > 1
            for run in runs or ["-1"]:
                writer.writerow([stem, " " + run])
    assert multi_row > 0
    args = SegmentationDataArguments(
        train_data=str(mask_set / "dicom"),
        masks_rle=str(rle),
        mask_labels="background,nodule",
        validation_split_percentage=30,
    )
    data = build_datasets(args, SEGMENTATION, image_size=SET_SIZE)
    assert data.mask_labels == ("background", "nodule")
    nodules = 0
    for i, example in enumerate(data.eval):
        stem = Path(data.eval.data["path"][i].as_py()).stem
        expected = phantom_mask(plan[stem], SET_SIZE) == NODULE
        assert np.array_equal(example["labels"].numpy(), expected.astype(np.int64))
        nodules += int(expected.any())
    assert nodules > 0, "the split is stratified by the classes present: nodules on both sides"


# ---- build_datasets ------------------------------------------------------------------------------------------------


def test_build_datasets_pairs_images_with_their_masks_and_splits_by_patient(mask_set):
    args = SegmentationDataArguments(
        train_data=str(mask_set / "images"), masks_dir=str(mask_set / "masks"), validation_split_percentage=30
    )
    data = build_datasets(args, SEGMENTATION, image_size=SET_SIZE, seed=0)
    assert data.mask_labels == MASK_CLASSES == data.train.mask_labels
    plan = {i.image_index[:-4]: i for i in plan_phantoms(SET_PATIENTS, SET_SEED)}
    assert len(data.train) + len(data.eval) == len(plan) and len(data.eval) > 0
    # Patients from labels.csv: as many groups as patients, none on both sides.
    train_groups, eval_groups = (set(d.data["group"].to_pylist()) for d in (data.train, data.eval))
    assert not train_groups & eval_groups
    assert len(train_groups | eval_groups) == SET_PATIENTS
    val_stems = [Path(path).stem for path in data.eval.data["path"].to_pylist()]
    report = data.split_report["splits"]
    assert (report["train"]["images"], report["val"]["images"]) == (len(data.train), len(data.eval))
    assert report["val"]["images_with_class"] == {
        name: sum(int((phantom_mask(plan[stem], SET_SIZE) == c).any()) for stem in val_stems)
        for c, name in enumerate(MASK_CLASSES)
        if c > 0
    }
    for i, example in enumerate(data.eval):  # evaluation at the stored size: the image and its own mask, unchanged
        stem = val_stems[i]
        assert example["patient"] == data.eval.data["group"][i].as_py()
        assert np.array_equal(example["labels"].numpy(), phantom_mask(plan[stem], SET_SIZE))
        stored = np.asarray(Image.open(mask_set / "images" / f"{stem}.png"))
        assert np.array_equal(example["pixel_values"][0].numpy(), stored)
    example = data.train[0]
    assert example["pixel_values"].shape == (1, SET_SIZE, SET_SIZE) and example["labels"].shape == (SET_SIZE, SET_SIZE)


def test_an_image_without_a_mask_is_reported_not_dropped_silently(mask_set, tmp_path):
    root = copy_of(mask_set, tmp_path)
    gone = sorted((root / "masks").glob("*.png"))[0]
    gone.unlink()
    args = SegmentationDataArguments(
        train_data=str(root / "images"), masks_dir=str(root / "masks"), validation_split_percentage=30
    )
    data = build_datasets(args, SEGMENTATION, image_size=SET_SIZE)
    assert data.skipped_images == [{"path": gone.name, "reason": f"no mask {gone.stem}.png in {root / 'masks'}"}]
    assert len(data.train) + len(data.eval or []) == len(list((root / "images").glob("*.png"))) - 1


def one_line_error(root: Path, **overrides) -> str:
    args = SegmentationDataArguments(train_data=str(root / "images"), masks_dir=str(root / "masks"), **overrides)
    with pytest.raises(MaskError) as error:
        build_datasets(args, SEGMENTATION, image_size=SET_SIZE)
    text = str(error.value)
    assert "\n" not in text
    return text


def test_bad_masks_fail_with_one_line_naming_the_file(mask_set, tmp_path):
    root = copy_of(mask_set, tmp_path)
    first, second = sorted((root / "masks").glob("*.png"))[:2]
    Image.fromarray(np.zeros((SET_SIZE, SET_SIZE + 4), dtype=np.uint8)).save(first)
    text = one_line_error(root)
    assert str(first) in text and str(root / "images" / first.name) in text and f"{SET_SIZE + 4}x{SET_SIZE}" in text
    shutil.copy(mask_set / "masks" / first.name, first)
    bad = np.asarray(Image.open(second)).copy()
    bad[3, 3] = 7
    Image.fromarray(bad).save(second)
    text = one_line_error(root)
    assert str(second) in text and "value 7" in text
    shutil.copy(mask_set / "masks" / second.name, second)
    Image.fromarray(np.zeros((SET_SIZE, SET_SIZE, 3), dtype=np.uint8)).save(second)
    assert str(second) in one_line_error(root) and "RGB" in one_line_error(root)
    shutil.copy(mask_set / "masks" / second.name, second)
    (root / "masks" / "classes.json").unlink()
    assert "--mask_labels" in one_line_error(root)
    assert "value 3" in one_line_error(root, mask_labels="background,lung,heart")


def test_segmentation_arguments_are_checked(mask_set):
    with pytest.raises(ValueError, match="needs its masks"):  # a folder (prepared shards carry their masks)
        build_datasets(SegmentationDataArguments(train_data=str(mask_set / "images")), SEGMENTATION, image_size=32)
    with pytest.raises(ValueError, match="not both"):
        SegmentationDataArguments(train_data="x", masks_dir="m", masks_rle="r.csv")
    with pytest.raises(ValueError, match="need --train_data"):
        SegmentationDataArguments(masks_dir="m")
