"""hf-medvis import-weights: MAE, timm and DINOv2 checkpoints converted exactly, against timm and transformers as
references; strict about keys and shapes; atomic about the output folder."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from hf_medvis.cli import main
from hf_medvis.models.import_weights import ImportOptions, import_weights
from hf_medvis.models.transfer import build_classifier

timm_vit = pytest.importorskip("timm.models.vision_transformer")

IMAGE, PATCH = 32, 8
NUM_TOKENS = 1 + (IMAGE // PATCH) ** 2


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer moved off its init (zero biases, ones of norms, sin-cos tables) so that a tensor that
    is not carried over cannot pass unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()


def _timm_model(embed_dim=64, num_heads=2, **kwargs):
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=embed_dim, depth=2, num_heads=num_heads, mlp_ratio=2, **kwargs
    )
    return _jitter(model, 1)


def _pixels(batch=2):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


# -------------------------------------------------------------------- exporters: transformers -> the public layouts


def _fused_blocks(state, src, dst, num_layers, names):
    """transformers' per-layer q/k/v -> fused qkv, other names per ``names`` (ours -> theirs)."""
    out = {}
    for n in range(num_layers):
        s, d = f"{src}.{n}", f"{dst}.{n}"
        for suffix in ("weight", "bias"):
            out[f"{d}.attn.qkv.{suffix}"] = torch.cat([state[f"{s}.attention.{p}_proj.{suffix}"] for p in "qkv"])
        for ours, theirs in names.items():
            for key in [k for k in state if k.startswith(f"{s}.{ours}")]:
                out[f"{d}.{theirs}{key[len(f'{s}.{ours}') :]}"] = state[key]
    return out


