"""Model shapes without weights: a preset name or a config file/folder → a transformers config → a model on the meta
device (no memory, no compute), for counting parameters, activations and FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining

from ..core.presets import load_presets, preset_fields, preset_names
from ..core.tasks import MAE, check_task


def build_config(model: str, task: str, image_size: int | None = None, num_labels: int = 14) -> PretrainedConfig:
    """ViTMAEConfig for task "mae", ViTConfig for "classification", from a preset name or CONFIG_OR_DIR (config.json)."""
    check_task(task)
    presets = load_presets()
    if model in presets:
        fields: dict[str, Any] = preset_fields(model, task)  # a classifier without the MAE decoder
    else:
        path = Path(model)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"--model '{model}' is neither a preset ({', '.join(preset_names())}) nor a config file or folder"
            )
        fields = PretrainedConfig.get_config_dict(str(file))[0]
        fields.pop("model_type", None)
        fields.pop("architectures", None)
    if image_size is not None:
        fields["image_size"] = image_size
    if task == MAE:
        return ViTMAEConfig(**fields)
    fields.setdefault("num_labels", num_labels)
    if "id2label" in fields:  # a fine-tuned config carries its labels; num_labels follows them
        fields.pop("num_labels")
    return ViTConfig(**fields)


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The training model for ``config`` with parameters on the meta device."""
    cls = ViTMAEForPreTraining if isinstance(config, ViTMAEConfig) else ViTForImageClassification
    with torch.device("meta"):
        model = cls(config)
    return model.to(dtype)


def example_input(
    config: PretrainedConfig, batch_size: int, dtype: torch.dtype, device: str | torch.device = "meta"
) -> torch.Tensor:
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return torch.empty(batch_size, config.num_channels, size, size, device=device, dtype=dtype)


def training_loss(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A scalar whose backward costs what training costs: the MAE loss, or the classifier logits summed (the loss
    function itself is negligible)."""
    out = model(pixel_values=pixel_values)
    loss = getattr(out, "loss", None)
    return loss if loss is not None else out.logits.float().sum()
