"""Linear probing (issue 14, item 2): the encoder stays exactly as pretrained, the head's BatchNorm folds into a plain
linear classifier with the same outputs, and the saved folder loads in plain transformers."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from conftest import load_recipe
from safetensors.torch import load_file

from hf_medvis.models.linear_probe import ProbeHead, attach_linear_probe, fold_linear_probe


def test_folding_keeps_the_outputs():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=3)  # fmt: skip
    model = attach_linear_probe(ViTForImageClassification(config))
    assert isinstance(model.classifier, ProbeHead)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]
    model.train()
    for _ in range(5):  # running statistics away from (0, 1)
        model(pixel_values=torch.randn(8, 3, 32, 32) * 2 + 1)
    model.eval()
    images = torch.randn(4, 3, 32, 32)
    before = model(pixel_values=images).logits
    fold_linear_probe(model)
    assert type(model.classifier) is torch.nn.Linear
    torch.testing.assert_close(model(pixel_values=images).logits, before, atol=1e-5, rtol=1e-5)


def test_linear_probe_run_leaves_every_encoder_weight_unchanged(phantom_dir, tmp_path, tiny_mae_dir):
    from transformers import AutoModelForImageClassification

    mae = tiny_mae_dir
    out = tmp_path / "probe"
    args = f"--config recipes/configs/vit_linear_probe.yaml --model_name_or_path {mae} --train_data {phantom_dir / 'images'} "
    args += f"--output_dir {out} --max_steps 6 --per_device_train_batch_size 16 --eval_steps 3 --save_steps 3 "
    args += "--ci_bootstrap_samples 20 --eval_subsample 8"
    log = io.StringIO()
    with redirect_stdout(log):
        metrics = load_recipe("finetune_vit").main(args.split())
    assert "learning rate 0.00625 = base_learning_rate 0.1 x global batch 16 / 256" in log.getvalue()
    # setup_run logs the change it made (5e-05: TrainingArguments' default, as given).
    assert "run setup changed: learning_rate 5e-05 -> 0.00625" in log.getvalue()
    pretrained = load_file(mae / "model.safetensors")
    probed = load_file(out / "model.safetensors")
    encoder = [k for k in probed if not k.startswith("classifier.")]
    assert len(encoder) == len([k for k in pretrained if k.startswith("vit.")])
    for key in encoder:  # the MAE encoder's weights, bit for bit
        torch.testing.assert_close(probed[key], pretrained[key], rtol=0, atol=0, msg=key)
    assert sorted(k for k in probed if k.startswith("classifier.")) == ["classifier.bias", "classifier.weight"]
    # The saved classifier is a plain ViT with a linear head: transformers loads it without warnings or extra keys.
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model.classifier) is torch.nn.Linear and "eval_auroc_macro" in metrics
    assert json.loads((out / "config.json").read_text())["model_type"] == "vit"


@pytest.mark.parametrize("flag", ["--linear_probe true"])
def test_linear_probe_flag_parses(flag):
    from hf_medvis.models.arguments import ClassifierModelArguments

    assert ClassifierModelArguments(linear_probe=True).linear_probe
