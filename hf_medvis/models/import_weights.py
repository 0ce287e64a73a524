"""Public encoder checkpoints (facebookresearch/mae, medical_mae, timm ViT, original DINOv2) -> Hugging Face folders.

Each layout is converted by an explicit name table written for it: every source tensor is either placed in the target
model (fused ``qkv`` split into q, k, v) or the conversion fails naming it; shapes are checked against the target
model; every target tensor must be filled. The folder is written beside ``out`` and renamed into place, after a reload
with ``from_pretrained`` has returned every tensor unchanged (ViTMAE re-creates its sin-cos position embeddings at
init, so the check is not a formality).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from ..core.text import short_list
from .build import build_image_processor, classifier_image_processor
from .weights import own_load_report

FORMATS = ("auto", "mae", "timm", "dinov2")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The chest X-ray statistics lambert-x/medical_mae normalises with (NIH ChestX-ray14), on all 3 channels.
MEDICAL_MAE_MEAN = (0.5056, 0.5056, 0.5056)
MEDICAL_MAE_STD = (0.252, 0.252, 0.252)
# facebookresearch/mae, timm and DINOv2 build their LayerNorms with eps 1e-6 (transformers' ViT default is 1e-12).
LAYER_NORM_EPS = 1e-6
# Heads of the standard sizes: by model-name size word, and by hidden size where no name was saved.
VIT_HEADS_BY_SIZE_WORD = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
VIT_HEADS_BY_HIDDEN_SIZE = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DINOV2_HEADS_BY_HIDDEN_SIZE = {384: 6, 768: 12, 1024: 16, 1536: 24}
MAE_DECODER_HEADS = 16  # every decoder of facebookresearch/mae (and medical_mae) has 16 heads


@dataclass
class ImportOptions:
    """The command's choices; ``None`` means "infer from the checkpoint"."""

    format: str = "auto"
    image_size: int | None = None
    patch_size: int | None = None
    num_attention_heads: int | None = None
    decoder_num_attention_heads: int | None = None
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None
    trust_pickle: bool = False
    overwrite: bool = False


@dataclass
class ImportReport:
    """What was read, what was written, and every decision a user may want to check."""

    source: str
    out: str
    layout: str  # "mae", "timm" or "dinov2"
    detected: str  # one line: the layout and why
    architecture: str  # the transformers class saved
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    keys_imported: int
    image_mean: list[float]
    image_std: list[float]
    normalization: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"imported {self.layout} -> {self.out}: {self.architecture}, {self.num_hidden_layers} layers, "
            f"hidden {self.hidden_size}, {self.num_attention_heads} heads, image {self.image_size}, "
            f"patch {self.patch_size}, {self.keys_imported} keys imported, normalization {self.normalization}"
        )


