"""Model factories: MAE for pretraining from a preset or a checkpoint; image-processor settings that travel with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, ViTMAEConfig, ViTMAEForPreTraining
from transformers.utils import IMAGE_PROCESSOR_NAME

from ..core.errors import first_line
from ..core.presets import preset_fields
from ..core.tasks import MAE
from .processing_hf_medvis import MedVisImageClassificationPipeline, MedVisImageProcessor

logger = logging.getLogger(__name__)


# NIH ChestX-ray14 grayscale statistics (lambert-x/medical_mae); used when a model brings no processor of its own.
XRAY_MEAN = 0.5056
XRAY_STD = 0.252


class ModelSetupError(ValueError):
    """A model specification that cannot be built or loaded."""


def model_preset_fields(preset: str, task: str) -> dict[str, Any]:
    """``core.presets.preset_fields`` with an unknown name as the recipes' one-line ``--model_preset`` error."""
    try:
        return preset_fields(preset, task)
    except ValueError as err:
        raise ModelSetupError(f"--model_preset: {err}") from None


def apply_config_overrides(config: PretrainedConfig, text: str | None) -> None:
    """``--config_overrides "hidden_size=128,qkv_bias=false"`` onto ``config`` with transformers' own
    ``update_from_string`` (each value cast to the type the attribute has); unknown keys are one-line errors."""
    if not text or not text.strip():
        return
    try:
        config.update_from_string(text.strip().strip(","))
    except (ValueError, TypeError) as err:
        raise ModelSetupError(f"--config_overrides: {type(config).__name__}: {first_line(err)}") from None


