"""The recipes' model arguments (HfArgumentParser dataclasses): which checkpoint or preset, and its shape.
``build_model`` takes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.presets import preset_names
from .transfer import POOLINGS


@dataclass
class ModelArguments:
    """What both recipes ask of a model: a checkpoint or a preset, its input geometry, config overrides, loading."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this checkpoint (local folder or Hub id). Default: a new model."}
    )
    model_preset: str = field(
        default="tiny", metadata={"help": f"Architecture for a new model: one of {', '.join(preset_names())}."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the preset's)."})
    patch_size: int | None = field(
        default=None, metadata={"help": "Patch size of a new model (default: the preset's)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated key=value config overrides, e.g. 'hidden_size=128'."}
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa (default) or eager."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the checkpoint's repository."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and self.model_preset not in preset_names():
            raise ValueError(f"--model_preset must be one of {', '.join(preset_names())}, got '{self.model_preset}'")


@dataclass
class MAEModelArguments(ModelArguments):
    num_channels: int = field(
        default=3,
        metadata={"help": "3 replicates grayscale to RGB so Hub checkpoints fit; 1 keeps X-rays single-channel."},
    )
    mask_ratio: float = field(
        default=0.75, metadata={"help": "Fraction of patches masked (MAE: 0.75; X-ray MAE: 0.90)."}
    )
    norm_pix_loss: bool = field(default=True, metadata={"help": "Reconstruct per-patch normalised pixels."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.num_channels not in (1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}")


@dataclass
class FinetuneModelArguments(ModelArguments):
    """What both fine-tuning tasks (classification, segmentation) ask of the encoder: channels and regularisation."""

    num_channels: int | None = field(
        default=None, metadata={"help": "Channels of a new model: 3 (grayscale replicated, default) or 1."}
    )
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout in the encoder MLPs and embeddings."})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "Dropout on attention weights."})
    drop_path_rate: float = field(
        default=0.0,
        metadata={"help": "Stochastic depth: each encoder layer's residual branches dropped per sample, at a rate "
                  "rising linearly to this at the last layer (MAE / medical_mae fine-tuning use 0.1-0.2). Off in "
                  "evaluation; the saved model is a plain ViT. BEiT, Dinov2 (one rate for every layer), Swin and "
                  "ConvNeXt: their config's own drop_path_rate, set to this."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_channels not in (None, 1, 3):
            raise ValueError(f"--num_channels must be 1 or 3, got {self.num_channels}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ClassifierModelArguments(FinetuneModelArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from a Hub id (e.g. google/vit-base-patch16-224), a local ViT folder, an MAE "
                  "pretraining output (encoder transferred, decoder dropped), or a DeiT, BEiT, Dinov2, Swin or ConvNeXt "
                  "checkpoint (new head). Default: a new ViT from --model_preset."},
    )  # fmt: skip
    image_size: int | None = field(
        default=None, metadata={"help": "Input size; differing from the checkpoint's interpolates position embeddings."}
    )
    pooling: str | None = field(
        default=None,
        metadata={"help": "ViT: cls (default), the CLS token (plain ViTForImageClassification, loads anywhere), or "
                  "mean, global average of patch tokens (the MAE fine-tuning default; load with hf_medvis). BEiT: cls "
                  "or mean (its use_mean_pooling). DeiT: cls only; Swin, ConvNeXt: mean only; Dinov2: its own (CLS + "
                  "mean patch token). Unset: the architecture's own."},
    )  # fmt: skip
    linear_probe: bool = field(
        default=False,
        metadata={"help": "Freeze the encoder and train only a BatchNorm(no affine) + linear head (MAE linear probing; "
                  "recipes/configs/vit_linear_probe.yaml has the paper's optimiser and lr rule). The saved model has "
                  "the BatchNorm folded into a plain linear classifier."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.drop_path_rate and self.linear_probe:
            raise ValueError("--drop_path_rate with --linear_probe: the probe's encoder is frozen; drop-path is for "
                             "fine-tuning the encoder")  # fmt: skip


@dataclass
class SegmentationModelArguments(FinetuneModelArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start the encoder from a ViT (Hub id or folder), an MAE pretraining output (encoder "
                  "transferred, decoder dropped) or one of our segmentation models. Default: a new ViT from "
                  "--model_preset. The decoder is new (SETR-style progressive upsampling to 1/4 of the input)."},
    )  # fmt: skip
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input size (the whole image is resized to it, square); differing from the checkpoint's "
                  "interpolates position embeddings."},
    )  # fmt: skip
    decoder_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Channels of the decoder's convolutions (default 256; a segmentation checkpoint's own)."},
    )
    dice_loss_weight: float = field(
        default=1.0, metadata={"help": "Loss = cross-entropy + this x (1 - soft Dice); 0 = cross-entropy only."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_hidden_size is not None and self.decoder_hidden_size < 1:
            raise ValueError(f"--decoder_hidden_size must be positive, got {self.decoder_hidden_size}")
        if self.dice_loss_weight < 0:
            raise ValueError(f"--dice_loss_weight must be >= 0, got {self.dice_loss_weight}")
