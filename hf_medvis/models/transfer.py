"""``ViTForImageClassification`` from a fresh preset, a ViT checkpoint, or an MAE pretraining output.

ViTMAE and ViT share ``base_model_prefix = "vit"`` and their encoder parameter names, so the encoder of an MAE output
transfers key for key; the decoder is dropped and the classifier is new. The transfer is done on the state dict (rather
than ``from_pretrained(..., ignore_mismatched_sizes=True)``) so that position embeddings can be interpolated to a new
``--image_size`` and so that the log states exactly which keys were loaded, dropped, missing or re-initialised.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, PretrainedConfig, ViTConfig, ViTForImageClassification

from ..core.errors import first_line
from ..core.tasks import CLASSIFICATION
from ..core.text import short_list
from .build import ModelSetupError, apply_config_overrides, model_preset_fields
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
    source_type: str  # "new", "vit" or "vit_mae"
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


def interpolate_position_embeddings(position_embeddings: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + n, D] with n = ``num_patches`` (square grids); bicubic on the grid, CLS kept."""
    cls, grid = position_embeddings[:, :1], position_embeddings[:, 1:]
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


def _label_config(config: ViTConfig, spec: LabelSet) -> None:
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
    if config.model_type not in ("vit", "vit_mae", MODEL_TYPE):
        raise ModelSetupError(
            f"--model_name_or_path: {model_name_or_path} is a '{config.model_type}' model; a ViT or ViT-MAE is needed"
        )
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
    pooling: str = "cls",
    hidden_dropout_prob: float = 0.0,
    attention_probs_dropout_prob: float = 0.0,
    config_overrides: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> tuple[ViTForImageClassification, LoadReport]:
    """A classifier for ``spec``'s labels and the report of what was transferred."""
    cls = classifier_class(pooling)
    source = _source_config(model_name_or_path, trust_remote_code, cache_dir) if model_name_or_path else None
    config = build_vit_config(
        source,
        preset=preset,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        overrides=config_overrides,
    )
    config = pooled_config(config, pooling)
    config.hidden_dropout_prob = hidden_dropout_prob
    config.attention_probs_dropout_prob = attention_probs_dropout_prob
    _label_config(config, spec)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = cls(config)
    if source is None:
        return model, LoadReport(source=f"preset {preset}", source_type="new")

    # A mean-pooled classifier of ours is a ViT checkpoint like any other.
    report = LoadReport(
        source=model_name_or_path, source_type="vit" if source.model_type == MODEL_TYPE else source.model_type
    )
    # Load at the checkpoint's own image size first: from_pretrained then maps legacy parameter names (ViTMAE still uses
    # "encoder.layer.N.attention.attention.query"; transformers 5 ViT uses "layers.N.attention.q_proj"), adds the
    # "vit." prefix for bare encoders, and reports missing / unexpected / mismatched keys.
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
    mismatched = sorted(_key(entry) for entry in info.get("mismatched_keys", []))
    report.reinitialised = mismatched
    report.missing = sorted(k for k in info.get("missing_keys", []) if k not in mismatched)
    for key in sorted(info.get("unexpected_keys", [])):
        (report.dropped if key.startswith(("decoder.", "vit.pooler.", "pooler.")) else report.unexpected).append(key)
    report.loaded = sorted(k for k in loaded.state_dict() if k not in report.missing and k not in mismatched)
    if not any(k.startswith("vit.layers.") for k in report.loaded):
        raise ModelSetupError(f"--model_name_or_path: no encoder weight of {model_name_or_path} matches a ViT")
    if config.image_size == source.image_size:
        return loaded, report
    state = loaded.state_dict()
    key = "vit.embeddings.position_embeddings"
    old = state[key]
    state[key] = interpolate_position_embeddings(old, model.state_dict()[key].shape[1] - 1)
    model.load_state_dict(state)
    report.interpolated = (
        f"position embeddings interpolated from {old.shape[1] - 1} to {state[key].shape[1] - 1} "
        f"patches (image size {source.image_size} -> {config.image_size})"
    )
    return model, report


def _key(entry: Any) -> str:
    return entry[0] if isinstance(entry, (tuple, list)) else str(entry)


def load_classifier(model_dir: str, **kwargs: Any) -> ViTForImageClassification:
    """A fine-tuned classifier folder (as written by the recipe, or a checkpoint-N of it), with its pooling: a plain
    ``vit`` (CLS token), an ``hf_medvis_vit`` (mean of the patch tokens; loaded with our class, not the code saved
    beside it), or an older ``vit`` folder that records ``pooling: "mean"``."""
    config = _source_config(model_dir, kwargs.pop("trust_remote_code", False), kwargs.get("cache_dir"))
    if (
        config.model_type not in ("vit", MODEL_TYPE)
        or not getattr(config, "id2label", None)
        or config.architectures is None
        or not any("ImageClassification" in a for a in config.architectures)
    ):
        raise ModelSetupError(
            f"{model_dir} is not a fine-tuned ViT classifier (config.json has no classification head)"
        )
    pooling = "mean" if config.model_type == MODEL_TYPE else getattr(config, "pooling", "cls")
    if pooling == "mean" and config.model_type != MODEL_TYPE:  # an older folder: "vit" with pooling "mean"
        kwargs["config"] = pooled_config(config, pooling)
    cls = classifier_class(pooling)
    try:
        return cls.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ModelSetupError(f"cannot load weights from {model_dir}: {first_line(err)}") from None
