"""Class-specific saliency maps of a classifier (HiResCAM, by pytorch-grad-cam) and their overlays on the image, plus
the examples a report shows (the most confident true positives, false positives and false negatives of each class).

HiResCAM (Draelos & Carin 2020) multiplies one layer's activations element-wise by the gradient of a class's logit and
sums over channels, per position. Grad-CAM instead averages the gradient over positions first, which assumes a channel
means the same thing everywhere; a ViT's token channels carry its position embedding. On the held-out phantoms of
tests/test_heatmaps.py (a tiny ViT trained to find nodules, Nodule AUROC 0.965) Grad-CAM's Nodule map put 2.1x the
disc's area share of its mass on the nodule (its Effusion map 2.4x), HiResCAM's 13.3x. Which layer, per architecture: the token view of the last transformer block before its
attention (ViT, DeiT, BEiT, Dinov2: its first LayerNorm, as pytorch-grad-cam's ViT tutorial does; for a CLS-pooled
model the last block's output patch tokens never reach the logits, so their gradient would be zero), Swin's final
LayerNorm (the tokens of the last stage), and ConvNeXt's last stage (a [C, H, W] map). Tokens are laid back on their
patch grid (CLS / distillation tokens left out). The maps are upsampled to the model's input size, so pixel (i, j) of a
map is pixel (i, j) of ``Predictor.preprocess``'s image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ..core.storage import join, make_dirs, write_bytes_atomic
from ..data.transforms import normalize_batch
from .predict import Predictor, file_part, output_stems, unique_names

EXAMPLE_KINDS: tuple[str, ...] = ("true_positive", "false_positive", "false_negative")
# At most this many tokens ahead of the patch grid: CLS, DeiT's distillation token (registers are not supported).
_MAX_PREFIX_TOKENS = 2


class _LogitsOnly(torch.nn.Module):
    """A transformers classifier as the tensor -> tensor module pytorch-grad-cam calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, prefix + g*g, D] tokens -> [B, D, g, g], the prefix tokens (CLS, distillation) left out."""
    if tokens.dim() != 3:
        raise ValueError(f"saliency: expected [batch, tokens, channels] at the target layer, got {tuple(tokens.shape)}")
    count = tokens.shape[1]
    side = math.isqrt(count)
    if count - side * side > _MAX_PREFIX_TOKENS:
        raise ValueError(f"saliency: {count} tokens are not a square patch grid plus a CLS/distillation token")
    grid = tokens[:, count - side * side :, :]
    return grid.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def target_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The layer the saliency method reads for ``model``'s architecture and the reshape of its output to [B, C, H, W]."""
    model_type = model.config.model_type
    base = getattr(model, model.base_model_prefix)
    if model_type == "convnext":
        return base.encoder.stages[-1], None
    if model_type == "swin":
        return base.layernorm, _tokens_to_grid
    # transformers 5.x ViT/DeiT/BEiT: base.layers; Dinov2 (and older releases): base.encoder.layer
    layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    if not layers:
        raise ValueError(f"saliency maps: no supported target layer in a '{model_type}' model")
    last = layers[-1]
    norm = getattr(last, "layernorm_before", None) or getattr(last, "norm1", None)  # ViT/DeiT/BEiT, Dinov2
    if norm is None:
        raise ValueError(f"saliency maps: the last block of a '{model_type}' model has no LayerNorm before attention")
    return norm, _tokens_to_grid


