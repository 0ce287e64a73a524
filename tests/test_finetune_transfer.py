"""MAE -> ViT transfer, position-embedding interpolation, model-folder checks, and optimizer parameter groups."""

import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
import torch
from conftest import load_recipe
from safetensors.torch import load_file

from hf_medvis.data.labels import LabelSpec
from hf_medvis.models.build import ModelSetupError, build_mae_model
from hf_medvis.models.param_groups import layer_id, vit_param_groups
from hf_medvis.models.transfer import build_classifier, interpolate_position_embeddings, load_classifier

SPEC = LabelSpec(("Cardiomegaly", "Effusion", "Nodule"), "multi_label_classification")


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mae") / "out"
    torch.manual_seed(0)
    build_mae_model(None, preset="tiny", image_size=32, patch_size=8).save_pretrained(folder)
    return folder


def test_mae_encoder_transfers_and_the_report_names_every_key(mae_dir, caplog):
    from safetensors.torch import load_file

    source = load_file(mae_dir / "model.safetensors")
    model, report = build_classifier(str(mae_dir), SPEC)
    encoder = sorted(k for k in source if k.startswith("vit."))
    assert report.source_type == "vit_mae"
    assert len(report.loaded) == len(encoder) and all(k.startswith("vit.") for k in report.loaded)
    assert report.dropped and all(k.startswith("decoder.") for k in report.dropped)
    assert report.missing == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == [] and report.interpolated is None
    state = model.state_dict()  # transformers 5 ViT names: layers.N.attention.q_proj (ViTMAE: encoder.layer.N...)
    for target, origin in (
        ("vit.embeddings.patch_embeddings.projection.weight", None),
        ("vit.layers.1.attention.q_proj.weight", "vit.encoder.layer.1.attention.attention.query.weight"),
        ("vit.layers.0.mlp.fc2.bias", "vit.encoder.layer.0.output.dense.bias"),
        ("vit.layernorm.weight", None),
    ):
        assert torch.equal(state[target], source[origin or target]), target
    summary = report.summary()
    assert f"{len(encoder)} loaded" in summary and "2 missing (classifier.bias, classifier.weight)" in summary
    assert "dropped (decoder.*)" in summary
    assert model.config.id2label == {0: "Cardiomegaly", 1: "Effusion", 2: "Nodule"}
    assert model.config.problem_type == "multi_label_classification"


def test_new_image_size_interpolates_position_embeddings(mae_dir):
    from safetensors.torch import load_file

    model, report = build_classifier(str(mae_dir), SPEC, image_size=48)  # 4x4 -> 6x6 patches
    pos = model.state_dict()["vit.embeddings.position_embeddings"]
    assert pos.shape == (1, 1 + 36, 64)
    assert "from 16 to 36 patches" in report.interpolated
    source = load_file(mae_dir / "model.safetensors")["vit.embeddings.position_embeddings"]
    assert torch.equal(pos[:, 0], source[:, 0])  # the CLS position is kept
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 48, 48)).logits
    assert out.shape == (2, 3)
    # Interpolating to the same grid is the identity; a constant field stays constant.
    assert torch.allclose(interpolate_position_embeddings(source, 16), source, atol=1e-5)
    flat = torch.ones(1, 17, 8)
    assert torch.allclose(interpolate_position_embeddings(flat, 64), torch.ones(1, 65, 8), atol=1e-5)


def test_vit_folders_bare_encoders_and_new_label_sets(tmp_path, mae_dir):
    from transformers import ViTModel

    first, _ = build_classifier(str(mae_dir), SPEC, pooling="mean")
    first.save_pretrained(tmp_path / "clf")
    # A classifier for other labels: the encoder loads, the head is re-initialised.
    other = LabelSpec(("A", "B"), "single_label_classification")
    model, report = build_classifier(str(tmp_path / "clf"), other)
    assert report.source_type == "vit" and report.reinitialised == ["classifier.bias", "classifier.weight"]
    assert model.config.num_labels == 2 and model.config.problem_type == "single_label_classification"
    # A bare ViTModel (keys without the "vit." prefix, plus a pooler that the classifier does not use).
    bare = ViTModel(model.config)
    bare.save_pretrained(tmp_path / "bare")
    _, report = build_classifier(str(tmp_path / "bare"), SPEC)
    assert report.loaded and report.dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    # Mean pooling survives a save/load through load_classifier.
    loaded = load_classifier(str(tmp_path / "clf"))
    assert type(loaded).__name__ == "MeanPoolViTForImageClassification"
    # A folder saved before mean-pooled classifiers had their own model_type ("vit" with pooling "mean") still loads
    # mean-pooled through load_classifier.
    shutil.copytree(tmp_path / "clf", tmp_path / "legacy")
    (tmp_path / "legacy" / "modeling_hf_medvis_vit.py").unlink()
    config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    config.pop("auto_map")
    config.update(model_type="vit", architectures=["ViTForImageClassification"])
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(config))
    legacy = load_classifier(str(tmp_path / "legacy"))
    assert type(legacy).__name__ == "MeanPoolViTForImageClassification"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(legacy(pixel_values=pixels).logits, first(pixel_values=pixels).logits)


