"""The architecture presets (``presets.json`` beside this module): the one reader, so training and ``hf-medvis size``
mean the same model by a name."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .tasks import MAE, check_task


@cache
def load_presets() -> dict[str, dict[str, Any]]:
    """Preset name -> config fields (ViTMAEConfig's; fine-tuning drops the ``decoder_*`` ones). Shared: copy to edit."""
    data = json.loads(resources.files(__package__).joinpath("presets.json").read_text())
    return {name: spec for name, spec in data.items() if not name.startswith("_")}


def preset_names() -> list[str]:
    return sorted(load_presets())


def preset_fields(name: str, task: str) -> dict[str, Any]:
    """A fresh copy of preset ``name``'s config fields for ``task``: only MAE pretraining has the MAE decoder
    (``decoder_*``); a classifier or a segmenter (whose own decoder is set by the recipe) has none.
    A ValueError naming the presets for an unknown name."""
    check_task(task)
    presets = load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset '{name}' (choose from {', '.join(sorted(presets))})")
    fields = dict(presets[name])
    if task != MAE:
        fields = {key: value for key, value in fields.items() if not key.startswith("decoder_")}
    return fields