@dataclass
class Checkpoint:
    """A loaded source file: its tensors, its saved training arguments (if any), and what unwrapping dropped."""

    tensors: dict[str, torch.Tensor]
    args: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """The state dict (and saved ``args``) of a ``.pth``/``.pt``/``.bin``/``.safetensors`` file. Pickled objects beyond
    tensors (MAE's ``argparse.Namespace``) are loaded only with ``trust_pickle``: unpickling runs code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: expected a {'/'.join(CHECKPOINT_SUFFIXES)} file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_checkpoint(load_file(str(path)))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds pickled Python objects (e.g. MAE's argparse 'args'), which a weights-only load refuses; "
                "pass --trust-pickle if you trust the file (unpickling can run code)"
            ) from None
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a class of the training code that is not installed here, ...
            raise ValueError(f"{path}: cannot unpickle: {type(err).__name__}: {err}") from None
    return unwrap_checkpoint(raw)


def unwrap_checkpoint(raw: Any) -> Checkpoint:
    """A raw state dict, or one inside ``model`` / ``state_dict`` / ``teacher`` (DINOv2: only its ``backbone.``)."""
    if not isinstance(raw, dict):
        raise ValueError(f"the file holds a {type(raw).__name__}, not a state dict")
    args = raw.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    notes: list[str] = []
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(raw.get(wrapper), dict):
            state = raw[wrapper]
            break
    else:
        wrapper, state = "", raw
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise ValueError(f"not a state dict: entries that are not tensors: {short_list(non_tensors, 4)}")
    if any(k.startswith("backbone.") for k in state):
        # DINOv2 training checkpoints: the encoder under "backbone.", beside the self-supervised heads.
        heads = sorted({k.split(".")[0] + ".*" for k in state if not k.startswith("backbone.")})
        if heads:
            notes.append(f"left out the self-supervised heads of the '{wrapper or 'checkpoint'}': {', '.join(heads)}")
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    # DINOv2 with block_chunks > 0 saves "blocks.<chunk>.<layer>."; layer numbers are global, the chunk is redundant.
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    return Checkpoint(tensors=state, args=args, notes=notes)


def detect_layout(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """("mae" | "timm" | "dinov2", one line saying why)."""
    if "blocks.0.ls1.gamma" in tensors or ("mask_token" in tensors and "register_tokens" in tensors):
        return "dinov2", "original DINOv2 layout (blocks.N.ls1.gamma layer scale)"
    if "blocks.0.attn.qkv.weight" in tensors and any(k.startswith("decoder_") for k in tensors):
        return "mae", "MAE layout with decoder (blocks.N.attn.qkv + decoder_*)"
    if "blocks.0.attn.qkv.weight" in tensors and "patch_embed.proj.weight" in tensors:
        return "timm", "timm / MAE encoder layout without decoder (blocks.N.attn.qkv + patch_embed.proj)"
    hint = ""
    if any(k.startswith(("vit.", "encoder.layer.", "embeddings.")) for k in tensors):
        hint = " (it looks like a transformers state dict already: load its folder directly)"
    raise ValueError(f"cannot tell the layout: no blocks.N.attn.qkv or blocks.N.ls1.gamma keys{hint}")


# ------------------------------------------------------------------------------------------------ the mapping tables


class _KeyMapper:
    """Source tensors placed under target names, remembering which source each came from and which were used."""

    def __init__(self, source: dict[str, torch.Tensor]) -> None:
        self.source = source
        self.target: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.used: set[str] = set()
        self.absent: list[str] = []
        self.left_out: set[str] = set()

    def copy(self, src: str, dst: str) -> None:
        if src not in self.source:
            self.absent.append(src)
            return
        self.target[dst], self.origin[dst] = self.source[src], src
        self.used.add(src)

    def split(self, src: str, dsts: Sequence[str]) -> None:
        """Equal parts along dim 0: fused ``qkv`` -> q, k, v; DINOv2's SwiGLU ``w12`` -> gate, up."""
        if src not in self.source:
            self.absent.append(src)
            return
        tensor = self.source[src]
        if tensor.shape[0] % len(dsts):
            raise ValueError(f"{src} {tuple(tensor.shape)}: dim 0 does not split into {len(dsts)} equal parts")
        for index, (dst, part) in enumerate(zip(dsts, tensor.chunk(len(dsts)), strict=True)):
            self.target[dst], self.origin[dst] = part.clone(), f"{src}[part {index + 1} of {len(dsts)}]"
        self.used.add(src)

    def copy_linear(self, src: str, dst: str, bias: bool = True) -> None:
        self.copy(f"{src}.weight", f"{dst}.weight")
        if bias:
            self.copy(f"{src}.bias", f"{dst}.bias")

    def split_linear(self, src: str, dsts: Sequence[str], bias: bool = True) -> None:
        self.split(f"{src}.weight", [f"{d}.weight" for d in dsts])
        if bias:
            self.split(f"{src}.bias", [f"{d}.bias" for d in dsts])