VIT_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _export_mae(model: ViTMAEForPreTraining) -> dict:
    """A ViTMAEForPreTraining in facebookresearch/mae's names (models_mae.MaskedAutoencoderViT)."""
    state, config = model.state_dict(), model.config
    out = {
        "cls_token": state["vit.embeddings.cls_token"],
        "pos_embed": state["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["vit.layernorm.weight"],
        "norm.bias": state["vit.layernorm.bias"],
        "mask_token": state["decoder.mask_token"],
        "decoder_pos_embed": state["decoder.decoder_pos_embed"],
    }
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        out[f"{name}.weight"], out[f"{name}.bias"] = state[f"decoder.{name}.weight"], state[f"decoder.{name}.bias"]
    out |= _fused_blocks(state, "vit.layers", "blocks", config.num_hidden_layers, VIT_BLOCK_NAMES)
    out |= _fused_blocks(
        state, "decoder.decoder_layers", "decoder_blocks", config.decoder_num_hidden_layers, VIT_BLOCK_NAMES
    )
    return {k: v.clone() for k, v in out.items()}


def _export_dinov2(model) -> dict:
    """A Dinov2Model in facebookresearch/dinov2's names (hub checkpoints, block_chunks=0)."""
    state = model.state_dict()
    out = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "mask_token": state["embeddings.mask_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    if "embeddings.register_tokens" in state:
        out["register_tokens"] = state["embeddings.register_tokens"]
    names = {
        "norm1": "norm1",
        "attention.o_proj": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    out |= _fused_blocks(state, "encoder.layer", "blocks", model.config.num_hidden_layers, names)
    for n in range(model.config.num_hidden_layers):  # SwiGLU (ViT-g): gate and up fused into w12, down is w3
        mlp = f"encoder.layer.{n}.mlp"
        for suffix in ("weight", "bias") if f"{mlp}.gate_proj.weight" in state else ():
            out[f"blocks.{n}.mlp.w12.{suffix}"] = torch.cat([state[f"{mlp}.{p}_proj.{suffix}"] for p in ("gate", "up")])
            out[f"blocks.{n}.mlp.w3.{suffix}"] = state[f"{mlp}.down_proj.{suffix}"]
    return {k: v.clone() for k, v in out.items()}


def _hf_mae(hidden=192, heads=6, decoder_hidden=64, decoder_heads=16, **kwargs):
    torch.manual_seed(2)
    config = ViTMAEConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        decoder_hidden_size=decoder_hidden,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=decoder_heads,
        decoder_intermediate_size=2 * decoder_hidden,
        layer_norm_eps=1e-6,
        **kwargs,
    )
    return _jitter(ViTMAEForPreTraining(config), 3)


def _mae_checkpoint(path, timm_model, model_name="mae_vit_small_patch8"):
    """timm's encoder + an MAE decoder of matching size, saved as facebookresearch/mae does (pickled args)."""
    decoder = {k: v for k, v in _export_mae(_hf_mae()).items() if k.startswith(("decoder_", "mask_token"))}
    state = timm_model.state_dict() | decoder
    args = argparse.Namespace(model=model_name, mask_ratio=0.6, norm_pix_loss=True, input_size=IMAGE, lr=1e-3)
    torch.save({"model": state, "args": args, "epoch": 399}, path)
    return state


def _identity_noise(batch):
    # ViTMAE keeps the tokens of the smallest noise first: ascending noise keeps every token in order.
    return torch.arange(NUM_TOKENS - 1, dtype=torch.float32).expand(batch, -1)


# -------------------------------------------------------------------------------------------------------- the tests


def test_mae_checkpoint_with_pickled_args_matches_timm(tmp_path):
    reference = _timm_model(embed_dim=192, num_heads=6, num_classes=0)
    src = tmp_path / "checkpoint-399.pth"
    _mae_checkpoint(src, reference)

    with pytest.raises(ValueError, match="--trust-pickle") as refused:
        import_weights(src, tmp_path / "refused")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "refused").exists()

    report = import_weights(src, tmp_path / "out", ImportOptions(trust_pickle=True))
    assert (report.layout, report.architecture, report.num_attention_heads) == ("mae", "ViTMAEForPreTraining", 6)
    model = ViTMAEForPreTraining.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.mask_ratio, config.norm_pix_loss, config.image_size, config.patch_size) == (0.6, True, IMAGE, PATCH)
    assert (config.decoder_num_attention_heads, config.layer_norm_eps) == (16, 1e-6)

    x = _pixels()
    model.config.mask_ratio = 0.0
    with torch.no_grad():
        ours = model.vit(x, noise=_identity_noise(len(x))).last_hidden_state
        theirs = reference.forward_features(x)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["crop_size"]["height"] == IMAGE


