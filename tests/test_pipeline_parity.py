"""transformers alone scores a saved classifier's images as `hf-medvis predict` does: the processor and pipeline saved
in every classifier folder (models/processing_hf_medvis.py) read portrait, landscape and 16-bit inputs (files, PIL
images, arrays) as training did, for 1- and 3-channel models and each backbone; plain `pipeline("image-classification")`
keeps reading 8-bit images of a 3-channel folder without remote code."""

from __future__ import annotations

import ast
import copy
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from test_backbones import CHECKPOINTS

from hf_medvis.data.decode import read_image
from hf_medvis.data.labels import LabelSpec
from hf_medvis.data.phantoms import plan_phantoms, render_phantom
from hf_medvis.evaluation import Predictor
from hf_medvis.models.backbones import BACKBONES
from hf_medvis.models.build import MEDICAL_TASK, classifier_image_processor
from hf_medvis.models.processing_hf_medvis import _unit_float
from hf_medvis.models.transfer import build_classifier

SPEC = LabelSpec(("Cardiomegaly", "Effusion", "Nodule"), "multi_label_classification")
# ViT variants built as the recipe builds them; the other backbones from test_backbones' tiny configs.
MODELS = ["vit", "vit-1-channel", "vit-mean-pooled", "deit", "beit", "dinov2", "swin", "convnext"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """A rendered phantom as non-square 8-bit PNGs and 16-bit PNG/TIFF (values far above 255)."""
    root = tmp_path_factory.mktemp("parity_images")
    display = render_phantom(plan_phantoms(patients=1)[0], size=96)
    portrait, landscape = display[:, 18:74], display[22:70, :]  # 96 x 56, 48 x 96
    files = {}
    for name, pixels, depth, ext in (
        ("portrait8", portrait, 8, "png"),
        ("landscape8", landscape, 8, "png"),
        ("portrait16", portrait, 16, "png"),
        ("landscape16", landscape, 16, "tiff"),
    ):
        array = (pixels * 255).round().astype(np.uint8) if depth == 8 else (pixels * 60000 + 700).round()
        files[name] = root / f"{name}.{ext}"
        PIL.Image.fromarray(array.astype(np.uint8 if depth == 8 else np.uint16)).save(files[name])
    assert (
        PIL.Image.open(files["portrait16"]).mode == "I;16"
        and np.asarray(PIL.Image.open(files["portrait16"])).max() > 255
    )
    return files


def _save(folder, kind: str):
    """An untrained tiny classifier of ``kind`` saved with the processor and pipeline the recipe saves."""
    torch.manual_seed(0)
    if kind.startswith("vit"):
        channels = 1 if kind == "vit-1-channel" else 3
        pooling = "mean" if kind == "vit-mean-pooled" else "cls"
        model, _ = build_classifier(
            None, SPEC, preset="tiny", image_size=32, patch_size=8, num_channels=channels, pooling=pooling
        )
    else:
        config = copy.deepcopy(CHECKPOINTS[kind][0])
        config.update(
            {
                "num_labels": 3,
                "id2label": dict(enumerate(SPEC.names)),
                "label2id": {n: i for i, n in enumerate(SPEC.names)},
                "problem_type": SPEC.problem_type,
            }
        )
        model = getattr(transformers, BACKBONES[kind].classifier)(config)
    channels = model.config.num_channels
    mean, std = [0.3, 0.4, 0.5][:channels], [0.2, 0.25, 0.3][:channels]
    processor = classifier_image_processor(model.config, mean, std)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _scores(classify, image) -> np.ndarray:
    got = {r["label"]: r["score"] for r in classify(image, top_k=None)}
    return np.array([got[name] for name in SPEC.names])


@pytest.mark.parametrize("kind", MODELS)
def test_the_saved_pipeline_scores_every_input_as_predict_does(tmp_path, images, kind):
    folder = _save(tmp_path / kind, kind)
    names = list(images)
    expected = Predictor(folder, device="cpu").predict([str(images[n]) for n in names])
    config = json.loads((folder / "config.json").read_text())
    plain_readable = kind not in ("vit-1-channel", "vit-mean-pooled")
    assert list(config["custom_pipelines"]) == [MEDICAL_TASK if plain_readable else "image-classification"]
    assert (folder / "processing_hf_medvis.py").is_file()

    # The folder's own pipeline: the task comes from config.json, the code from the folder.
    classify = transformers.pipeline(model=str(folder), trust_remote_code=True)
    assert type(classify).__name__ == "MedVisImageClassificationPipeline"
    assert type(classify).__module__.startswith("transformers_modules.")  # the saved file, not hf_medvis
    for name, want in zip(names, expected, strict=True):
        np.testing.assert_allclose(_scores(classify, str(images[name])), want, atol=1e-4, err_msg=name)
    # A 16-bit image handed over as a PIL image or a uint16 array scores as its file does.
    sixteen = PIL.Image.open(images["portrait16"])
    np.testing.assert_allclose(_scores(classify, sixteen), expected[names.index("portrait16")], atol=1e-4)
    array = np.asarray(sixteen)
    assert array.dtype == np.uint16
    np.testing.assert_allclose(_scores(classify, array), expected[names.index("portrait16")], atol=1e-4)

    if plain_readable:
        # Plain transformers, no remote code: 8-bit portrait and landscape images score as before.
        plain = transformers.pipeline("image-classification", model=str(folder))
        assert type(plain.image_processor) is transformers.BitImageProcessor
        for name in ("portrait8", "landscape8"):
            want = expected[names.index(name)]
            np.testing.assert_allclose(_scores(plain, str(images[name])), want, atol=1e-4, err_msg=name)
        if kind == "vit":
            # ... but transformers' own image loading makes a 16-bit X-ray 8-bit RGB (clipped): the documented limit.
            wrong = _scores(plain, str(images["portrait16"])) - expected[names.index("portrait16")]
            assert np.abs(wrong).max() > 1e-3
    else:
        # Plain transformers cannot read this folder right: refused, and the usual remedy runs the saved pipeline.
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            transformers.pipeline("image-classification", model=str(folder))
        usual = transformers.pipeline("image-classification", model=str(folder), trust_remote_code=True)
        assert type(usual).__name__ == "MedVisImageClassificationPipeline"
        want = expected[names.index("landscape16")]
        np.testing.assert_allclose(_scores(usual, str(images["landscape16"])), want, atol=1e-4)


def test_a_colour_model_keeps_colour_and_a_grey_one_reads_luminance(tmp_path):
    """config.json's hf_medvis_input (a model trained on colour images) reaches the saved processor: both models score
    a colour PNG as `hf-medvis predict` does, which reads it in colour for one and as luminance for the other."""
    rng = np.random.default_rng(0)
    png = tmp_path / "colour.png"
    PIL.Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(png)
    scores = {}
    for colour in (False, True):
        torch.manual_seed(0)
        model, _ = build_classifier(None, SPEC, preset="tiny", image_size=32, patch_size=8)
        if colour:
            model.config.hf_medvis_input = {"channels": 3}
        folder = tmp_path / f"colour_{colour}"
        processor = classifier_image_processor(model.config, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])  # before the save
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        expected = Predictor(folder, device="cpu").predict([str(png)])[0]
        scores[colour] = _scores(transformers.pipeline(model=str(folder), trust_remote_code=True), str(png))
        np.testing.assert_allclose(scores[colour], expected, atol=1e-4)
    assert np.abs(scores[True] - scores[False]).max() > 1e-4  # the same weights: only the reading differs


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_saved_depth_rule_is_the_decoders(tmp_path):
    """The saved file restates data/decode's raster rule; it must give read_image's pixels for every PIL mode."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    cases = [
        (PIL.Image.fromarray(grey), "PNG"),
        (PIL.Image.fromarray(rng.integers(0, 65536, (12, 20), dtype=np.uint16)), "PNG"),  # I;16
        (PIL.Image.fromarray(rng.integers(0, 200, (12, 20), dtype=np.uint16)), "PNG"),  # I;16, values <= 255
        (PIL.Image.fromarray(rng.integers(0, 200, (12, 20)).astype(np.int32)), "TIFF"),  # I, values <= 255: /255
        (PIL.Image.fromarray(rng.integers(0, 4000, (12, 20)).astype(np.int32)), "TIFF"),  # I above 255: /65535
        (PIL.Image.fromarray(rng.normal(size=(12, 20)).astype(np.float32)), "TIFF"),  # F: min-max
        (PIL.Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)), "PNG"),  # RGB
        (PIL.Image.fromarray(grey).convert("P"), "PNG"),
        (PIL.Image.fromarray(grey).convert("LA"), "PNG"),
    ]
    for image, fmt in cases:
        data = _encoded(image, fmt)
        for colour in (False, True):
            with PIL.Image.open(io.BytesIO(data)) as reread:
                ours = _unit_float(reread, colour)
            theirs = read_image(data, channels=3 if colour else 1)
            if colour and ours.ndim == 2:  # read_image gives a grey image the 3 channels; the processor does later
                ours = np.repeat(ours[..., None], 3, axis=2)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{image.mode} {fmt} colour={colour}")


def test_the_saved_file_stands_alone():
    """A user of the folder needs numpy, PIL, torch and transformers, not hf_medvis."""
    from hf_medvis.models import processing_hf_medvis

    tree = ast.parse(Path(processing_hf_medvis.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"__future__", "typing", "io", "os", "urllib", "numpy", "PIL", "torch", "transformers"}
    assert {name.split(".")[0] for name in imported} <= allowed