def build_mae_config(
    preset: str,
    *,
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int = 3,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    overrides: str | None = None,
) -> ViTMAEConfig:
    spec = model_preset_fields(preset, MAE)
    if image_size:
        spec["image_size"] = image_size
    if patch_size:
        spec["patch_size"] = patch_size
    config = ViTMAEConfig(**spec, num_channels=num_channels, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    apply_config_overrides(config, overrides)
    if config.image_size % config.patch_size:
        raise ModelSetupError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    return config


def build_mae_model(
    model_name_or_path: str | None,
    *,
    preset: str = "tiny",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int = 3,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    config_overrides: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> ViTMAEForPreTraining:
    """From a checkpoint (local folder or Hub id, safetensors only) or from scratch with a preset architecture."""
    if model_name_or_path is None:
        config = build_mae_config(
            preset,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            mask_ratio=mask_ratio,
            norm_pix_loss=norm_pix_loss,
            overrides=config_overrides,
        )
        if attn_implementation:
            config._attn_implementation = attn_implementation
        logger.info("Training a new ViTMAE from preset '%s'", preset)
        return ensure_sincos_position_embeddings(ViTMAEForPreTraining(config))

    local = Path(model_name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelSetupError(f"--model_name_or_path: {model_name_or_path} has no config.json (not a model folder)")
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # The masking parameters are training choices, not architecture: take them from the recipe.
    config_kwargs: dict[str, Any] = {"mask_ratio": mask_ratio, "norm_pix_loss": norm_pix_loss}
    if image_size:
        config_kwargs["image_size"] = image_size
    try:
        config = ViTMAEConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir, **config_kwargs)
    except OSError as err:
        raise ModelSetupError(
            f"--model_name_or_path: cannot load a config from {model_name_or_path}: {first_line(err)}"
        ) from None
    if config.model_type not in ("vit_mae", "vit"):
        raise ModelSetupError(
            f"--model_name_or_path: {model_name_or_path} is a '{config.model_type}' model, not ViT/ViTMAE"
        )
    apply_config_overrides(config, config_overrides)
    try:
        model = ViTMAEForPreTraining.from_pretrained(
            model_name_or_path, config=config, ignore_mismatched_sizes=False, **kwargs
        )
    except OSError as err:
        raise ModelSetupError(
            f"--model_name_or_path: cannot load weights from {model_name_or_path}: {first_line(err)}"
        ) from None
    return model


def ensure_sincos_position_embeddings(model: ViTMAEForPreTraining) -> ViTMAEForPreTraining:
    """Gives a freshly built ViTMAE its fixed 2-D sin-cos position embeddings when the library left them at zero.

    transformers 5.x skips the encoder's sin-cos init (its "already initialised" guard trips) and zeroes the decoder's;
    the embeddings are frozen, so such a model is position-blind and can only learn to predict the mean patch.
    """
    embeddings, decoder = model.vit.embeddings, model.decoder
    if embeddings.position_embeddings.detach().abs().sum() == 0:
        embeddings.patch_embeddings.projection._is_hf_initialized = False
        embeddings.initialize_weights()
    if decoder.decoder_pos_embed.detach().abs().sum() == 0:
        decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    if embeddings.position_embeddings.detach().abs().sum() == 0 or decoder.decoder_pos_embed.detach().abs().sum() == 0:
        raise RuntimeError("ViTMAE position embeddings are still zero after initialisation")
    return model


def resolve_normalization(
    model_name_or_path: str | None,
    num_channels: int,
    mean: list[float] | None,
    std: list[float] | None,
    data_stats: dict[str, list[float]] | None = None,
    cache_dir: str | None = None,
) -> tuple[list[float], list[float]]:
    """Mean/std per channel: explicit flags > the checkpoint's preprocessor_config.json (a folder's, or a Hub
    model's) > the training data's own statistics (``data_stats``: a prepared-shard manifest's ``normalization``) >
    X-ray defaults."""
    if mean is None or std is None:
        found = _processor_stats(model_name_or_path, cache_dir)
        if not found and data_stats:
            found = (list(data_stats["mean"]), list(data_stats["std"]))
        if found:
            mean, std = mean or found[0], std or found[1]
    mean = list(mean) if mean else [XRAY_MEAN]
    std = list(std) if std else [XRAY_STD]
    if len(mean) == 1:
        mean = mean * num_channels
    if len(std) == 1:
        std = std * num_channels
    if len(mean) != num_channels or len(std) != num_channels:
        raise ModelSetupError(f"--image_mean/--image_std need 1 or {num_channels} values (the model's num_channels)")
    return mean, std


def _processor_stats(
    model_name_or_path: str | None, cache_dir: str | None = None
) -> tuple[list[float], list[float]] | None:
    if not model_name_or_path:
        return None
    folder = Path(model_name_or_path)
    # a Hub id: the model came from there (or its cache), so does its processor
    path = folder / IMAGE_PROCESSOR_NAME if folder.is_dir() else _hub_processor_config(model_name_or_path, cache_dir)
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "image_mean" in data and "image_std" in data:
        return list(data["image_mean"]), list(data["image_std"])
    return None


def _hub_processor_config(repo_id: str, cache_dir: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, IMAGE_PROCESSOR_NAME, cache_dir=cache_dir))
    except LocalEntryNotFoundError:  # (a subclass of the next: the Hub did not answer and the cache has no copy)
        logger.warning(
            "%s of %s: the Hub did not answer and the cache has none, so its normalisation is not known; pass "
            "--image_mean / --image_std to set it",
            IMAGE_PROCESSOR_NAME,
            repo_id,
        )
        return None
    except EntryNotFoundError:  # the model has no processor
        return None


def build_image_processor(
    image_size: int, mean: list[float], std: list[float], *, colour: bool = False
) -> MedVisImageProcessor:
    """The processor saved beside the model, so that transformers (``pipeline``, ``AutoImageProcessor``) preprocesses
    as evaluation and ``hf-medvis predict`` do: shorter side to ``image_size`` (bicubic), centre crop, rescale,
    normalise; a grey image becomes the 3 equal channels of a 3-channel model. transformers' ``BitImageProcessor`` is
    its standard processor with that resize-and-crop (``ViTImageProcessor`` would squash a non-square X-ray); the
    subclass saved with it (``processing_hf_medvis.py``, for ``trust_remote_code``) first reads 16-bit images at full
    depth, colour as luminance unless ``colour`` (a model trained on colour images), with the model's channel count."""
    return MedVisImageProcessor(
        hf_medvis_colour=colour,
        do_convert_rgb=len(mean) == 3,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # bicubic, as in training
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
    )


# The task under which config.json names the saved pipeline of a folder plain transformers reads right (3 channels,
# built-in classes): transformers refuses a folder's own "image-classification" pipeline without trust_remote_code.
MEDICAL_TASK = "medical-image-classification"


def classifier_image_processor(config: PretrainedConfig, mean: list[float], std: list[float]) -> MedVisImageProcessor:
    """The processor saved beside a classifier (``build_image_processor`` at its input size, colour as it was
    trained), and ``config.custom_pipelines`` naming the pipeline saved in the same file, so that
    ``pipeline(model=DIR, trust_remote_code=True)`` reads any image as ``hf-medvis predict`` does.

    The task name: "image-classification" where plain transformers cannot read the folder right anyway (a 1-channel
    model; a model with its own code, such as mean pooling), so the usual call with ``trust_remote_code=True`` runs the
    saved pipeline; else ``MEDICAL_TASK``, so that plain ``pipeline("image-classification", model=DIR)`` keeps working
    without remote code for 8-bit images. Call it before the model is saved (config.json then carries the entry)."""
    image_input = getattr(config, "hf_medvis_input", None) or {}
    colour = int(image_input.get("channels", 1)) == 3 and not image_input.get("windows")
    plain = getattr(config, "num_channels", 3) == 3 and getattr(type(config), "_auto_class", None) is None
    config.custom_pipelines = {
        MEDICAL_TASK if plain else "image-classification": {
            "impl": f"processing_hf_medvis.{MedVisImageClassificationPipeline.__name__}",
            "pt": ["AutoModelForImageClassification"],
            "type": "image",
        }
    }
    processor = build_image_processor(config.image_size, mean, std, colour=colour)
    # Its save_pretrained (ours, the Trainer's checkpoints) then copies processing_hf_medvis.py beside it, as
    # transformers copies a registered class's file (custom_object_save); MAE folders need no pipeline and get none.
    processor._auto_class = "AutoImageProcessor"
    return processor