class SaliencyExplainer:
    """HiResCAM maps of a ``Predictor``'s model, one per image and class, aligned with ``predictor.preprocess``."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.layer, self.reshape = target_layer(predictor.model)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.predictor.spec.names)

    def maps(
        self,
        sources: Sequence[str],
        class_indices: Sequence[int] | None = None,
        batch_size: int = 16,
        storage_options: dict | None = None,
    ) -> np.ndarray:
        """[N, len(class_indices), S, S] float32 in [0, 1] (each map scaled to its own maximum; all 0 where nothing
        speaks for the class), S the model's input size; ``class_indices`` None: every class, in the model's order."""
        out = []
        for start in range(0, len(sources), batch_size):
            batch = sources[start : start + batch_size]
            images = torch.stack([self.predictor.preprocess(src, storage_options) for src in batch])
            out.append(self.maps_of_images(images, class_indices))
        if out:
            return np.concatenate(out)
        classes = len(self.class_names) if class_indices is None else len(class_indices)
        size = self.predictor.image_size
        return np.zeros((0, classes, size, size), dtype=np.float32)

    def maps_of_images(self, images: torch.Tensor, class_indices: Sequence[int] | None = None) -> np.ndarray:
        """``maps`` of already preprocessed uint8 images ([B, C, S, S], as ``predictor.preprocess`` returns them)."""
        predictor = self.predictor
        names = self.class_names
        indices = list(range(len(names))) if class_indices is None else [int(i) for i in class_indices]
        for index in indices:
            if not 0 <= index < len(names):
                raise ValueError(f"saliency maps: class index {index} is not one of the model's {len(names)} classes")
        model = predictor.model
        pixels = normalize_batch(images.to(predictor.device), predictor.mean, predictor.std, model.config.num_channels)
        result = np.zeros((len(images), len(indices), images.shape[-2], images.shape[-1]), dtype=np.float32)
        was_training = model.training
        try:
            # HiResCAM puts the model in eval mode and hooks the layer until the block ends; grad is on even when the
            # caller runs under torch.no_grad (Predictor.logits does).
            with torch.enable_grad(), HiResCAM(_LogitsOnly(model), [self.layer], reshape_transform=self.reshape) as cam:
                for column, index in enumerate(indices):
                    # The class's logit (before the sigmoid/softmax), as Grad-CAM and HiResCAM define it.
                    targets = [ClassifierOutputTarget(index)] * len(images)
                    result[:, column] = cam(input_tensor=pixels, targets=targets)
        finally:
            model.zero_grad(set_to_none=True)  # no parameter gradients left behind for the next caller
            model.train(was_training)
        # pytorch-grad-cam divides by (max + 1e-7), which leaves a faint map (an untrained head's) short of 1.
        peak = result.max(axis=(2, 3), keepdims=True)
        return np.where(peak > 0, result / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def write_heatmaps(
    predictor: Predictor,
    sources: Sequence[str],
    out_dir: str,
    batch_size: int = 16,
    storage_options: dict | None = None,
) -> list[dict[str, str]]:
    """``hf-medvis predict --heatmap OUT_DIR``: per source and class the overlay ``OUT_DIR/<stem>_<class>.png``, each
    written atomically; per source the ``{class: path}`` written. The model's input image is what is shown (after
    resize and centre crop), as the map is aligned with it."""
    explainer = SaliencyExplainer(predictor)
    make_dirs(out_dir, storage_options)
    stems = output_stems(sources)
    class_parts = unique_names([file_part(name) for name in explainer.class_names])
    written: list[dict[str, str]] = []
    for start in range(0, len(sources), batch_size):
        batch = sources[start : start + batch_size]
        images = torch.stack([predictor.preprocess(src, storage_options) for src in batch])
        maps = explainer.maps_of_images(images)
        for offset, image in enumerate(images.numpy()):
            paths = {}
            for c, name in enumerate(explainer.class_names):
                path = join(out_dir, f"{stems[start + offset]}_{class_parts[c]}.png")
                write_bytes_atomic(path, overlay_png(image, maps[offset, c]), storage_options)
                paths[name] = path
            written.append(paths)
    return written


def overlay_png(image: np.ndarray, heatmap: np.ndarray, colormap: str = "jet", max_alpha: float = 0.6) -> bytes:
    """PNG bytes of ``heatmap`` ([S, S] in [0, 1]) blended over ``image`` ([S, S] or [C, S, S] uint8; 3 channels are
    shown as RGB, any other count as the grey mean): the colour covers the image in proportion to the saliency, so the
    anatomy stays visible where the model did not look."""
    import matplotlib

    pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1) if pixels.shape[0] == 3 else pixels.mean(axis=0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != pixels.shape[:2]:
        raise ValueError(f"overlay: heatmap of shape {heat.shape} for an image of {pixels.shape[:2]} pixels")
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    colour = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    alpha = (max_alpha * heat)[..., None]
    blended = (1.0 - alpha) * pixels.astype(np.float32) + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def report_examples(
    predictor: Predictor,
    sources: Sequence[str],
    probs: np.ndarray,
    targets: np.ndarray,
    thresholds: Sequence[float] | Mapping[str, float] | np.ndarray | float | None = None,
    k: int = 2,
    storage_options: dict | None = None,
) -> list[tuple[str, bytes]]:
    """The report's examples: per class, the ``k`` most confident true positives, false positives and false negatives
    (``pick_examples``) with the class's map over the image the model saw, as (caption, PNG bytes). Captions name
    the class, the kind, the probability and the threshold, never the file or the patient."""
    explainer = SaliencyExplainer(predictor)
    cut = _thresholds(thresholds, explainer.class_names)
    examples: list[tuple[str, bytes]] = []
    picked = pick_examples(probs, targets, explainer.class_names, cut, k)
    for c, name in enumerate(explainer.class_names):
        for kind in EXAMPLE_KINDS:
            rows = picked[name][kind]
            if not rows:
                continue
            images = torch.stack([predictor.preprocess(sources[i], storage_options) for i in rows])
            maps = explainer.maps_of_images(images, [c])
            for row, image, heat in zip(rows, images.numpy(), maps[:, 0], strict=True):
                caption = f"{name}: {kind.replace('_', ' ')}, p = {probs[row, c]:.3f} (threshold {cut[c]:.3g})"
                examples.append((caption, overlay_png(image, heat)))
    return examples


def pick_examples(
    probs: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str],
    thresholds: Sequence[float] | Mapping[str, float] | np.ndarray | float | None = None,
    k: int = 2,
) -> dict[str, dict[str, list[int]]]:
    """Per class, the row indices of the ``k`` most confident true positives and false positives (highest
    probability first) and false negatives (lowest probability first), called at ``thresholds`` (one per class, a
    dict by name, one number, or None; a missing or NaN threshold is 0.5). ``targets``: [N, classes] 0/1, -1 unknown
    (left out). Ties keep the row order."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(targets)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"pick_examples: probabilities of shape {probs.shape} for {len(names)} classes")
    if truth.shape != probs.shape:
        raise ValueError(f"pick_examples: targets of shape {truth.shape} for probabilities of shape {probs.shape}")
    cut = _thresholds(thresholds, names)
    picked: dict[str, dict[str, list[int]]] = {}
    for c, name in enumerate(names):
        p, known = probs[:, c], truth[:, c] >= 0
        positive, called = known & (truth[:, c] == 1), p >= cut[c]
        confident_first = np.argsort(-p, kind="stable")
        doubtful_first = np.argsort(p, kind="stable")
        picked[name] = {
            "true_positive": _first(confident_first, positive & called, k),
            "false_positive": _first(confident_first, known & ~positive & called, k),
            "false_negative": _first(doubtful_first, positive & ~called, k),
        }
    return picked


def _first(order: np.ndarray, selected: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in order[selected[order]][:k]]


def _thresholds(
    thresholds: Sequence[float] | Mapping[str, float] | np.ndarray | float | None, names: Sequence[str]
) -> np.ndarray:
    if thresholds is None:
        values = np.full(len(names), 0.5)
    elif isinstance(thresholds, Mapping):
        values = np.array([thresholds.get(name, 0.5) for name in names], dtype=np.float64)
    elif np.ndim(thresholds) == 0:
        values = np.full(len(names), float(thresholds))  # type: ignore[arg-type]
    else:
        values = np.asarray(thresholds, dtype=np.float64)
        if values.shape != (len(names),):
            raise ValueError(f"pick_examples: {values.size} thresholds for {len(names)} classes")
    return np.where(np.isnan(values), 0.5, values)
