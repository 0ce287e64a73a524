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
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..core.errors import first_line, one_line
from .deepspeed_config import load_deepspeed_config


class RecipeArgumentError(SystemExit):
    """A bad argument. Uncaught, the interpreter prints the one-line message to stderr and exits with status 1."""

    def __init__(self, message: str) -> None:
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
            raise RecipeArgumentError(
                f"config file {config_path}: unknown key '{key}' (not an argument of this recipe)"
            )
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
        raise RecipeArgumentError(f"--config: {path} is not valid YAML: {first_line(err)}") from None
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
        raise RecipeArgumentError(one_line(err)) from None


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """TrainingArguments plus what every recipe adds: a config file, a batch-scaled lr, and an overwrite guard."""

    config: str | None = field(
        default=None, metadata={"help": "YAML file whose keys are argument names; command-line flags override it."}
    )
    base_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "If set, learning_rate = base_learning_rate x global batch / 256, where the global batch is "
            "per-device batch x gradient accumulation x world size at run time."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: images are decoded on access by the dataset transform."}
    )
    # The Trainer's default for a PreTrainedModel is to search for unused parameters at every DDP step (an extra
    # autograd traversal, and a warning from every rank): ViT-MAE and the ViT classifiers use all of theirs, and frozen
    # ones (linear probe) are not handed to DDP.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: look for parameters without gradients at every step (default off)."}
    )
    # TrainingArguments types it str-or-list, which its parser reads as one word: several reporters need a list.
    report_to: list[str] | None = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Where metrics go: mlflow, tensorboard (both: --report_to mlflow tensorboard), azure_ml (= mlflow, "
            "which Azure ML shows for the job), any other transformers integration, 'all' or 'none'."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # set in code, or 'mlflow,tensorboard'
            self.report_to = [self.report_to]
        if self.report_to is not None:
            self.report_to = [name.strip() for item in self.report_to for name in item.split(",") if name.strip()]
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

    return torch.cuda.is_available()


@dataclass
class PretrainingArguments(RecipeTrainingArguments):
    output_dir: str | None = field(default="outputs/pretrain_mae", metadata={"help": "Where outputs are written."})


@dataclass
class FinetuningArguments(RecipeTrainingArguments):
    output_dir: str | None = field(default="outputs/finetune_vit", metadata={"help": "Where outputs are written."})
    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise lr decay: block i trains at lr x decay^(L - i) (MAE: 0.65 for "
            "ViT-B; X-ray MAE: 0.55); 1 disables."
        },
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improving --metric_for_best_model."}
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Minimum improvement that counts."})
    # TrainingArguments.label_names names the *input keys* holding labels; here --label_names names the classes, as
    # the interface asks. __post_init__ moves the classes to ``classes`` and restores the input key.
    label_names: list[str] | None = field(
        default=None, metadata={"help": "Classes to learn, in order (default: every finding in the training labels)."}
    )
    classes: list[str] | None = field(default=None, metadata={"help": "Internal: set from --label_names."})

    def __post_init__(self) -> None:
        if self.label_names and self.label_names != ["labels"]:
            self.classes = list(self.label_names)
        self.label_names = ["labels"]
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        super().__post_init__()
        if self.early_stopping_patience is not None and not (
            self.load_best_model_at_end and self.metric_for_best_model
        ):
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end and --metric_for_best_model")


def parse_step_range(text: str) -> tuple[int, int]:
    """'10-15' → (10, 15); '12' → (12, 12). Steps are optimizer steps, counted from 1, both ends included."""
    first, sep, last = text.strip().partition("-")
    try:
        start, end = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--profile_steps expects FIRST-LAST optimizer steps (e.g. 10-15), got '{text}'") from None
    if start < 1 or end < start:
        raise ValueError(f"--profile_steps needs 1 <= FIRST <= LAST, got '{text}'")
    return start, end


@dataclass
class MonitoringArguments:
    """Flags shared by both recipes for debugging and watching a run."""

    profile_steps: str | None = field(
        default=None,
        metadata={"help": "Record torch.profiler over these optimizer steps, e.g. '10-15': TensorBoard trace in "
                  "output_dir/profile and a top-operator table printed at the end of the range."},
    )  # fmt: skip
    profile_top_ops: int = field(default=15, metadata={"help": "Rows in the profiler's top-operator table."})
    structured_logs: bool = field(
        default=True,
        metadata={"help": "Write per-rank JSON-line logs (time, node, rank, step, level, message) to output_dir/logs; "
                  "search them with `hf-medvis logs`."},
    )  # fmt: skip
    throughput: bool = field(
        default=True,
        metadata={"help": "Log images/s, achieved TFLOP/s per GPU, MFU and data-wait %% at each logging step, and a "
                  "summary at the end (output_dir/throughput.json)."},
    )  # fmt: skip
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak TFLOP/s of one accelerator for MFU (default: vendor figure for known GPUs)."},
    )
    flops_per_sample: float | None = field(
        default=None, metadata={"help": "Training FLOPs per image (forward + backward); default: counted on the model."}
    )
    alerts: bool = field(default=True, metadata={"help": "Check logged metrics for problems and raise alerts."})
    alert_webhook: str | None = field(
        default=None, metadata={"help": "POST each alert as JSON to this URL (Teams/Slack-style {'text': ...})."}
    )
    stop_on_alert: bool = field(default=False, metadata={"help": "Stop training (on all ranks) after an alert."})
    alert_loss_spike: float = field(
        default=3.0, metadata={"help": "Alert when the loss exceeds this multiple of its moving median."}
    )
    alert_loss_window: int = field(default=20, metadata={"help": "Logged losses in the moving median."})
    alert_throughput_drop: float = field(
        default=0.5, metadata={"help": "Alert when images/s falls below (1 - this) x its moving median."}
    )
    alert_data_wait: float = field(
        default=0.5, metadata={"help": "Alert when the fraction of step time spent waiting for data exceeds this."}
    )
    alert_memory: float = field(
        default=0.95, metadata={"help": "Alert when accelerator memory in use exceeds this fraction of its capacity."}
    )

    def __post_init__(self) -> None:
        if self.profile_steps:
            parse_step_range(self.profile_steps)
        if self.profile_top_ops < 1 or self.alert_loss_window < 2:
            raise ValueError("--profile_top_ops must be >= 1 and --alert_loss_window >= 2")
        if self.alert_loss_spike <= 1:
            raise ValueError(f"--alert_loss_spike must be > 1, got {self.alert_loss_spike}")
        for name in ("alert_throughput_drop", "alert_data_wait", "alert_memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"--{name} must be in (0, 1], got {value}")
        if self.alert_webhook and urllib.parse.urlsplit(self.alert_webhook).scheme not in ("http", "https"):
            raise ValueError("--alert_webhook must be an http(s) URL")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError("--peak_tflops must be > 0")


def precision_name(args: TrainingArguments) -> str:
    """bf16, fp16 or fp32: the arithmetic the run trains in."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
