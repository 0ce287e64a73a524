"""Classifiers for our labels: a ViT from a fresh preset, a ViT checkpoint or an MAE pretraining output, or another
image backbone (DeiT, BEiT, Dinov2, Swin, ConvNeXt: ``backbones.BACKBONES``) from its checkpoint, with a new head.

ViTMAE and ViT share ``base_model_prefix = "vit"`` and their encoder parameter names, so the encoder of an MAE output
transfers key for key; the decoder is dropped and the classifier is new. Every checkpoint is loaded at its own image
size and then resized on the state dict (rather than ``from_pretrained(..., ignore_mismatched_sizes=True)`` at the new
size) so that position embeddings are interpolated to a new ``--image_size`` and so that the log states exactly which
keys were loaded, dropped, missing or re-initialised.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from ..core.errors import first_line
from ..core.tasks import CLASSIFICATION
from ..core.text import short_list
from .backbones import VIT, Backbone, backbone_of, set_pooling
from .build import ModelSetupError, apply_config_overrides, model_preset_fields
from .drop_path import add_drop_path
from .modeling_hf_medvis_vit import MODEL_TYPE, MeanPoolViTConfig, MeanPoolViTForImageClassification
from .weights import own_load_report

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
# Architecture fields that a ViT classifier takes from a ViT or ViTMAE config.
_ENCODER_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
    "image_size", "patch_size", "num_channels", "qkv_bias", "initializer_range",
)  # fmt: skip


def classifier_class(pooling: str) -> type[ViTForImageClassification]:
    """``pooling`` "cls": transformers' ``ViTForImageClassification`` (saved as a plain ``vit`` that loads anywhere);
    "mean": ``MeanPoolViTForImageClassification`` (saved as ``hf_medvis_vit`` with its code, see
    ``modeling_hf_medvis_vit``)."""
    if pooling not in POOLINGS:
        raise ModelSetupError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    return MeanPoolViTForImageClassification if pooling == "mean" else ViTForImageClassification


def pooled_config(config: ViTConfig, pooling: str) -> ViTConfig:
    """``config`` for ``pooling``'s classifier: a plain ``ViTConfig`` stays one for "cls"; "mean" makes it a
    ``MeanPoolViTConfig`` (model_type ``hf_medvis_vit``) with the same fields. config.json records the pooling."""
    if pooling == "mean" and not isinstance(config, MeanPoolViTConfig):
        fields = config.to_dict()
        fields.pop("model_type", None)
        config = MeanPoolViTConfig.from_dict(fields)
    config.pooling = pooling
    return config


@dataclass
class LoadReport:
    """What happened to each weight of the source checkpoint."""

    source: str
    source_type: str  # "new", or the checkpoint's model_type ("vit", "vit_mae", "deit", "swin", ...)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the classifier, not in the checkpoint: freshly initialised
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not used
    dropped: list[str] = field(default_factory=list)  # deliberately not transferred (MAE decoder, pooler)
    reinitialised: list[str] = field(default_factory=list)  # shape mismatch (e.g. a classifier for other labels)
    interpolated: str | None = None

    def summary(self) -> str:
        if self.source_type == "new":
            return "new model from a preset: every weight freshly initialised"
        parts = [
            f"{len(self.loaded)} loaded",
            f"{len(self.missing)} missing ({short_list(self.missing, 4)})",
            f"{len(self.unexpected)} unexpected ({short_list(self.unexpected, 4)})",
            f"{len(self.dropped)} dropped ({_prefixes(self.dropped)})",
        ]
        if self.reinitialised:
            parts.append(
                f"{len(self.reinitialised)} re-initialised for the new label set ({short_list(self.reinitialised, 4)})"
            )
        if self.interpolated:
            parts.append(self.interpolated)
        return f"weights from {self.source_type} checkpoint: " + "; ".join(parts)


def _prefixes(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] + ".*" for k in keys})) or "-"


def interpolate_position_embeddings(
    position_embeddings: torch.Tensor, num_patches: int, prefix_tokens: int = 1
) -> torch.Tensor:
    """[1, k + g*g, D] -> [1, k + n, D] with n = ``num_patches`` (square grids); bicubic on the grid, the k =
    ``prefix_tokens`` leading positions (CLS; DeiT's CLS and distillation tokens) kept."""
    cls, grid = position_embeddings[:, :prefix_tokens], position_embeddings[:, prefix_tokens:]
    old, new = round(grid.shape[1] ** 0.5), round(num_patches**0.5)
    if old * old != grid.shape[1] or new * new != num_patches:
        raise ModelSetupError("position embeddings can only be interpolated between square patch grids")
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(position_embeddings.dtype)
    return torch.cat([cls, grid], dim=1)


class LabelSet(Protocol):
    """What a classifier head needs of the labels (``hf_medvis.data.labels.LabelSpec`` is one)."""

    names: tuple[str, ...]
    problem_type: str  # "multi_label_classification" or "single_label_classification"


def _label_config(config: PretrainedConfig, spec: LabelSet) -> None:
    config.num_labels = len(spec.names)
    config.id2label = dict(enumerate(spec.names))
    config.label2id = {name: i for i, name in enumerate(spec.names)}
    config.problem_type = spec.problem_type


def load_config(
    model_name_or_path: str, *, trust_remote_code: bool = False, cache_dir: str | None = None
) -> PretrainedConfig:
    """``AutoConfig.from_pretrained``, except that our mean-pooled classifiers (model_type ``hf_medvis_vit``) load with
    our own config class, without running the code saved in their folder. Raises what AutoConfig raises."""
    config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path, cache_dir=cache_dir)
    if config_dict.get("model_type") == MODEL_TYPE:
        return MeanPoolViTConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)


