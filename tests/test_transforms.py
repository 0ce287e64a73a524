"""create_transform: for each task and mode the documented uint8 output, random training draws, deterministic
evaluation, per-sample seeding, and a one-line error for an unknown task or an option the task does not use."""

from __future__ import annotations

import pytest
import torch

from hf_medvis.core.tasks import CLASSIFICATION, MAE
from hf_medvis.data.transforms import SeededAugmentation, create_transform

SIZE = 32
# The image-only tasks; segmentation's joint (image, mask) transform is tested in tests/test_masks.py.
TASKS = (MAE, CLASSIFICATION)


def images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "grey non-square": torch.randint(0, 256, (1, 48, 80), dtype=torch.uint8, generator=g),
        "colour": torch.randint(0, 256, (3, 70, 50), dtype=torch.uint8, generator=g),
    }


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("is_training", [True, False])
def test_output_is_uint8_at_the_image_size_with_the_input_channels(task, is_training):
    transform = create_transform(task, is_training, image_size=SIZE)
    for image in images().values():
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (image.shape[0], SIZE, SIZE)
        assert int(out.min()) >= 0 and int(out.max()) <= 255 and out.float().std() > 0


@pytest.mark.parametrize("task", TASKS)
def test_training_draws_differ_and_evaluation_is_deterministic(task):
    image = images()["grey non-square"]
    train = create_transform(task, True, image_size=SIZE)
    torch.manual_seed(0)
    draws = [train(image) for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    evaluation = create_transform(task, False, image_size=SIZE)
    assert torch.equal(evaluation(image), evaluation(image))
    # Evaluation is the same for both tasks: shorter side to the size, then the centre.
    assert torch.equal(evaluation(image), create_transform(TASKS[0], False, image_size=SIZE)(image))


@pytest.mark.parametrize("task", TASKS)
def test_seeded_training_depends_only_on_seed_epoch_and_key(task):
    image = images()["colour"]
    augmentation = create_transform(task, True, image_size=SIZE, seed=3)
    assert isinstance(augmentation, SeededAugmentation)
    first = augmentation(image, "a")
    torch.manual_seed(99)  # the global generator does not matter
    assert torch.equal(first, augmentation(image, "a"))
    assert not torch.equal(first, augmentation(image, "b"))
    augmentation.epoch = 1
    assert not torch.equal(first, augmentation(image, "a"))


def test_load_transform_gives_the_load_size_and_passes_that_size_through():
    load = create_transform(MAE, True, image_size=SIZE, load_size=40)
    out = load(images()["grey non-square"])
    assert out.dtype == torch.uint8 and out.shape == (1, 40, 40)
    square = torch.randint(0, 256, (1, 40, 40), dtype=torch.uint8)
    assert load(square) is square


def test_task_options_change_the_pipeline():
    image = images()["grey non-square"]
    plain = create_transform(CLASSIFICATION, True, image_size=SIZE, rotation_degrees=0, seed=1)
    rotated = create_transform(CLASSIFICATION, True, image_size=SIZE, rotation_degrees=30, seed=1)
    assert not torch.equal(plain(image, "k"), rotated(image, "k"))
    names = [type(step).__name__ for step in create_transform(MAE, True, image_size=SIZE, hflip=False).transforms]
    assert names == ["RandomResizedCrop"]


def test_unknown_task_is_one_line_naming_it():
    with pytest.raises(ValueError, match="unknown task 'detection'") as error:
        create_transform("detection", True, image_size=SIZE)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("task", "is_training", "options", "refused"),
    [
        (MAE, True, {"rotation_degrees": 5.0}, "rotation_degrees"),
        (CLASSIFICATION, True, {"load_size": 40}, "load_size"),
        (MAE, True, {"load_size": 40, "hflip": False}, "hflip"),
        (CLASSIFICATION, False, {"crop_scale": (0.5, 1.0)}, "crop_scale"),
        (MAE, False, {"seed": 0}, "seed"),
    ],
)
def test_an_option_the_task_does_not_use_is_refused(task, is_training, options, refused):
    with pytest.raises(ValueError, match=f"takes no {refused}"):
        create_transform(task, is_training, image_size=SIZE, **options)