def test_mae_decoder_round_trip_is_exact(tmp_path):
    original = _hf_mae(mask_ratio=0.9, norm_pix_loss=True)
    src = tmp_path / "mae.pth"
    torch.save({"model": _export_mae(original)}, src)  # a raw state dict under "model", no args: loads weights-only

    report = import_weights(src, tmp_path / "out", ImportOptions(num_attention_heads=6, decoder_num_attention_heads=16))
    assert report.keys_imported == len(_export_mae(original))
    # mask_ratio and norm_pix_loss were not saved: transformers' defaults, and the report says so
    assert any("mask_ratio not saved" in note for note in report.notes)
    imported = ViTMAEForPreTraining.from_pretrained(tmp_path / "out")
    expected, found = original.state_dict(), imported.state_dict()
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)  # position embeddings included

    # With the MAE args saved, the config fields come from them.
    args = argparse.Namespace(model="mae_vit_small_patch8", mask_ratio=0.9, norm_pix_loss=True)
    torch.save({"model": _export_mae(original), "args": args}, src)
    import_weights(src, tmp_path / "with-args", ImportOptions(trust_pickle=True))
    config = ViTMAEForPreTraining.from_pretrained(tmp_path / "with-args").config
    for name in ("mask_ratio", "norm_pix_loss", "image_size", "patch_size", "num_attention_heads", "hidden_size"):
        assert getattr(config, name) == getattr(original.config, name), name
    assert config.decoder_num_attention_heads == original.config.decoder_num_attention_heads


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (0, True)])
def test_dinov2_round_trip_is_exact(tmp_path, registers, swiglu):
    torch.manual_seed(4)
    fields = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4 if swiglu else 2,
        use_swiglu_ffn=swiglu,
    )
    if registers:
        original = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**fields, num_register_tokens=registers))
    else:
        original = Dinov2Model(Dinov2Config(**fields))
    original = _jitter(original, 5)
    src = tmp_path / "teacher_checkpoint.pth"
    # a DINOv2 training checkpoint: the encoder under teacher/backbone., beside the DINO head
    wrapped = {f"backbone.{k}": v for k, v in _export_dinov2(original).items()}
    torch.save({"teacher": wrapped | {"dino_head.last_layer.weight": torch.zeros(8, 4)}}, src)

    report = import_weights(src, tmp_path / "out", ImportOptions(num_attention_heads=4))
    assert report.layout == "dinov2" and report.architecture == type(original).__name__
    assert any("dino_head" in note for note in report.notes)
    imported = type(original).from_pretrained(tmp_path / "out").eval()
    expected, found = original.state_dict(), imported.state_dict()
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    x = _pixels()
    with torch.no_grad():
        assert torch.equal(original(x).last_hidden_state, imported(x).last_hidden_state)


def test_timm_encoder_safetensors_loads_as_a_vit_classifier_base(tmp_path):
    reference = _timm_model(num_classes=0)
    src = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, src)

    with pytest.raises(ValueError, match="--num-attention-heads"):  # hidden size 64 is no standard ViT
        import_weights(src, tmp_path / "out")
    report = import_weights(src, tmp_path / "out", ImportOptions(num_attention_heads=2))
    assert (report.layout, report.architecture) == ("timm", "ViTModel")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "vit"

    x = _pixels()
    with torch.no_grad():
        theirs = reference.forward_features(x)
    classifier, info = ViTForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"] and not info["unexpected_keys"]
    with torch.no_grad():
        diff = (classifier.eval().vit(x).last_hidden_state - theirs).abs().max().item()
    assert diff < 1e-5

    # The fine-tune recipe's loader takes the folder as --model_name_or_path.
    labels = SimpleNamespace(names=("effusion", "nodule"), problem_type="multi_label_classification")
    model, load_report = build_classifier(str(tmp_path / "out"), labels)
    assert load_report.missing == ["classifier.bias", "classifier.weight"] and not load_report.unexpected
    with torch.no_grad():
        assert (model.eval().vit(x).last_hidden_state - theirs).abs().max().item() < 1e-5


def test_timm_heads_cls_token_exact_and_global_pool_left_out(tmp_path):
    x = _pixels()
    token_pooled = _timm_model(num_classes=3)
    torch.save(token_pooled.state_dict(), tmp_path / "cls.pth")
    report = import_weights(tmp_path / "cls.pth", tmp_path / "cls", ImportOptions(num_attention_heads=2))
    assert report.architecture == "ViTForImageClassification"
    with torch.no_grad():
        logits = ViTForImageClassification.from_pretrained(tmp_path / "cls").eval()(x).logits
        assert (logits - token_pooled(x)).abs().max().item() < 1e-5

    global_pooled = _timm_model(num_classes=3, global_pool="avg")  # fc_norm + head, no final norm
    assert "fc_norm.weight" in global_pooled.state_dict() and "norm.weight" not in global_pooled.state_dict()
    torch.save({"model": global_pooled.state_dict()}, tmp_path / "gap.pth")
    report = import_weights(tmp_path / "gap.pth", tmp_path / "gap", ImportOptions(num_attention_heads=2))
    assert report.architecture == "ViTModel"
    assert any("not exact" in note and "head.* left out" in note for note in report.notes)
    encoder = ViTModel.from_pretrained(tmp_path / "gap")
    assert torch.equal(encoder.layernorm.weight, global_pooled.fc_norm.weight)