def _source_config(model_name_or_path: str, trust_remote_code: bool, cache_dir: str | None) -> PretrainedConfig:
    local = Path(model_name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelSetupError(f"--model_name_or_path: {model_name_or_path} has no config.json (not a model folder)")
    try:
        config = load_config(model_name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ModelSetupError(
            f"--model_name_or_path: cannot load a config from {model_name_or_path}: {first_line(err)}"
        ) from None
    backbone_of(config, model_name_or_path)  # a one-line error for an architecture not supported
    return config


def build_vit_config(
    source: Any | None,
    *,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int | None = None,
    overrides: str | None = None,
) -> ViTConfig:
    """Encoder architecture from a source config (ViT or ViTMAE) or a preset; the image size may change."""
    if source is not None:
        spec = {name: getattr(source, name) for name in _ENCODER_FIELDS if hasattr(source, name)}
        if patch_size and patch_size != spec["patch_size"]:
            raise ModelSetupError(f"--patch_size {patch_size} differs from the checkpoint's {spec['patch_size']}")
        if num_channels and num_channels != spec["num_channels"]:
            raise ModelSetupError(f"--num_channels {num_channels} differs from the checkpoint's {spec['num_channels']}")
    else:
        spec = model_preset_fields(preset, CLASSIFICATION)
        spec["num_channels"] = num_channels or 3
        if patch_size:
            spec["patch_size"] = patch_size
    if image_size:
        spec["image_size"] = image_size
    config = ViTConfig(**spec)
    apply_config_overrides(config, overrides)
    if config.image_size % config.patch_size:
        raise ModelSetupError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    return config


def build_classifier(
    model_name_or_path: str | None,
    spec: LabelSet,
    *,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int | None = None,
    pooling: str | None = "cls",
    hidden_dropout_prob: float = 0.0,
    attention_probs_dropout_prob: float = 0.0,
    drop_path_rate: float = 0.0,
    config_overrides: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> tuple[PreTrainedModel, LoadReport]:
    """A classifier for ``spec``'s labels and the report of what was transferred. ``pooling`` None: the
    architecture's own (ViT: "cls"). ``drop_path_rate``: the architecture's own stochastic depth where its config has
    one (BEiT, Dinov2, Swin, ConvNeXt; set, also to 0, whatever the checkpoint had), ours on ViT and DeiT layers."""
    source = _source_config(model_name_or_path, trust_remote_code, cache_dir) if model_name_or_path else None
    backbone = VIT if source is None else backbone_of(source, str(model_name_or_path))
    if backbone is VIT:
        cls = classifier_class(pooling or "cls")
        config = build_vit_config(
            source,
            preset=preset,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            overrides=config_overrides,
        )
        config = pooled_config(config, pooling or "cls")
        config.hidden_dropout_prob = hidden_dropout_prob
        config.attention_probs_dropout_prob = attention_probs_dropout_prob
    else:
        cls = backbone.classifier_class()
        config = _backbone_config(
            source,
            backbone,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            pooling=pooling,
            dropouts={
                "hidden_dropout_prob": hidden_dropout_prob,
                "attention_probs_dropout_prob": attention_probs_dropout_prob,
            },
            overrides=config_overrides,
        )
    if backbone.own_drop_path:
        config.drop_path_rate = drop_path_rate
    _label_config(config, spec)
    # ConvNeXt has no attention: the default "sdpa" (ModelArguments) would be refused by transformers
    if attn_implementation and (cls._supports_sdpa or attn_implementation != "sdpa"):
        config._attn_implementation = attn_implementation
    if source is None:
        model, report = cls(config), LoadReport(source=f"preset {preset}", source_type="new")
    else:
        model, report = _transfer(cls, config, source, str(model_name_or_path), trust_remote_code, cache_dir)
    if drop_path_rate and not backbone.own_drop_path:
        add_drop_path(model, drop_path_rate)
    return model, report


def _backbone_config(
    source: PretrainedConfig,
    backbone: Backbone,
    *,
    image_size: int | None,
    patch_size: int | None,
    num_channels: int | None,
    pooling: str | None,
    dropouts: dict[str, float],
    overrides: str | None,
) -> PretrainedConfig:
    """A copy of a DeiT / BEiT / Dinov2 / Swin / ConvNeXt checkpoint's config with this run's choices."""
    config = copy.deepcopy(source)
    source_patch = getattr(source, "patch_size", None)
    if patch_size and patch_size != source_patch:
        raise ModelSetupError(f"--patch_size {patch_size} differs from the {backbone.name} checkpoint's {source_patch}")
    if num_channels and num_channels != source.num_channels:
        raise ModelSetupError(f"--num_channels {num_channels} differs from the checkpoint's {source.num_channels}")
    set_pooling(config, backbone, pooling)
    for name, value in dropouts.items():
        if hasattr(config, name):
            setattr(config, name, value)
        elif value:
            raise ModelSetupError(f"--{name}: {backbone.name} has no such dropout")
    if image_size:
        config.image_size = image_size
    apply_config_overrides(config, overrides)
    return config


def _transfer(
    cls: type[PreTrainedModel],
    config: PretrainedConfig,
    source: PretrainedConfig,
    model_name_or_path: str,
    trust_remote_code: bool,
    cache_dir: str | None,
) -> tuple[PreTrainedModel, LoadReport]:
    """``cls`` with ``config``, its weights from the checkpoint: loaded at the checkpoint's own image size, then resized."""
    # A mean-pooled classifier of ours is a ViT checkpoint like any other.
    report = LoadReport(
        source=model_name_or_path, source_type="vit" if source.model_type == MODEL_TYPE else source.model_type
    )
    # Load at the checkpoint's own image size first: from_pretrained then maps legacy parameter names (ViTMAE still uses
    # "encoder.layer.N.attention.attention.query"; transformers 5 ViT uses "layers.N.attention.q_proj"), adds the
    # base-model prefix ("vit.") for bare encoders, and reports missing / unexpected / mismatched keys.
    at_source_size = copy.deepcopy(config)
    at_source_size.image_size = source.image_size
    try:
        with own_load_report():  # LoadReport below says what was loaded, dropped and re-initialised
            loaded, info = cls.from_pretrained(
                model_name_or_path,
                config=at_source_size,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                use_safetensors=True,
                cache_dir=cache_dir,
                trust_remote_code=trust_remote_code,
            )
    except OSError as err:
        raise ModelSetupError(
            f"--model_name_or_path: cannot load weights from {model_name_or_path} (safetensors only): {first_line(err)}"
        ) from None
    prefix = cls.base_model_prefix
    mismatched = sorted(_key(entry) for entry in info.get("mismatched_keys", []))
    report.reinitialised = mismatched
    report.missing = sorted(k for k in info.get("missing_keys", []) if k not in mismatched)
    # Deliberately left: an MAE decoder, a pooler the new head does not use, a distilled DeiT's two heads.
    not_transferred = ("decoder.", f"{prefix}.pooler.", "pooler.", "cls_classifier.", "distillation_classifier.")
    for key in sorted(info.get("unexpected_keys", [])):
        (report.dropped if key.startswith(not_transferred) else report.unexpected).append(key)
    report.loaded = sorted(k for k in loaded.state_dict() if k not in report.missing and k not in mismatched)
    block = re.compile(rf"{prefix}\.(?:.*\.)?(?:layers?|stages)\.\d+\.")
    if not any(block.match(k) for k in report.loaded):
        raise ModelSetupError(
            f"--model_name_or_path: no encoder weight of {model_name_or_path} matches a {cls.__name__}"
        )
    if config.image_size == source.image_size:
        return loaded, report
    return _resized(cls(config), loaded, source, report), report


def _resized(model: PreTrainedModel, loaded: PreTrainedModel, source: PretrainedConfig, report: LoadReport) -> Any:
    """``loaded``'s weights in ``model`` (the same class at another image size): position embeddings interpolated;
    any other weight whose shape depends on the image size (e.g. BEiT's relative position bias) is a one-line error."""
    state, wanted = loaded.state_dict(), model.state_dict()
    size = model.config.image_size
    for key, tensor in state.items():
        if tensor.shape == wanted[key].shape:
            continue
        if not key.endswith("position_embeddings") or tensor.ndim != 3:
            raise ModelSetupError(
                f"--image_size {size}: {key} of the checkpoint is sized for its image size {source.image_size} and is "
                f"not resized here; train at {source.image_size}"
            )
        old_patches = (source.image_size // source.patch_size) ** 2
        prefix_tokens = tensor.shape[1] - old_patches
        state[key] = interpolate_position_embeddings(tensor, wanted[key].shape[1] - prefix_tokens, prefix_tokens)
        report.interpolated = (
            f"position embeddings interpolated from {old_patches} to {wanted[key].shape[1] - prefix_tokens} "
            f"patches (image size {source.image_size} -> {size})"
        )
    model.load_state_dict(state)
    return model


def _key(entry: Any) -> str:
    return entry[0] if isinstance(entry, (tuple, list)) else str(entry)


def load_classifier(model_dir: str, **kwargs: Any) -> PreTrainedModel:
    """A fine-tuned classifier folder (as written by the recipe, or a checkpoint-N of it). A ViT with its pooling: a
    plain ``vit`` (CLS token), an ``hf_medvis_vit`` (mean of the patch tokens; loaded with our class, not the code saved
    beside it), or an older ``vit`` folder that records ``pooling: "mean"``. Any other supported backbone (DeiT, BEiT,
    Dinov2, Swin, ConvNeXt) with ``AutoModelForImageClassification``, as its config.json names it."""
    config = _source_config(model_dir, kwargs.pop("trust_remote_code", False), kwargs.get("cache_dir"))
    if (
        not getattr(config, "id2label", None)
        or config.architectures is None
        or not any("ImageClassification" in a for a in config.architectures)
    ):
        raise ModelSetupError(
            f"{model_dir} is not a fine-tuned ViT classifier (nor another supported image backbone's): config.json has "
            "no classification head"
        )
    if backbone_of(config, model_dir) is not VIT:
        cls: Any = AutoModelForImageClassification
    else:
        pooling = "mean" if config.model_type == MODEL_TYPE else getattr(config, "pooling", "cls")
        if pooling == "mean" and config.model_type != MODEL_TYPE:  # an older folder: "vit" with pooling "mean"
            kwargs["config"] = pooled_config(config, pooling)
        cls = classifier_class(pooling)
    try:
        return cls.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ModelSetupError(f"cannot load weights from {model_dir}: {first_line(err)}") from None