def _count_blocks(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    numbers = {int(m.group(1)) for k in tensors if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if numbers != set(range(len(numbers))):
        raise ValueError(f"{prefix}.N: layer numbers are not 0..{len(numbers) - 1}: {sorted(numbers)}")
    return len(numbers)


def _map_vit_blocks(mapper: _KeyMapper, src: str, dst: str, num_layers: int, qkv_bias: bool) -> None:
    """timm / MAE pre-norm blocks -> transformers ViT / ViTMAE layers (``dst`` "vit.layers" or "decoder...")."""
    for n in range(num_layers):
        s, d = f"{src}.{n}", f"{dst}.{n}"
        mapper.copy_linear(f"{s}.norm1", f"{d}.layernorm_before")
        mapper.split_linear(f"{s}.attn.qkv", [f"{d}.attention.{p}_proj" for p in "qkv"], bias=qkv_bias)
        mapper.copy_linear(f"{s}.attn.proj", f"{d}.attention.o_proj")
        mapper.copy_linear(f"{s}.norm2", f"{d}.layernorm_after")
        mapper.copy_linear(f"{s}.mlp.fc1", f"{d}.mlp.fc1")
        mapper.copy_linear(f"{s}.mlp.fc2", f"{d}.mlp.fc2")


def _map_vit_embeddings(mapper: _KeyMapper, dst: str) -> None:
    mapper.copy("cls_token", f"{dst}.cls_token")
    mapper.copy("pos_embed", f"{dst}.position_embeddings")
    mapper.copy_linear("patch_embed.proj", f"{dst}.patch_embeddings.projection")


def _load_exactly(model: PreTrainedModel, mapper: _KeyMapper, layout: str) -> int:
    """Strict: every source key used (or deliberately left out), shapes equal, every target filled. Returns the number
    of source keys imported."""
    unused = sorted(set(mapper.source) - mapper.used - mapper.left_out)
    if unused:
        raise ValueError(f"{len(unused)} source keys not used by the {layout} conversion: {short_list(unused, 6)}")
    expected = model.state_dict()
    for dst, tensor in mapper.target.items():
        if dst not in expected:  # a bug of the tables above, not of the checkpoint
            raise RuntimeError(f"{layout} conversion targets {dst}, which {type(model).__name__} does not have")
        if tuple(tensor.shape) != tuple(expected[dst].shape):
            raise ValueError(
                f"shape mismatch: {mapper.origin[dst]} is {tuple(tensor.shape)}, but {dst} of "
                f"{type(model).__name__} needs {tuple(expected[dst].shape)}"
            )
    missing = sorted(set(expected) - set(mapper.target))
    if missing:
        absent = f" (the source lacks {short_list(sorted(mapper.absent), 4)})" if mapper.absent else ""
        raise ValueError(
            f"{len(missing)} weights of {type(model).__name__} have no source{absent}: {short_list(missing, 4)}"
        )
    dtypes = {t.dtype for t in mapper.target.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # keep a half-precision checkpoint in its own precision
        model.to(dtypes.pop())
    model.load_state_dict(mapper.target, strict=True)
    return len(mapper.used)


# ------------------------------------------------------------------------------------------------------- inference


def _model_name_heads(model_name: str | None) -> int | None:
    match = re.search(r"vit_(tiny|small|base|large|huge)", model_name or "")
    return VIT_HEADS_BY_SIZE_WORD[match.group(1)] if match else None


def _resolve_heads(
    flag: int | None, from_name: int | None, hidden_size: int, table: dict[int, int], what: str, flag_name: str
) -> tuple[int, str]:
    """Heads are not in the shapes: the flag, else the saved model name, else the standard size's; (heads, source)."""
    if flag:
        heads, source = flag, flag_name
    elif from_name:
        heads, source = from_name, "the saved model name"
    elif hidden_size in table:
        heads, source = table[hidden_size], f"the standard {what} of hidden size {hidden_size}"
    else:
        raise ValueError(f"cannot infer the {what}'s attention heads for hidden size {hidden_size}: pass {flag_name}")
    if hidden_size % heads:
        raise ValueError(f"{what} hidden size {hidden_size} is not divisible by {heads} heads (from {source})")
    return heads, source


@dataclass
class _EncoderShape:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    patch_size: int
    num_channels: int
    grid: int
    qkv_bias: bool


def _infer_encoder_shape(tensors: dict[str, torch.Tensor], options: ImportOptions) -> _EncoderShape:
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in tensors:
            raise ValueError(f"the checkpoint has no {key}")
    projection = tensors["patch_embed.proj.weight"]
    if projection.ndim != 4 or projection.shape[-1] != projection.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight {tuple(projection.shape)} is not a square patch convolution")
    patch_size = projection.shape[-1]
    if options.patch_size and options.patch_size != patch_size:
        raise ValueError(f"--patch-size {options.patch_size} differs from the checkpoint's {patch_size}")
    # pos_embed holds the CLS position first, then the patch grid (registers, when any, have none).
    num_patches = tensors["pos_embed"].shape[1] - 1
    grid = math.isqrt(max(num_patches, 0))
    if grid * grid != num_patches or grid == 0:
        raise ValueError(f"pos_embed {tuple(tensors['pos_embed'].shape)} is not 1 CLS + a square patch grid")
    if "blocks.0.mlp.fc1.weight" in tensors:
        intermediate = tensors["blocks.0.mlp.fc1.weight"].shape[0]
    elif "blocks.0.mlp.w3.weight" in tensors:  # DINOv2's SwiGLU: w3 maps the hidden width back
        intermediate = tensors["blocks.0.mlp.w3.weight"].shape[1]
    else:
        raise ValueError("the checkpoint has no blocks.0.mlp.fc1.weight")
    return _EncoderShape(
        hidden_size=projection.shape[0],
        num_layers=_count_blocks(tensors, "blocks"),
        intermediate_size=intermediate,
        patch_size=patch_size,
        num_channels=projection.shape[1],
        grid=grid,
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
    )


def _encoder_config_fields(shape: _EncoderShape, heads: int, image_size: int) -> dict[str, Any]:
    """The ViT / ViTMAE config fields of a timm-style encoder (GELU, LayerNorm eps 1e-6)."""
    return {
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": heads,
        "intermediate_size": shape.intermediate_size,
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": image_size,
        "patch_size": shape.patch_size,
        "num_channels": shape.num_channels,
        "qkv_bias": shape.qkv_bias,
    }


def _check_image_size(shape: _EncoderShape, options: ImportOptions) -> int:
    image_size = shape.grid * shape.patch_size
    if options.image_size and options.image_size != image_size:
        raise ValueError(
            f"--image-size {options.image_size} differs from the checkpoint's {image_size} (pos_embed grid "
            f"{shape.grid}x{shape.grid}, patch {shape.patch_size}); import at {image_size} and let the fine-tune "
            "recipe's --image_size interpolate the position embeddings"
        )
    return image_size


# ----------------------------------------------------------------------------------------------------- conversions


@dataclass
class Converted:
    """A converted model, the facts of the summary line, and anything a user should know about it."""

    model: PreTrainedModel
    num_attention_heads: int
    image_size: int
    keys_imported: int
    notes: list[str] = field(default_factory=list)


def convert_mae_checkpoint(checkpoint: Checkpoint, options: ImportOptions) -> Converted:
    """facebookresearch/mae (or medical_mae) pretraining checkpoint with decoder -> ``ViTMAEForPreTraining``."""
    tensors, args = checkpoint.tensors, checkpoint.args
    shape = _infer_encoder_shape(tensors, options)
    image_size = _check_image_size(shape, options)
    if args.get("input_size") and int(args["input_size"]) != image_size:
        raise ValueError(f"the saved args.input_size {args['input_size']} differs from the pos_embed's {image_size}")
    model_name = args.get("model")
    heads, heads_from = _resolve_heads(
        options.num_attention_heads,
        _model_name_heads(model_name),
        shape.hidden_size,
        VIT_HEADS_BY_HIDDEN_SIZE,
        "encoder",
        "--num-attention-heads",
    )
    for key in ("decoder_embed.weight", "decoder_blocks.0.mlp.fc1.weight"):
        if key not in tensors:
            raise ValueError(f"an MAE checkpoint with decoder needs {key}")
    decoder_hidden = tensors["decoder_embed.weight"].shape[0]
    decoder_heads, decoder_heads_from = _resolve_heads(
        options.decoder_num_attention_heads,
        MAE_DECODER_HEADS if (model_name or "").startswith("mae_") else None,
        decoder_hidden,
        {512: MAE_DECODER_HEADS},
        "decoder",
        "--decoder-num-attention-heads",
    )
    notes = [f"encoder heads from {heads_from}; decoder heads from {decoder_heads_from}"]
    config = ViTMAEConfig(
        **_encoder_config_fields(shape, heads, image_size),
        decoder_hidden_size=decoder_hidden,
        decoder_num_hidden_layers=_count_blocks(tensors, "decoder_blocks"),
        decoder_num_attention_heads=decoder_heads,
        decoder_intermediate_size=tensors["decoder_blocks.0.mlp.fc1.weight"].shape[0],
    )
    for name in ("mask_ratio", "norm_pix_loss"):
        if name in args:
            setattr(config, name, type(getattr(config, name))(args[name]))
        else:
            notes.append(f"{name} not saved in the checkpoint: transformers' default {getattr(config, name)}")
    decoder_qkv_bias = "decoder_blocks.0.attn.qkv.bias" in tensors
    if decoder_qkv_bias != shape.qkv_bias:
        raise ValueError("the encoder and decoder disagree on qkv biases; ViTMAE has one qkv_bias for both")
    model = ViTMAEForPreTraining(config)
    mapper = _KeyMapper(tensors)
    _map_vit_embeddings(mapper, "vit.embeddings")
    _map_vit_blocks(mapper, "blocks", "vit.layers", shape.num_layers, shape.qkv_bias)
    mapper.copy_linear("norm", "vit.layernorm")
    mapper.copy_linear("decoder_embed", "decoder.decoder_embed")
    mapper.copy("mask_token", "decoder.mask_token")
    mapper.copy("decoder_pos_embed", "decoder.decoder_pos_embed")
    _map_vit_blocks(
        mapper, "decoder_blocks", "decoder.decoder_layers", config.decoder_num_hidden_layers, shape.qkv_bias
    )
    mapper.copy_linear("decoder_norm", "decoder.decoder_norm")
    mapper.copy_linear("decoder_pred", "decoder.decoder_pred")
    keys = _load_exactly(model, mapper, "mae")
    return Converted(model, heads, image_size, keys, notes)


def convert_timm_checkpoint(checkpoint: Checkpoint, options: ImportOptions) -> Converted:
    """A timm ViT (or an MAE encoder without decoder) -> ``ViTModel``; with a CLS-token head ``head.*`` ->
    ``ViTForImageClassification``. A global-pool fine-tune (``fc_norm.*``, no ``norm.*``) -> ``ViTModel`` whose final
    layernorm is ``fc_norm`` (not exact: see the note it adds), its head left out."""
    tensors, args = checkpoint.tensors, checkpoint.args
    shape = _infer_encoder_shape(tensors, options)
    image_size = _check_image_size(shape, options)
    heads, heads_from = _resolve_heads(
        options.num_attention_heads,
        _model_name_heads(args.get("model")),
        shape.hidden_size,
        VIT_HEADS_BY_HIDDEN_SIZE,
        "encoder",
        "--num-attention-heads",
    )
    notes = [f"encoder heads from {heads_from}"]
    config = ViTConfig(
        **_encoder_config_fields(shape, heads, image_size),
    )
    global_pool = "fc_norm.weight" in tensors and "norm.weight" not in tensors
    cls_head = "head.weight" in tensors and not global_pool
    mapper = _KeyMapper(tensors)
    if cls_head:
        # timm's token pooling is transformers' ViTForImageClassification: final norm, CLS token, linear head.
        config.num_labels = tensors["head.weight"].shape[0]
        model: PreTrainedModel = ViTForImageClassification(config)
        prefix = "vit."
        mapper.copy_linear("head", "classifier")
        notes.append(f"classifier head imported ({config.num_labels} outputs, labels unnamed: LABEL_0, ...)")
    else:
        model = ViTModel(config, add_pooling_layer=False)
        prefix = ""
    _map_vit_embeddings(mapper, f"{prefix}embeddings")
    _map_vit_blocks(mapper, "blocks", f"{prefix}layers", shape.num_layers, shape.qkv_bias)
    if global_pool:
        # The source normalises the mean of the patch tokens (fc_norm); transformers' classifiers (ours with
        # --pooling mean included) normalise each token before pooling. No placement reproduces it exactly.
        mapper.copy_linear("fc_norm", "layernorm")
        mapper.left_out |= {k for k in ("head.weight", "head.bias") if k in tensors}
        notes.append(
            "global-pool checkpoint: fc_norm.* became the final layernorm (the source normalised the pooled mean, "
            "transformers normalises each token before pooling: not exact); head.* left out; fine-tune with "
            "--pooling mean"
        )
    else:
        mapper.copy_linear("norm", f"{prefix}layernorm")
    keys = _load_exactly(model, mapper, "timm")
    return Converted(model, heads, image_size, keys, notes)


def _dinov2_mlp_ratio(hidden_size: int, mlp_width: int, swiglu: bool) -> int:
    """The ``mlp_ratio`` (an integer in transformers' Dinov2Config) that gives ``mlp_width``; for SwiGLU through
    transformers' size rule (two thirds, rounded up to a multiple of 8: 4 for DINOv2 ViT-g)."""
    for ratio in range(1, 17):
        width = hidden_size * ratio
        if (((int(width * 2 / 3) + 7) // 8 * 8) if swiglu else width) == mlp_width:
            return ratio
    raise ValueError(
        f"no integer mlp_ratio (transformers' Dinov2Config takes only integers) gives an MLP width of {mlp_width} for "
        f"hidden size {hidden_size}"
    )


def convert_dinov2_checkpoint(checkpoint: Checkpoint, options: ImportOptions) -> Converted:
    """Original-layout DINOv2 (RAD-DINO) -> ``Dinov2Model``, or ``Dinov2WithRegistersModel`` with register tokens."""
    tensors = checkpoint.tensors
    swiglu = "blocks.0.mlp.w12.weight" in tensors
    shape = _infer_encoder_shape(tensors, options)
    # Dinov2 interpolates its position embeddings to any input, so --image-size sets only the processor's size.
    image_size = shape.grid * shape.patch_size
    heads, heads_from = _resolve_heads(
        options.num_attention_heads,
        None,
        shape.hidden_size,
        DINOV2_HEADS_BY_HIDDEN_SIZE,
        "encoder",
        "--num-attention-heads",
    )
    notes = [f"encoder heads from {heads_from}"]
    mlp_ratio = _dinov2_mlp_ratio(shape.hidden_size, shape.intermediate_size, swiglu)
    fields = _encoder_config_fields(shape, heads, image_size)
    del fields["intermediate_size"]  # Dinov2Config derives the MLP width from mlp_ratio
    fields.update(mlp_ratio=mlp_ratio, use_swiglu_ffn=swiglu)
    if "register_tokens" in tensors:
        try:
            from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
        except ImportError:
            raise ValueError(
                "the checkpoint has register tokens; this transformers has no Dinov2WithRegistersModel"
            ) from None
        config = Dinov2WithRegistersConfig(**fields, num_register_tokens=tensors["register_tokens"].shape[1])
        model: PreTrainedModel = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(**fields))
    mapper = _KeyMapper(tensors)
    _map_vit_embeddings(mapper, "embeddings")
    mapper.copy("mask_token", "embeddings.mask_token")
    if "register_tokens" in tensors:
        mapper.copy("register_tokens", "embeddings.register_tokens")
    for n in range(shape.num_layers):
        s, d = f"blocks.{n}", f"encoder.layer.{n}"
        mapper.copy_linear(f"{s}.norm1", f"{d}.norm1")
        mapper.split_linear(f"{s}.attn.qkv", [f"{d}.attention.{p}_proj" for p in "qkv"], bias=shape.qkv_bias)
        mapper.copy_linear(f"{s}.attn.proj", f"{d}.attention.o_proj")
        mapper.copy(f"{s}.ls1.gamma", f"{d}.layer_scale1.lambda1")
        mapper.copy_linear(f"{s}.norm2", f"{d}.norm2")
        if swiglu:  # w12 computes [gate; up] in one matrix: silu(gate(x)) * up(x)
            mapper.split_linear(f"{s}.mlp.w12", [f"{d}.mlp.gate_proj", f"{d}.mlp.up_proj"])
            mapper.copy_linear(f"{s}.mlp.w3", f"{d}.mlp.down_proj")
        else:
            mapper.copy_linear(f"{s}.mlp.fc1", f"{d}.mlp.fc1")
            mapper.copy_linear(f"{s}.mlp.fc2", f"{d}.mlp.fc2")
        mapper.copy(f"{s}.ls2.gamma", f"{d}.layer_scale2.lambda1")
    mapper.copy_linear("norm", "layernorm")
    keys = _load_exactly(model, mapper, "dinov2")
    notes.append("the fine-tune and MAE recipes do not take DINOv2 folders yet; load with transformers' Dinov2 classes")
    return Converted(model, heads, image_size, keys, notes)


CONVERTERS: dict[str, Callable[[Checkpoint, ImportOptions], Converted]] = {
    "mae": convert_mae_checkpoint,
    "timm": convert_timm_checkpoint,
    "dinov2": convert_dinov2_checkpoint,
}


# ------------------------------------------------------------------------------------------------------ the folder


def _channel_values(
    values: Sequence[float] | None, default: Sequence[float], num_channels: int, flag: str
) -> list[float]:
    values = list(values) if values else list(default)
    if len(values) == 1:
        values = values * num_channels
    if len(values) != num_channels:
        raise ValueError(f"{flag} takes 1 or {num_channels} values, got {len(values)}")
    return [float(v) for v in values]


def _verify_reload(model: PreTrainedModel, folder: Path) -> None:
    """The saved folder, loaded back, holds exactly the converted tensors (ViTMAE's init re-creates its position
    embeddings; a transformers change there would otherwise pass silently)."""
    # A ViTModel is saved without its pooler (ViTForImageClassification has none); reload it the same way.
    extra = {"add_pooling_layer": False} if isinstance(model, ViTModel) else {}
    with own_load_report():
        reloaded = type(model).from_pretrained(folder, use_safetensors=True, **extra)
    expected, found = model.state_dict(), reloaded.state_dict()
    changed = sorted(k for k in expected if k not in found or not torch.equal(expected[k], found[k]))
    if changed or set(found) != set(expected):
        raise RuntimeError(f"the saved folder does not reload the converted weights: {short_list(changed, 4)}")


def _folder_is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def import_weights(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ImportOptions | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> ImportReport:
    """Convert ``src`` into a transformers folder at ``out`` (weights, config, image processor, import_info.json).
    ``echo`` receives the detection line before the conversion starts. Raises ValueError naming what is wrong; on any
    failure nothing is left at ``out`` or beside it."""
    options = options or ImportOptions()
    if options.format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got '{options.format}'")
    out = Path(out)
    if not _folder_is_empty(out) and not options.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    checkpoint = load_checkpoint(src, trust_pickle=options.trust_pickle)
    if options.format == "auto":
        layout, why = detect_layout(checkpoint.tensors)
        detected = f"detected {layout}: {why}"
    else:
        layout, detected = options.format, f"format {options.format} (given)"
    if checkpoint.args.get("model"):
        detected += f"; saved model name {checkpoint.args['model']}"
    if echo:
        echo(detected)
    converted = CONVERTERS[layout](checkpoint, options)
    config = converted.model.config
    given = options.image_mean is not None or options.image_std is not None
    mean = _channel_values(options.image_mean, IMAGENET_MEAN, config.num_channels, "--image-mean")
    std = _channel_values(options.image_std, IMAGENET_STD, config.num_channels, "--image-std")
    normalization = "given (--image-mean/--image-std)" if given else "ImageNet (default)"
    if given and mean == list(MEDICAL_MAE_MEAN) and std == list(MEDICAL_MAE_STD):
        normalization = "medical_mae NIH ChestX-ray14 (given)"
    processor_size = options.image_size or converted.image_size
    report = ImportReport(
        source=str(src),
        out=str(out),
        layout=layout,
        detected=detected,
        architecture=type(converted.model).__name__,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=converted.num_attention_heads,
        image_size=processor_size,
        patch_size=config.patch_size,
        keys_imported=converted.keys_imported,
        image_mean=mean,
        image_std=std,
        normalization=f"{normalization} mean {mean} std {std}",
        notes=checkpoint.notes + converted.notes,
    )
    _write_atomically(out, converted.model, processor_size, mean, std, report, options.overwrite)
    return report


def _write_atomically(
    out: Path,
    model: PreTrainedModel,
    image_size: int,
    mean: list[float],
    std: list[float],
    report: ImportReport,
    overwrite: bool,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.importing-{os.getpid()}"
    previous = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        classifier = type(model).__name__.endswith("ForImageClassification")  # + config.json's custom_pipelines
        processor = classifier_image_processor(model.config, mean, std) if classifier else None
        model.save_pretrained(staging)
        (processor or build_image_processor(image_size, mean, std)).save_pretrained(staging)
        (staging / "import_info.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        _verify_reload(model, staging)
        if out.exists():
            if not overwrite and not _folder_is_empty(out):  # appeared while we converted
                raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
            out.rename(previous)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous.exists() and not out.exists():
            previous.rename(out)
        raise
    shutil.rmtree(previous, ignore_errors=True)
