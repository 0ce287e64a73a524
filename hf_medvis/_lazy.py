"""Lazy package exports (PEP 562): ``from hf_medvis.data import build_datasets`` works, while importing one light
module of the package (``hf_medvis.core.storage`` for the ``hf-medvis`` command) does not import torch and datasets."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` resolving each name in ``exports`` from its submodule on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(importlib.import_module(package), name, value)  # resolved once
        return value

    return __getattr__
