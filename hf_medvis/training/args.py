"""Recipe argument parsing: HfArgumentParser dataclasses plus ``--config FILE.yaml`` whose keys are the argument names.

Precedence: command-line flags > config file > dataclass defaults. The YAML is turned into ``--key value`` tokens placed
before the real command line, so argparse's "last one wins" gives the precedence and every value goes through the same
type conversion and validation as a flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .deepspeed_config import load_deepspeed_config


class RecipeArgumentError(SystemExit):
    """A bad argument. Uncaught, the interpreter prints the one-line message to stderr and exits with status 1."""

    def __init__(self, message: str):
        self.message = message if message.startswith(_prog()) else f"{_prog()}: error: {message}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _prog() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "hf_medvis"


class RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line naming the argument, not a page of usage."""

    def error(self, message: str) -> NoReturn:
        raise RecipeArgumentError(message)


def _yaml_to_tokens(config: dict[str, Any], known: set[str], config_path: str) -> list[str]:
    tokens: list[str] = []
    for key, value in config.items():
        if key == "config":
            raise RecipeArgumentError(f"config file {config_path}: 'config' cannot be nested")
        if key not in known:
            raise RecipeArgumentError(f"config file {config_path}: unknown key '{key}' (not an argument of this recipe)")
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            tokens += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            tokens += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            tokens += [flag, json.dumps(value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def _flags_given(argv: Sequence[str], known: set[str]) -> set[str]:
    """Argument names present on a command line (``--name value`` or ``--name=value``)."""
    names = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    return {name for name in names if name in known}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeArgumentError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RecipeArgumentError(f"--config: {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeArgumentError(f"--config: {path} must hold a mapping of argument names to values")
    return data


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, default_config: str | os.PathLike | None = None
) -> tuple:
    """Parses ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config FILE.yaml`` may appear anywhere; its keys must be argument names of the given dataclasses. Without it,
    ``default_config`` (if given) is used.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeArgumentParser(dataclass_types)
    known = {action.dest for action in parser._actions if action.dest != "help"}

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre_args, rest = pre.parse_known_args(argv)
    if pre_args.config is None and default_config is not None:
        pre_args.config = os.fspath(default_config)
    config: dict[str, Any] = load_config_file(pre_args.config) if pre_args.config else {}
    given = _flags_given(rest, known)
    for rate, other in (("learning_rate", "base_learning_rate"), ("base_learning_rate", "learning_rate")):
        # A learning rate on the command line replaces the config's way of setting it; both at once is ambiguous.
        if rate in given and other in given:
            raise RecipeArgumentError("give --learning_rate or --base_learning_rate, not both")
        if rate in given and other in config:
            config = {k: v for k, v in config.items() if k != other}
    if "learning_rate" in config and "base_learning_rate" in config and config["base_learning_rate"] is not None:
        raise RecipeArgumentError(f"config file {pre_args.config}: set learning_rate or base_learning_rate, not both")
    tokens = _yaml_to_tokens(config, known, pre_args.config) if config else []
    # Let the parser see which config was used (recipes record it in the model card).
    if "config" in known and pre_args.config:
        rest = [*rest, "--config", pre_args.config]
    try:
        return parser.parse_args_into_dataclasses(args=tokens + rest, look_for_args_file=False)
    except ValueError as err:  # unknown arguments, or a dataclass __post_init__ check
        message = " ".join(str(err).split())
        raise RecipeArgumentError(message) from None


@dataclass
class DataArguments:
    """Where the images are. Without ``--train_data`` the embedded phantom chest X-ray set is used."""

    train_data: str | None = field(
        default=None,
        metadata={"help": "Training images: a folder, glob or fsspec URL (az://, abfs://, file://) of PNG/JPEG/DICOM files, "
                  "or a prepared-shard location. Default: the embedded synthetic chest X-ray phantoms."},
    )
    validation_data: str | None = field(
        default=None, metadata={"help": "Held-out images (same forms). Default: a patient-level holdout of --train_data."}
    )
    labels_file: str | None = field(
        default=None, metadata={"help": "NIH-style labels CSV (Image Index, Patient ID, Finding Labels, ...). "
                                "Default: labels.csv beside the images, if any."}
    )
    storage_options: str | None = field(
        default=None, metadata={"help": "JSON dict of fsspec storage options (credentials are never logged)."}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of patients held out when --validation_data is not given."}
    )
    image_mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean (1 value or one per channel). Default: the checkpoint's, "
                                "else X-ray statistics."}
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Normalisation std (see --image_mean)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    phantom_patients: int = field(default=200, metadata={"help": "Patients in the embedded phantom set."})

    def __post_init__(self) -> None:
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )
        if self.storage_options:
            try:
                parsed = json.loads(self.storage_options)
            except json.JSONDecodeError:
                # Do not echo the value: it usually holds credentials.
                raise ValueError("--storage_options must be a JSON object (value not shown)") from None
            if not isinstance(parsed, dict):
                raise ValueError("--storage_options must be a JSON object (value not shown)")
        if self.phantom_patients < 2:
            raise ValueError(f"--phantom_patients must be >= 2, got {self.phantom_patients}")

    def parsed_storage_options(self) -> dict | None:
        return json.loads(self.storage_options) if self.storage_options else None


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """TrainingArguments plus what every recipe adds: a config file, a batch-scaled lr, and an overwrite guard."""

    config: str | None = field(
        default=None, metadata={"help": "YAML file whose keys are argument names; command-line flags override it."}
    )
    base_learning_rate: float | None = field(
        default=None,
        metadata={"help": "If set, learning_rate = base_learning_rate x global batch / 256, where the global batch is "
                  "per-device batch x gradient accumulation x world size at run time."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: images are decoded on access by the dataset transform."}
    )

    def __post_init__(self) -> None:
        if self.base_learning_rate is not None and self.base_learning_rate <= 0:
            raise ValueError(f"--base_learning_rate must be > 0, got {self.base_learning_rate}")
        if self.base_learning_rate is None and not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.deepspeed and isinstance(self.deepspeed, str):
            # TrainingArguments reads it next with an error that names neither the file nor the flag.
            try:
                load_deepspeed_config(self.deepspeed)
            except ValueError as err:
                raise ValueError(f"--deepspeed: {err}") from None
        if self.dataloader_pin_memory and not _cuda_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every epoch otherwise
        super().__post_init__()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
