"""hf-medvis size: model states against DeepSpeed's own estimators, measured activations, SKU fit and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

from hf_medvis.cli import main
from hf_medvis.core.param_count import parameter_counts
from hf_medvis.infra.modelspec import build_config, build_meta_model
from hf_medvis.infra.sizing import estimate_size, measure_activation_bytes, model_states_bytes

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
)


def _deepspeed_table(fn, *args, **kwargs) -> dict[str, float]:
    """Per-GPU GB column of a DeepSpeed *_all_cold printout, keyed by its options text."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn(*args, **kwargs)
    rows = {}
    for line in buffer.getvalue().splitlines():
        match = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if match:
            options = match.group(3).replace("OffloadDeviceEnum.", "")  # some versions print the enum's repr
            rows[" ".join(options.split())] = float(match.group(2))
    return rows


@pytest.fixture(scope="module")
def vit_base_mae():
    counts = parameter_counts(build_meta_model(build_config("vit-base", "mae")))
    assert 111e6 < counts["total"] < 113e6  # ViTMAE-B/16 with the 512x8 decoder
    return counts


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_match_deepspeed_estimators(vit_base_mae, gpus_per_node, nodes):
    p, big = vit_base_mae["total"], vit_base_mae["largest_layer"]
    n = gpus_per_node * nodes
    z2 = _deepspeed_table(
        estimate_zero2_model_states_mem_needs_all_cold, p, num_gpus_per_node=gpus_per_node, num_nodes=nodes
    )
    assert round(model_states_bytes(p, big, 2, "bf16", n) / 2**30, 2) == z2["offload_optimizer=none"]
    assert round(model_states_bytes(p, big, 2, "bf16", n, offload=True) / 2**30, 2) == z2["offload_optimizer=cpu"]
    z3 = _deepspeed_table(
        estimate_zero3_model_states_mem_needs_all_cold, p, big, num_gpus_per_node=gpus_per_node, num_nodes=nodes
    )
    assert (
        round(model_states_bytes(p, big, 3, "bf16", n) / 2**30, 2)
        == z3["offload_param=none, offload_optimizer=none, zero_init=1"]
    )
    assert (
        round(model_states_bytes(p, big, 3, "bf16", n, offload=True) / 2**30, 2)
        == z3["offload_param=none, offload_optimizer=cpu, zero_init=1"]
    )
    assert model_states_bytes(p, big, 0, "bf16", n) == 16 * p  # plain DDP/AMP: fp32 weights, grads, Adam on every GPU


def test_parameter_counts_match_deepspeed_on_a_real_model():
    config = build_config("vit-base", "classification", image_size=32)
    config.update(TINY)
    from transformers import ViTForImageClassification

    real = ViTForImageClassification(config)
    total, largest = model_to_params(real)
    ours = parameter_counts(build_meta_model(config))
    assert (ours["total"], ours["largest_layer"]) == (total, largest)


