"""Pretraining-specific arguments and outputs for the MAE recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import ViTMAEForPreTraining

from ..models.build import count_parameters, preset_names
from .args import DataArguments, RecipeTrainingArguments
from .model_card import render_model_card


@dataclass
class MAEModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this checkpoint (local folder or Hub id). Default: a new model."}
    )
    model_preset: str = field(
        default="tiny", metadata={"help": f"Architecture for a new model: one of {', '.join(preset_names())}."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the preset's)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (default: the preset's)."})
    num_channels: int = field(
        default=3,
        metadata={"help": "3 replicates grayscale to RGB so Hub checkpoints fit; 1 keeps X-rays single-channel."},
    )
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of patches masked (MAE: 0.75; X-ray MAE: 0.90)."})
    norm_pix_loss: bool = field(default=True, metadata={"help": "Reconstruct per-patch normalised pixels."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value config overrides, e.g. 'hidden_size=128'."}
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa (default) or eager."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the checkpoint's repository."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.num_channels not in (1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}")
        if self.model_name_or_path is None and self.model_preset not in preset_names():
            raise ValueError(f"--model_preset must be one of {', '.join(preset_names())}, got '{self.model_preset}'")


@dataclass
class MAEDataArguments(DataArguments):
    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0],
        metadata={"help": "RandomResizedCrop scale range (MAE: 0.2 1.0; X-ray MAE: 0.5 1.0)."},
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips during pretraining."})
    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Held-out images shown in reconstructions.png (0 to skip)."}
    )
    augment_on_device: bool = field(
        default=False,
        metadata={"help": "Crop and flip on the accelerator (one grid_sample per batch); loader workers only hand over "
                  "fixed-size uint8 images. For GPU hosts whose CPU workers cannot keep up."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop_scale needs two values 0 < min <= max <= 1, got {self.crop_scale}")


@dataclass
class PretrainingArguments(RecipeTrainingArguments):
    output_dir: str | None = field(default="outputs/pretrain_mae", metadata={"help": "Where outputs are written."})


def mae_model_card(
    model: ViTMAEForPreTraining,
    model_args: MAEModelArguments,
    data_args: MAEDataArguments,
    training_args: PretrainingArguments,
    *,
    data_description: str,
    data_info: dict,
    lr_line: str,
    metrics: dict,
) -> str:
    config = model.config
    architecture = {
        "encoder": f"ViT, {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads",
        "decoder": f"{config.decoder_num_hidden_layers} layer(s), hidden {config.decoder_hidden_size}",
        "patch size": config.patch_size,
        "image size": config.image_size,
        "channels": config.num_channels,
        "parameters": f"{count_parameters(model):,}",
    }
    training = {
        "objective": f"masked autoencoding, mask ratio {config.mask_ratio}, norm_pix_loss {config.norm_pix_loss}",
        "data": data_description,
        "images (train / held-out)": f"{data_info.get('train_images', '?')} / {data_info.get('eval_images', 0)}",
        "augmentation": f"RandomResizedCrop scale {tuple(data_args.crop_scale)}" + (", horizontal flip" if data_args.hflip else ""),
        "learning rate": lr_line,
        "optimizer": f"{_plain(training_args.optim)}, betas ({training_args.adam_beta1}, {training_args.adam_beta2}), "
        f"weight decay {training_args.weight_decay}",
        "schedule": f"{_plain(training_args.lr_scheduler_type)}, warmup {training_args.warmup_steps}",
        "precision": "bf16" if training_args.bf16 else ("fp16" if training_args.fp16 else "fp32"),
        "steps": metrics.get("global_step", "?"),
    }
    results = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "global_step"}
    return render_model_card(
        title="ViT-MAE pretrained with hf_medvis",
        summary="A Masked Autoencoder (`ViTMAEForPreTraining`) pretrained on chest X-ray images with "
        "hf_medvis. Load the encoder into `ViTForImageClassification` to fine-tune; "
        "`reconstructions.png` shows masked reconstructions of held-out images.",
        metadata={
            "library_name": "transformers",
            "license": "apache-2.0",
            "tags": ["vit-mae", "masked-autoencoder", "medical-imaging", "chest-x-ray", "hf_medvis"],
            "base_model": model_args.model_name_or_path if model_args.model_name_or_path and "/" in model_args.model_name_or_path and not model_args.model_name_or_path.startswith((".", "/")) else None,
        },
        sections={"Architecture": architecture, "Training": training, "Results": results or "No evaluation was run."},
    )


def _plain(value) -> str:
    """Enum members (OptimizerNames, SchedulerType) as their plain value."""
    return str(getattr(value, "value", value))
