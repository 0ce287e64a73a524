"""Loading saved weights back into a live model exactly, or failing.

transformers 5.x saves ViT / ViTMAE weights under their legacy names (``vit.encoder.layer.0.attention.attention.query``)
and maps them to the module names (``vit.layers.0.attention.q_proj``) only inside ``from_pretrained``. The Trainer's own
reloads (``_load_from_checkpoint`` on resume, ``_load_best_model``) call ``load_state_dict(strict=False)`` on the file
as saved: every renamed tensor is reported as a warning and skipped, and training goes on from the weights the model
had. Here the folder goes through ``from_pretrained`` (the same name conversion, whatever the transformers version)
and the result is copied in with a strict load; any key that does not match is an error naming the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PretrainedConfig
from transformers.utils import logging as hf_logging

from ..core.errors import one_line
from .linear_probe import is_linear_probe

logger = logging.getLogger(__name__)


class WeightLoadError(ValueError):
    """Saved weights that do not match the model they are loaded into."""


@contextlib.contextmanager
def own_load_report() -> Iterator[None]:
    """Around a ``from_pretrained(..., output_loading_info=True)`` whose caller reports (or refuses) what did not load:
    transformers' own LOAD REPORT warning table would say the same thing a second time, as a WARNING."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The ``classifier.*`` tensors of a checkpoint's safetensors file(s), without the prefix."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    head: dict[str, torch.Tensor] = {}
    for name in files:
        head.update(
            {k[len("classifier.") :]: v for k, v in load_file(folder / name).items() if k.startswith("classifier.")}
        )
    return head


def load_saved_weights(model: torch.nn.Module, folder: str | os.PathLike) -> int:
    """Copies the weights saved in ``folder`` (``save_pretrained`` / a Trainer checkpoint) into ``model`` in place.

    Every tensor of ``model`` must be in the folder and every tensor of the folder must belong to ``model``, with the
    same shape; otherwise ``WeightLoadError``. Returns the number of tensors loaded."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise WeightLoadError(f"{folder}: no model.safetensors (not a complete checkpoint?)")
    # A linear probe's checkpoint holds its BatchNorm + linear head (classifier.0.*, classifier.1.*): the fresh model of
    # from_pretrained has a plain linear head, so the head's tensors are read from the files, the encoder's as usual.
    probe = is_linear_probe(model)
    try:
        with own_load_report():  # its missing/unexpected table: we raise below instead
            saved, info = type(model).from_pretrained(
                folder, config=model.config, use_safetensors=True, output_loading_info=True, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: a damaged file
        raise WeightLoadError(f"{folder}: cannot load the saved weights: {one_line(err)[:300]}") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        if probe and kind != "mismatched_keys":
            keys = [k for k in keys if not k.startswith("classifier.")]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({_names(keys)})")
    if problems:
        raise WeightLoadError(f"{folder}: saved weights do not match the model: {'; '.join(problems)}")
    state = saved.state_dict()
    if probe:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state.update({f"classifier.{k}": v for k, v in _head_tensors(folder).items()})
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightLoadError(
            f"{folder}: saved weights do not match the model: missing {_names(result.missing_keys)}; "
            f"unexpected {_names(result.unexpected_keys)}"
        )
    logger.info("loaded %d tensors from %s", len(state), folder)
    return len(state)


# Config values that fix the shapes of the saved tensors, or what each output means: a checkpoint that differs in one
# of them holds another model, whose weights cannot continue this one's training.
SHAPE_KEYS = (
    "model_type",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
)


def _label_names(config: dict) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict):
        return None
    return [str(name) for _, name in sorted((int(k), v) for k, v in id2label.items())]


def saved_model_differences(config: PretrainedConfig, folder: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """(key, saved value, this config's value) for each architecture value (``SHAPE_KEYS``, and the class names) in
    which the model saved in ``folder`` (its ``config.json``) differs from ``config``; [] when they match or the folder
    has no readable config. Reads one small JSON file, no weights."""
    try:
        saved = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    current = config.to_dict()
    differences = [(k, saved.get(k), current.get(k)) for k in SHAPE_KEYS if saved.get(k) != current.get(k)]
    saved_labels, labels = _label_names(saved), _label_names(current)
    if saved_labels is not None and labels is not None and saved_labels != labels:
        differences.append(("labels", ",".join(saved_labels), ",".join(labels)))
    return differences
