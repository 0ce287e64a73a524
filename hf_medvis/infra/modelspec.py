"""Model shapes without weights: a preset name or a config file/folder → a transformers config → a model on the meta
device (no memory, no compute), for counting parameters, activations and FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from ..core.presets import load_presets, preset_fields, preset_names
from ..core.tasks import MAE, check_task

# Config folders of these types are sized as transformers' ViT / ViT-MAE (ours with mean pooling has the same shapes);
# any other image-classification type through its own Auto class.
VIT_MODEL_TYPES = ("vit", "vit_mae", "hf_medvis_vit")


def build_config(model: str, task: str, image_size: int | None = None, num_labels: int = 14) -> PretrainedConfig:
    """ViTMAEConfig for task "mae", ViTConfig for "classification", from a preset name or CONFIG_OR_DIR (config.json);
    a config of another image-classification architecture (DeiT, Swin, ConvNeXt, ...) as its own config class."""
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
        model_type = fields.pop("model_type", None) or "vit"
        if model_type not in VIT_MODEL_TYPES:
            return _other_config(model_type, fields, task, image_size, num_labels, model)
        fields.pop("architectures", None)
    if image_size is not None:
        fields["image_size"] = image_size
    if task == MAE:
        return ViTMAEConfig(**fields)
    _label_fields(fields, num_labels)
    return ViTConfig(**fields)


def _label_fields(fields: dict[str, Any], num_labels: int) -> None:
    fields.setdefault("num_labels", num_labels)
    if "id2label" in fields:  # a fine-tuned config carries its labels; num_labels follows them
        fields.pop("num_labels")


def _other_config(
    model_type: str, fields: dict[str, Any], task: str, image_size: int | None, num_labels: int, model: str
) -> PretrainedConfig:
    """A classifier config of another architecture (DeiT, Swin, ConvNeXt, ...), as transformers' Auto classes know it."""
    if task == MAE:
        raise ValueError(f"--model {model} is a '{model_type}' model: MAE pretraining sizes ViT-MAE shapes only")
    if image_size is not None:
        fields["image_size"] = image_size
    _label_fields(fields, num_labels)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ValueError:
        raise ValueError(f"--model {model}: transformers does not know the model type '{model_type}'") from None
    if type(config) not in AutoModelForImageClassification._model_mapping:
        raise ValueError(f"--model {model} is a '{model_type}' model, not an image classifier transformers can build")
    classes = AutoModelForImageClassification._model_mapping[type(config)]
    if isinstance(classes, (list, tuple)) and not config.architectures:
        # Several classifier classes (DeiT: with or without its distillation head) and no saved choice: the first,
        # the plain one, as fine-tuning builds it.
        config.architectures = [classes[0].__name__]
    return config


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The training model for ``config`` with parameters on the meta device."""
    with torch.device("meta"):
        if isinstance(config, ViTMAEConfig):
            model = ViTMAEForPreTraining(config)
        elif isinstance(config, ViTConfig):
            model = ViTForImageClassification(config)
        else:
            model = AutoModelForImageClassification.from_config(config)
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
