"""The architecture presets (``presets.json`` beside this module): the one reader, so training and ``hf-medvis size``
mean the same model by a name."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load_presets() -> dict[str, dict[str, Any]]:
    """Preset name -> config fields (ViTMAEConfig's; a classifier drops the ``decoder_*`` ones). Shared: copy to edit."""
    data = json.loads(resources.files(__package__).joinpath("presets.json").read_text())
    return {name: spec for name, spec in data.items() if not name.startswith("_")}


def preset_names() -> list[str]:
    return sorted(load_presets())