def test_folders_that_are_not_vit_models_are_refused(tmp_path, mae_dir):
    from transformers import BertConfig

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSetupError, match="has no config.json"):
        build_classifier(str(tmp_path / "empty"), SPEC)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ModelSetupError, match="is a 'bert' model; a ViT or ViT-MAE is needed"):
        build_classifier(str(tmp_path / "bert"), SPEC)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((mae_dir / "config.json").read_text())
    with pytest.raises(ModelSetupError, match="safetensors only.*no file named model.safetensors"):
        build_classifier(str(tmp_path / "noweights"), SPEC)
    with pytest.raises(ModelSetupError, match="--patch_size 16 differs"):
        build_classifier(str(mae_dir), SPEC, patch_size=16)
    with pytest.raises(ModelSetupError, match="not a fine-tuned ViT classifier"):
        load_classifier(str(mae_dir))
    config = json.loads((mae_dir / "config.json").read_text())
    assert config["model_type"] == "vit_mae"


def test_layer_decay_and_no_weight_decay_groups():
    model, _ = build_classifier(None, SPEC, preset="tiny", image_size=32)  # 2 blocks
    groups = vit_param_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["names"]}
    assert layer_id("vit.embeddings.cls_token", 2) == 0 and layer_id("vit.layers.1.mlp.fc2.weight", 2) == 2 == layer_id(
        "vit.encoder.layer.1.output.dense.weight", 2
    )
    assert by_name["classifier.weight"]["lr"] == 1.0 and by_name["vit.layernorm.weight"]["lr"] == 1.0
    assert by_name["vit.layers.1.attention.q_proj.weight"]["lr"] == 0.5
    assert by_name["vit.layers.0.attention.q_proj.weight"]["lr"] == 0.25
    assert by_name["vit.embeddings.patch_embeddings.projection.weight"]["lr"] == 0.125
    for name in (
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.layernorm.weight",
        "vit.layers.0.layernorm_before.bias",
        "classifier.bias",
    ):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in (
        "classifier.weight",
        "vit.layers.0.mlp.fc1.weight",
        "vit.embeddings.patch_embeddings.projection.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.05, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


MEAN_RUN = (
    "--per_device_train_batch_size 8 --max_steps 2 --logging_steps 1 --save_steps 1 --save_total_limit 5 --eval_strategy no "
    "--load_best_model_at_end false --ci_bootstrap_samples 10 --validation_split_percentage 25 --seed 7 --pooling mean"
).split()


def _run(recipe, argv: list[str]) -> str:
    log = io.StringIO()
    with redirect_stdout(log):  # setup_logging logs to stdout
        recipe.main(argv)
    return log.getvalue()


def test_mean_pooled_checkpoints_load_everywhere_resume_and_fine_tune_on(tmp_path, phantom_dir, mae_dir):
    """Every folder a --pooling mean run writes (the Trainer's checkpoint-N and the output) carries its model_type and
    code: transformers with trust_remote_code reads each as load_classifier does; the recipe resumes from a checkpoint
    and fine-tunes from the output."""
    from transformers import AutoModelForImageClassification

    recipe = load_recipe("finetune_vit")
    argv = ["--train_data", str(phantom_dir / "images"), *MEAN_RUN]
    out = tmp_path / "run"
    _run(recipe, [*argv, "--model_name_or_path", str(mae_dir), "--output_dir", str(out)])
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        assert json.loads((folder / "config.json").read_text())["model_type"] == "hf_medvis_vit", folder.name
        ours = load_classifier(str(folder))
        pixels = torch.randn(2, 3, ours.config.image_size, ours.config.image_size)
        theirs = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
        assert type(theirs).__module__.startswith("transformers_modules."), folder.name
        with torch.no_grad():
            torch.testing.assert_close(theirs(pixel_values=pixels).logits, ours(pixel_values=pixels).logits)

    # Resumed from checkpoint-1, step 2 ends with the uninterrupted run's weights.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    log = _run(
        recipe,
        [*argv, "--model_name_or_path", str(mae_dir), "--output_dir", str(resumed), "--resume_from_checkpoint", "last"],
    )
    assert "tensors restored" in log
    reference, final = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert reference.keys() == final.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    # Fine-tuning from the mean-pooled output: its encoder and head load (same labels), nothing is left over.
    log = _run(
        recipe, [*argv, "--max_steps", "1", "--model_name_or_path", str(out), "--output_dir", str(tmp_path / "again")]
    )
    assert "weights from vit checkpoint" in log and "0 missing" in log and "0 unexpected" in log, log
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "hf_medvis_vit"


def test_a_hub_model_is_normalised_with_its_own_processor(tmp_path, phantom_dir):
    """`--model_name_or_path owner/name` (here served from the Hub cache: the Hub is a dead port) trains and saves with
    that model's own mean/std, not the X-ray defaults meant for our own checkpoints."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cache = tmp_path / "hub_cache"
    repo = cache / "models--acme--tiny-vit"
    snapshot = repo / "snapshots" / ("0" * 40)  # the Hub cache's layout: refs/main names the snapshot
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(snapshot)
    ViTImageProcessor(image_mean=[0.25] * 3, image_std=[0.125] * 3, size={"height": 32, "width": 32}).save_pretrained(
        snapshot
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "run"
    argv = f"--train_data {phantom_dir / 'images'} --model_name_or_path acme/tiny-vit --cache_dir {cache} "
    argv += f"--output_dir {out} --image_size 32 --max_steps 1 --per_device_train_batch_size 4 --eval_strategy no "
    argv += "--load_best_model_at_end false --validation_split_percentage 0"
    _run(load_recipe("finetune_vit"), argv.split())
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.25] * 3 and saved["image_std"] == [0.125] * 3