def test_strict_keys_shapes_and_output_folder(tmp_path):
    state = _timm_model(num_classes=0).state_dict()
    options = ImportOptions(num_attention_heads=2)

    def attempt(tensors, out="out"):
        torch.save(tensors, tmp_path / "src.pth")
        with pytest.raises((ValueError, FileExistsError)) as failure:
            import_weights(tmp_path / "src.pth", tmp_path / out, options)
        message = str(failure.value)
        assert "\n" not in message
        return message

    assert "blocks.0.attn.surprise" in attempt(state | {"blocks.0.attn.surprise": torch.zeros(3)})
    message = attempt(state | {"blocks.1.mlp.fc2.bias": torch.zeros(5)})
    assert "blocks.1.mlp.fc2.bias" in message and "(5,)" in message and "(64,)" in message
    assert "blocks.1.norm2.weight" in attempt({k: v for k, v in state.items() if k != "blocks.1.norm2.weight"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]  # no output, no staging folder left behind

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    torch.save(state, tmp_path / "src.pth")
    assert "--overwrite" in attempt(state, out="taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    import_weights(tmp_path / "src.pth", tmp_path / "taken", ImportOptions(num_attention_heads=2, overwrite=True))
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth", "taken"]


def test_cli_end_to_end(tmp_path, capsys):
    reference = _timm_model(embed_dim=192, num_heads=6, num_classes=0)
    src = tmp_path / "medical_mae.pth"
    _mae_checkpoint(src, reference)
    out = tmp_path / "imported"

    assert main(["import-weights", str(src), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hf-medvis import-weights: error:") and "--trust-pickle" in error and "\n" not in error

    argv = ["import-weights", str(src), "--out", str(out), "--trust-pickle", "--image-mean", "0.5056"]
    assert main([*argv, "--image-std", "0.252"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("detected mae:")
    assert (
        printed[-1].startswith("imported mae -> ")
        and "ViTMAEForPreTraining, 2 layers, hidden 192, 6 heads" in (printed[-1])
    )
    assert "medical_mae NIH" in printed[-1]
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5056] * 3 and processor["image_std"] == [0.252] * 3
    assert ViTMAEForPreTraining.from_pretrained(out).config.mask_ratio == 0.6


def test_an_imported_mae_is_what_both_recipes_load(tmp_path):
    """``--model_name_or_path DIR`` in pretrain_mae.py continues from exactly the imported weights; in finetune_vit.py
    the encoder is transferred whole (only the new classifier is missing) and computes timm's features."""
    from hf_medvis.data.labels import LabelSpec
    from hf_medvis.models import ClassifierModelArguments, MAEModelArguments, build_model

    reference = _timm_model(embed_dim=192, num_heads=6, num_classes=0)
    _mae_checkpoint(tmp_path / "mae.pth", reference)
    import_weights(tmp_path / "mae.pth", tmp_path / "out", ImportOptions(trust_pickle=True))
    folder = str(tmp_path / "out")
    imported = ViTMAEForPreTraining.from_pretrained(folder).state_dict()

    pretraining = build_model(MAEModelArguments(model_name_or_path=folder), task="mae").model
    for key, tensor in pretraining.state_dict().items():
        assert torch.equal(tensor, imported[key]), key

    spec = LabelSpec(("Effusion", "Nodule"), "multi_label_classification")
    built = build_model(ClassifierModelArguments(model_name_or_path=folder), task="classification", labels=spec)
    assert built.load_report.missing == ["classifier.bias", "classifier.weight"] and not built.load_report.unexpected
    x = _pixels()
    with torch.no_grad():
        ours = built.model.eval().vit(x).last_hidden_state
        theirs = reference.forward_features(x)
    assert (ours - theirs).abs().max().item() < 1e-5
