"""Other image backbones through the fine-tuning path: ViT, DeiT, BEiT, Dinov2, Swin and ConvNeXt checkpoints (tiny ones
built here, each saved with an image processor of distinctive statistics) become classifiers for our labels with their
encoder weights, their own normalisation, layer-wise lr decay by block, drop path and pooling; the recipe trains and
saves them; other architectures and impossible poolings are one-line errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import load_recipe, run_recipe

from hf_medvis.data.labels import LabelSpec
from hf_medvis.models import ClassifierModelArguments, build_model, resolve_normalization
from hf_medvis.models.backbones import BACKBONES
from hf_medvis.models.build import ModelSetupError
from hf_medvis.models.drop_path import encoder_layers
from hf_medvis.models.param_groups import vit_param_groups
from hf_medvis.models.transfer import load_classifier

SPEC = LabelSpec(("Cardiomegaly", "Effusion", "Nodule"), "multi_label_classification")
SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
# model_type -> (config, the class the checkpoint is saved as, its image processor class)
CHECKPOINTS = {
    "vit": (
        transformers.ViTConfig(**SMALL, intermediate_size=64),
        "ViTForImageClassification",
        "ViTImageProcessor",
    ),
    "deit": (  # as the distilled DeiTs on the Hub: a distillation head beside the classifier
        transformers.DeiTConfig(**SMALL, intermediate_size=64),
        "DeiTForImageClassificationWithTeacher",
        "DeiTImageProcessor",
    ),
    "beit": (
        transformers.BeitConfig(**SMALL, intermediate_size=64),
        "BeitForImageClassification",
        "BeitImageProcessor",
    ),
    "dinov2": (transformers.Dinov2Config(**SMALL, mlp_ratio=2), "Dinov2ForImageClassification", "BitImageProcessor"),
    "swin": (
        transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4
        ),
        "SwinForImageClassification",
        "ViTImageProcessor",
    ),
    "convnext": (
        transformers.ConvNextConfig(image_size=32, patch_size=4, hidden_sizes=[16, 32], depths=[1, 2], num_stages=2),
        "ConvNextForImageClassification",
        "ConvNextImageProcessor",
    ),
}
# Blocks counted for layer decay: ViT-like layers, or Swin / ConvNeXt blocks over all stages (1 + 2).
DEPTH = {"vit": 2, "deit": 2, "beit": 2, "dinov2": 2, "swin": 3, "convnext": 3}
# (parameter, its block counted from 1): the first block is lr x decay^depth, the last lr x decay.
BLOCKS = {
    "vit": [("vit.layers.0.mlp.fc1.weight", 1), ("vit.layers.1.attention.q_proj.weight", 2)],
    "deit": [("deit.layers.0.mlp.fc1.weight", 1), ("deit.layers.1.mlp.fc2.bias", 2)],
    "beit": [("beit.layers.0.attention.q_proj.weight", 1), ("beit.layers.1.lambda_1", 2)],
    "dinov2": [("dinov2.encoder.layer.0.mlp.fc1.weight", 1), ("dinov2.encoder.layer.1.layer_scale2.lambda1", 2)],
    "swin": [
        ("swin.encoder.layers.0.blocks.0.mlp.fc1.weight", 1),
        ("swin.encoder.layers.0.downsample.reduction.weight", 1),  # patch merging after stage 0's last block
        ("swin.encoder.layers.1.blocks.0.attention.q_proj.weight", 2),
        ("swin.encoder.layers.1.blocks.1.mlp.fc2.weight", 3),
    ],
    "convnext": [
        ("convnext.encoder.stages.0.layers.0.pwconv1.weight", 1),
        ("convnext.encoder.stages.1.downsampling_layer.1.weight", 2),  # down-sampling before stage 1's first block
        ("convnext.encoder.stages.1.layers.0.dwconv.weight", 2),
        ("convnext.encoder.stages.1.layers.1.pwconv2.weight", 3),
    ],
}


def _stats(model_type: str) -> tuple[list[float], list[float]]:
    index = list(CHECKPOINTS).index(model_type)
    return [0.1 + 0.05 * index, 0.2, 0.3], [0.15 + 0.01 * index, 0.25, 0.35]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """model_type -> a folder holding a tiny checkpoint (a 5-class head of its own) and its image processor."""
    root = tmp_path_factory.mktemp("backbones")
    folders = {}
    for model_type, (config, model_class, processor_class) in CHECKPOINTS.items():
        torch.manual_seed(0)
        config = copy.deepcopy(config)
        config.num_labels = 5
        getattr(transformers, model_class)(config).save_pretrained(root / model_type)
        mean, std = _stats(model_type)
        getattr(transformers, processor_class)(image_mean=mean, image_std=std).save_pretrained(root / model_type)
        folders[model_type] = root / model_type
    return folders


def _build(folder, **kwargs):
    torch.manual_seed(1)  # the new head's initialisation
    return build_model(
        ClassifierModelArguments(model_name_or_path=str(folder), **kwargs), task="classification", labels=SPEC
    )


@pytest.mark.parametrize("model_type", list(CHECKPOINTS))
def test_a_checkpoint_becomes_a_classifier_for_our_labels(checkpoints, model_type):
    folder = checkpoints[model_type]
    built = _build(folder)
    model, report = built.model, built.load_report
    assert type(model).__name__ == BACKBONES[model_type].classifier
    assert model.config.num_labels == 3 and model.config.id2label == dict(enumerate(SPEC.names))
    assert model.config.label2id == {name: i for i, name in enumerate(SPEC.names)}
    assert model.config.problem_type == "multi_label_classification"
    # The encoder is the checkpoint's, key for key; the old 5-class head is re-initialised, and reported so. (Read
    # back with its own class: transformers 5 saves some architectures under their legacy parameter names.)
    saved = getattr(transformers, CHECKPOINTS[model_type][1]).from_pretrained(folder).state_dict()
    state = model.state_dict()
    encoder = [key for key in state if not key.startswith("classifier.")]
    assert encoder and all(torch.equal(state[key], saved[key]) for key in encoder)
    head = ["classifier.bias", "classifier.weight"]
    assert report.source_type == model_type
    if model_type == "deit":  # its heads have other names: both dropped, ours new
        assert {key.split(".")[0] for key in report.dropped} == {"cls_classifier", "distillation_classifier"}
        assert report.missing == head and report.reinitialised == []
    else:
        assert report.missing == [] and report.reinitialised == head
        assert "re-initialised for the new label set" in report.summary()
    with torch.no_grad():
        assert model.eval()(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)
    # Normalised with the checkpoint's own processor statistics; explicit ones still win.
    assert resolve_normalization(str(folder), 3, None, None) == _stats(model_type)
    assert resolve_normalization(str(folder), 3, [0.5], [0.2]) == ([0.5] * 3, [0.2] * 3)


@pytest.mark.parametrize("model_type", list(CHECKPOINTS))
def test_layer_decay_counts_the_blocks_of_each_architecture(checkpoints, model_type):
    model = _build(checkpoints[model_type]).model
    groups = vit_param_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5)
    lr = {name: group["lr"] for group in groups for name in group["names"]}
    depth = DEPTH[model_type]
    assert lr["classifier.weight"] == 1.0
    prefix = model.base_model_prefix
    embeddings = next(name for name in lr if name.startswith(f"{prefix}.embeddings."))
    assert lr[embeddings] == 0.5 ** (depth + 1)
    for name, block in BLOCKS[model_type]:
        assert lr[name] == 0.5 ** (depth + 1 - block), name
    # Every encoder block parameter is decayed: none is left at the head's lr.
    assert all(lr[name] < 1 for name in lr if name.startswith((f"{prefix}.encoder.", f"{prefix}.layers.")))
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("model_type", list(CHECKPOINTS))
def test_drop_path_reaches_each_architecture_and_leaves_evaluation_alone(checkpoints, model_type):
    plain = _build(checkpoints[model_type]).model.eval()
    dropped = _build(checkpoints[model_type], drop_path_rate=0.1).model
    if BACKBONES[model_type].own_drop_path:  # the architecture's own stochastic depth, set at load
        assert dropped.config.drop_path_rate == 0.1 and plain.config.drop_path_rate == 0.0
        assert any(type(module).__name__.endswith("DropPath") for module in dropped.modules())
    else:  # ours, on the ViT / DeiT layers
        assert encoder_layers(dropped)[-1].dropout[1].p == pytest.approx(0.1)
    assert set(dropped.state_dict()) == set(plain.state_dict())  # no weight added
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first = dropped.eval()(pixel_values=pixels).logits
        torch.testing.assert_close(dropped(pixel_values=pixels).logits, first)
        torch.testing.assert_close(first, plain(pixel_values=pixels).logits)


def test_pooling_each_architecture_cannot_do_is_one_line(checkpoints):
    for model_type, pooling in (("dinov2", "mean"), ("dinov2", "cls"), ("deit", "mean"), ("swin", "cls")):
        with pytest.raises(ModelSetupError, match=f"--pooling {pooling}: .* leave --pooling unset") as caught:
            _build(checkpoints[model_type], pooling=pooling)
        assert "\n" not in str(caught.value)
    # What they can do: BEiT either (its use_mean_pooling), Swin / ConvNeXt their global average as "mean".
    assert _build(checkpoints["beit"], pooling="cls").model.config.use_mean_pooling is False
    assert _build(checkpoints["beit"]).model.config.use_mean_pooling is True  # unset: the checkpoint's own
    assert type(_build(checkpoints["convnext"], pooling="mean").model).__name__ == "ConvNextForImageClassification"


def test_other_architectures_are_refused_in_one_line_before_any_data_is_read(tmp_path, checkpoints):
    resnet = tmp_path / "resnet"
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    transformers.ResNetForImageClassification(config).save_pretrained(resnet)
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(bert)  # fmt: skip
    supported = "vit, vit_mae, hf_medvis_vit, deit, beit, dinov2, swin, convnext"
    for folder, model_type in ((resnet, "resnet"), (bert, "bert")):
        with pytest.raises(ModelSetupError, match=f"is a '{model_type}' model; .*{supported}"):
            _build(folder)
    # The recipe says so before it looks for data (here: none at that path), and so for an impossible pooling.
    recipe = load_recipe("finetune_vit")
    for extra, expected in (
        (["--model_name_or_path", str(resnet)], "is a 'resnet' model"),
        (["--model_name_or_path", str(checkpoints["dinov2"]), "--pooling", "cls"], "--pooling cls: Dinov2"),
    ):
        argv = ["--train_data", str(tmp_path / "no_data"), "--output_dir", str(tmp_path / "out"), *extra]
        with pytest.raises(SystemExit, match=expected) as caught:
            run_recipe(recipe, argv)
        assert "no_data" not in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["deit", "convnext"])
def test_the_recipe_fine_tunes_and_saves_another_backbone(tmp_path, phantom_dir, checkpoints, model_type):
    # A 2-step run of its own (the default config's 2,400 steps are the demo's).
    config = tmp_path / "run.yaml"
    config.write_text(
        "problem_type: multi_label\nvalidation_split_percentage: 25\nmax_steps: 2\nper_device_train_batch_size: 4\n"
        "logging_steps: 1\neval_strategy: 'no'\nsave_strategy: 'no'\nload_best_model_at_end: false\nlayer_decay: 0.75\n"
        "dataloader_num_workers: 0\nreport_to: none\nseed: 0\n"
    )
    out = tmp_path / "run"
    argv = ["--config", str(config), "--train_data", str(phantom_dir / "images"), "--output_dir", str(out)]
    argv += ["--model_name_or_path", str(checkpoints[model_type]), "--image_size", "32", "--drop_path_rate", "0.1"]
    log = run_recipe(load_recipe("finetune_vit"), [*argv, "--eval_subsample", "8", "--ci_bootstrap_samples", "20"])
    name = BACKBONES[model_type].name
    assert f"model: {name} ({model_type})" in log, log
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 2
    saved = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(saved).__name__ == BACKBONES[model_type].classifier
    assert list(saved.config.id2label.values()) == list(SPEC.names)
    ours = load_classifier(str(out)).eval()  # as hf-medvis evaluate / predict load it
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values=pixels).logits, saved(pixel_values=pixels).logits)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == _stats(model_type)[0]
    card = (out / "README.md").read_text()
    assert f"{name} chest X-ray classifier" in card and f"model_type `{model_type}`" in card
    # transformers' pipeline scores a portrait grey X-ray as `hf-medvis predict` does (the saved processor resizes the
    # shorter side and centre-crops, as training and evaluation did).
    from PIL import Image

    from hf_medvis.evaluation import Predictor

    portrait = tmp_path / "portrait.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (101, 64), dtype=np.uint8)).save(portrait)
    classify = transformers.pipeline("image-classification", model=str(out))
    scores = {r["label"]: r["score"] for r in classify(Image.open(portrait), top_k=None)}
    expected = Predictor(out).predict([str(portrait)])[0]
    assert sorted(scores) == sorted(saved.config.label2id)
    for label, index in saved.config.label2id.items():
        assert scores[label] == pytest.approx(float(expected[index]), abs=1e-4), label


@pytest.mark.parametrize("model_type", ["deit", "dinov2", "swin", "convnext"])
def test_a_new_image_size_resizes_what_depends_on_it(checkpoints, model_type):
    built = _build(checkpoints[model_type], image_size=48)
    if model_type in ("deit", "dinov2"):  # DeiT's CLS and distillation positions are both kept
        assert "from 16 to 36 patches (image size 32 -> 48)" in built.load_report.interpolated
    with torch.no_grad():
        assert built.model.eval()(pixel_values=torch.randn(2, 3, 48, 48)).logits.shape == (2, 3)


def test_weights_sized_by_the_patch_grid_other_than_position_embeddings_are_not_resized(tmp_path):
    beit = tmp_path / "beit_relative"  # BEiT's relative position bias tables
    config = copy.deepcopy(CHECKPOINTS["beit"][0])
    config.use_relative_position_bias = True
    transformers.BeitForImageClassification(config).save_pretrained(beit)
    with pytest.raises(ModelSetupError, match="--image_size 48: .*relative_position_bias.* train at 32"):
        _build(beit, image_size=48)
