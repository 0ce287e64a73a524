"""--drop_path_rate: stochastic depth on transformers' ViT layers. A layer at rate 1 is skipped in training (equal to
a forward pass without it), rates rise linearly, evaluation is untouched, and the saved model is a plain ViT that
transformers reloads and that scores the same."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from hf_medvis.data.labels import LabelSpec
from hf_medvis.models import ClassifierModelArguments, add_drop_path, build_model
from hf_medvis.models.build import ModelSetupError
from hf_medvis.models.drop_path import encoder_layers


def _tiny_vit(layers: int = 2) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    return ViTForImageClassification(config)


def test_a_layer_at_rate_one_is_skipped_in_training():
    model = _tiny_vit(layers=2)
    assert add_drop_path(model, 0.999999) == pytest.approx([0.0, 0.999999])
    pixels = torch.randn(4, 3, 32, 32)
    model.train()
    # StochasticDepth keeps a branch with probability 1 - rate: at ~1 no sample keeps layer 1's branches.
    torch.manual_seed(1)
    logits = model(pixel_values=pixels).logits
    with torch.no_grad():
        hidden = model.vit.embeddings(pixels)
        hidden = encoder_layers(model)[0](hidden)  # layer 1: identity (both residual branches dropped)
        expected = model.classifier(model.vit.layernorm(hidden)[:, 0])
    torch.testing.assert_close(logits, expected)


def test_evaluation_is_untouched_and_the_saved_model_is_a_plain_vit(tmp_path):
    model = _tiny_vit(layers=3)
    reference = _tiny_vit(layers=3)  # same seed: same weights, no drop-path
    rates = add_drop_path(model, 0.2)
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    pixels = torch.randn(8, 3, 32, 32)
    model.train()
    torch.manual_seed(2)
    first = model(pixel_values=pixels).logits
    second = model(pixel_values=pixels).logits
    assert not torch.allclose(first, second)  # per-sample drops differ between steps
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference.eval()(pixel_values=pixels).logits)
    model.save_pretrained(tmp_path / "saved")
    assert set(model.state_dict()) == set(reference.state_dict())  # drop-path adds no weights
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is ViTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    add_drop_path(model, 0.0)  # removed again
    assert all(isinstance(layer.dropout, torch.nn.Dropout) for layer in encoder_layers(model))


def test_the_recipe_flag_reaches_the_model_and_is_checked():
    spec = LabelSpec(("A", "B"), "multi_label_classification")
    args = ClassifierModelArguments(model_preset="tiny", image_size=32, patch_size=8, drop_path_rate=0.1)
    model = build_model(args, task="classification", labels=spec).model
    depths = [layer.dropout[1].p for layer in encoder_layers(model)]
    assert depths == pytest.approx(torch.linspace(0, 0.1, len(depths)).tolist()) and depths[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"--drop_path_rate must be in \[0, 1\)"):
        ClassifierModelArguments(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="--drop_path_rate with --linear_probe"):
        ClassifierModelArguments(drop_path_rate=0.1, linear_probe=True)
    with pytest.raises(ModelSetupError, match="no ViT encoder layers"):
        add_drop_path(torch.nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]