def test_meta_activation_measurement_equals_a_real_cpu_pass_and_scales_linearly():
    config = build_config("vit-base", "mae", image_size=32)
    config.update({**TINY, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1, "decoder_intermediate_size": 64})
    # Eager attention on both sides: on a real CPU pass SDPA picks a flash kernel that saves less than the meta pass
    # (which materializes attention probabilities: the documented upper bound).
    config._attn_implementation = "eager"
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    real = ViTMAEForPreTraining(config)
    param_storages = {p.untyped_storage().data_ptr() for p in real.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storages:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(pixel_values=torch.randn(3, 3, 32, 32))
    assert measure_activation_bytes(config, 3, "fp32") == sum(saved.values())
    one, two, four = (measure_activation_bytes(config, b, "bf16") for b in (1, 2, 4))
    assert four - two == 2 * (two - one)
    assert measure_activation_bytes(config, 2, "fp32") > two  # half-precision activations take less


def test_estimate_fits_skus_and_largest_batch_is_consistent():
    config = build_config("vit-base", "mae")
    est = estimate_size(config, "vit-base", "mae", batch_size=64, precision="bf16", zero=2, gpus_per_node=8, nodes=1)
    assert est.total_bytes == est.model_states_bytes + est.activations_bytes + est.margin_bytes
    by_name = {s.name: s for s in est.skus}
    h200 = by_name["Standard_ND96isr_H200_v5"]
    assert h200.fits and h200.max_batch_size > 64
    assert h200.headroom_bytes == int(143771 * 2**20) - est.total_bytes
    # The largest batch fits and one more does not.
    for batch, expect in ((h200.max_batch_size, True), (h200.max_batch_size + 1, False)):
        bigger = estimate_size(config, "vit-base", "mae", batch_size=batch, precision="bf16", zero=2, gpus_per_node=8)
        assert {s.name: s for s in bigger.skus}["Standard_ND96isr_H200_v5"].fits is expect
    assert "Standard_ND96asr_v4" in est.recommendation  # the 40 GB A100 node is the smallest fitting 8-GPU SKU


def test_cli_json_from_a_config_folder(tmp_path, capsys):
    config = build_config("vit-base", "classification", image_size=64)
    config.update({**TINY, "image_size": 64})
    config.save_pretrained(tmp_path)
    assert main(["size", "--model", str(tmp_path), "--task", "classification", "--image-size", "64", "--batch-size", "8",
                 "--zero", "3", "--gpus-per-node", "2", "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] > 0
    assert set(data["per_gpu"]) >= {"model_states_bytes", "activations_bytes", "total_bytes"}
    assert data["per_gpu"]["total_bytes"] == data["total_bytes"]
    assert all({"name", "fits", "headroom_bytes", "max_batch_size"} <= set(s) for s in data["skus"])
    assert data["recommendation"] and data["activations_method"].startswith("measured")
    assert main(["size", "--model", str(tmp_path / "missing"), "--task", "mae"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["size", "--zero", "0", "--offload"]) == 2


def test_the_old_classify_spelling_still_works_with_one_warning(tmp_path, capsys, caplog):
    config = build_config("vit-base", "classification", image_size=32)
    config.update(TINY)
    config.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="hf_medvis.core.tasks"):
        assert main(["size", "--model", str(tmp_path), "--task", "classify", "--image-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "classification"
    assert [r.getMessage() for r in caplog.records] == ["task 'classify' is deprecated: use 'classification'"]
    with pytest.raises(ValueError, match="unknown task 'classify'"):
        build_config("vit-base", "classify")  # the library takes the one spelling; only the command line translates


@pytest.mark.parametrize("model_type", ["convnext", "swin", "deit"])
def test_other_classifier_architectures_are_sized_as_transformers_builds_them(tmp_path, capsys, model_type):
    """A config folder of another backbone (what finetune_vit.py fine-tunes) is sized as that architecture: its
    parameter count is the real model's, and its activations are measured like a ViT's."""
    import transformers
    from transformers import AutoConfig

    small = {
        "convnext": dict(depths=[1, 1], hidden_sizes=[16, 32], num_stages=2),
        "swin": dict(depths=[1, 1], num_heads=[2, 4], embed_dim=16, window_size=4, patch_size=4),
        "deit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8),
    }[model_type]
    AutoConfig.for_model(model_type, image_size=64, **small).save_pretrained(tmp_path)
    argv = ["size", "--model", str(tmp_path), "--task", "classification", "--image-size", "64", "--num-labels", "3"]
    assert main([*argv, "--batch-size", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    classifier = {"convnext": "ConvNextForImageClassification", "swin": "SwinForImageClassification"}
    real = getattr(transformers, classifier.get(model_type, "DeiTForImageClassification"))(
        AutoConfig.for_model(model_type, image_size=64, num_labels=3, **small)
    )
    assert data["parameters"] == sum(p.numel() for p in real.parameters())
    assert data["model"].endswith(f"({model_type})") and data["per_gpu"]["activations_bytes"] > 0
    assert main(["size", "--model", str(tmp_path), "--task", "mae"]) == 2
    assert f"is a '{model_type}' model: MAE pretraining sizes ViT-MAE shapes only" in capsys.readouterr().err
