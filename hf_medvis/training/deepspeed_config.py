"""Checks a DeepSpeed config against the run before anything is trained, with DeepSpeed's and transformers' own code.

Without this, a bad config surfaces late: an unknown top-level key is silently ignored by DeepSpeed (a typo such as
``zero_optimisation`` trains without ZeRO); a mismatch between a literal value and TrainingArguments is raised only when
the Trainer starts; fp16 + bf16 or an impossible ZeRO stage fail inside ``deepspeed.initialize``.

How: "auto" values are filled exactly as the Trainer fills them (``HfTrainerDeepSpeedConfig``), then the result is parsed by
``deepspeed.runtime.config.DeepSpeedConfig`` (pydantic sections reject unknown nested keys and bad stages; the batch
triple and fp16/bf16 are asserted there). Top-level keys that DeepSpeed never read while parsing are unknown to it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.integrations import deepspeed as hf_ds
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

from ..core.errors import one_line

# Values the Trainer fills only once it knows the model and the step count (trainer_config_finalize); any integer
# stands in for "auto" while parsing.
_LATE_AUTO_KEYS = {
    ("zero_optimization", "reduce_bucket_size"): 1,
    ("zero_optimization", "stage3_prefetch_bucket_size"): 1,
    ("zero_optimization", "stage3_param_persistence_threshold"): 1,
    ("scheduler", "params", "total_num_steps"): 1,
    ("scheduler", "params", "warmup_num_steps"): 1,
}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot work for this run; the message names the file and the key."""


class _ReadTrackingDict(dict):
    """Records the top-level keys DeepSpeed reads. ``copy.copy`` (which DeepSpeedConfig does) shares the record."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def deepspeed_config_source(args: TrainingArguments) -> str | dict | None:
    """The config this run will use: ``--deepspeed`` or accelerate's ``deepspeed_config_file``; None without DeepSpeed."""
    if getattr(args, "deepspeed", None):
        return args.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    return None


def load_deepspeed_config(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """(config dict, name for messages). JSON only: DeepSpeed's hjson would also accept comments, but the Trainer and
    accelerate read the file with ``json``."""
    if isinstance(source, dict):
        return copy.deepcopy(source), "the DeepSpeed config"
    path = Path(source)
    name = f"DeepSpeed config {path}"
    if not path.is_file():
        raise DeepSpeedConfigError(f"{name}: file not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{name}: must hold a JSON object")
    return config, name


@contextlib.contextmanager
def _keep_transformers_ds_reference() -> Iterator[None]:
    # Building an HfTrainerDeepSpeedConfig re-points transformers' global weakref (used by from_pretrained and
    # is_deepspeed_zero3_enabled) at our temporary copy; put the run's own back.

    saved = hf_ds._hf_deepspeed_config_weak_ref
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def fill_like_trainer(config: dict, args: TrainingArguments) -> tuple[dict, list[str]]:
    """("auto" filled from ``args`` as the Trainer does, mismatches between literal values and ``args``)."""
    with _keep_transformers_ds_reference():
        hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
        hf_config.trainer_config_process(args)
    filled = hf_config.config
    for path, stand_in in _LATE_AUTO_KEYS.items():
        node = filled
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) == "auto":
            node[path[-1]] = stand_in
    return filled, [line.lstrip("- ") for line in hf_config.mismatches]


def _remaining_auto(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [k for key, value in config.items() for k in _remaining_auto(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []


def validate_deepspeed_config(source: str | os.PathLike | dict, args: TrainingArguments) -> dict:
    """Returns the config with "auto" filled for ``args``; raises DeepSpeedConfigError naming the problem."""
    from deepspeed.runtime.config import (
        DeepSpeedConfig,
    )  # here: importing DeepSpeed costs seconds; --deepspeed runs only

    raw, name = load_deepspeed_config(source)
    filled, mismatches = fill_like_trainer(raw, args)
    if mismatches:
        raise DeepSpeedConfigError(
            f'{name} contradicts the training arguments: {"; ".join(mismatches)} (set these to "auto")'
        )
    leftover = _remaining_auto(filled)
    if leftover:
        raise DeepSpeedConfigError(f'{name}: the Trainer cannot fill "auto" for {", ".join(leftover)}')
    tracked = _ReadTrackingDict(filled)
    try:
        DeepSpeedConfig(tracked)
    except Exception as err:  # DeepSpeed raises AssertionError, ValueError, pydantic errors, its own config errors
        raise DeepSpeedConfigError(f"{name}: {one_line(err)}") from None
    unknown = sorted(set(raw) - tracked.read)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(tracked.read), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise DeepSpeedConfigError(f"{name}: unknown key {', '.join(hints)}; DeepSpeed would ignore it")
    return filled


def check_deepspeed_config(args: TrainingArguments) -> str | None:
    """Validates the run's DeepSpeed config, if any; returns a one-line description for the start-of-run log."""
    source = deepspeed_config_source(args)
    if source is None:
        return None
    filled = validate_deepspeed_config(source, args)
    zero = filled.get("zero_optimization", {})
    offload = [
        part for part in ("optimizer", "param") if zero.get(f"offload_{part}", {}).get("device") not in (None, "none")
    ]
    precision = (
        "bf16" if filled.get("bf16", {}).get("enabled") else "fp16" if filled.get("fp16", {}).get("enabled") else "fp32"
    )
    where = source if isinstance(source, str) else "dict"
    return f"DeepSpeed ZeRO-{zero.get('stage', 0)} ({where}), {precision}" + (
        f", offload {'+'.join(offload)}" if offload else ""
    )


def prefer_torch_adam_without_cuda(config: dict) -> bool:
    """On a host without CUDA (CPU runs, CI), DeepSpeed's Adam variants are C++ ops JIT-compiled at first use (~100 s
    per machine and per install path) that bring nothing over torch's AdamW there: ask DeepSpeed for torch's optimizer.
    GPU hosts keep FusedAdam. An explicit ``torch_adam`` in the file is respected. Returns whether it changed."""
    optimizer = config.get("optimizer")
    if torch.cuda.is_available() or not isinstance(optimizer, dict):
        return False
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return False
    params = optimizer.setdefault("params", {})
    if "torch_adam" in params:
        return False
    params["torch_adam"] = True
    return True
