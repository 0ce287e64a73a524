"""Process-level setup shared by the recipes: logging and the translation of setup failures into one-line errors."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import transformers
from transformers import TrainerCallback, TrainingArguments

from .callbacks import LossHistoryCallback
from .hub import HubNotReadyError, check_hub_ready, keep_token_out_of_outputs
from .lr import apply_base_learning_rate
from .monitoring import MonitoringArguments, build_monitoring_callbacks
from .outputs import check_output_dir, resolve_resume_checkpoint

logger = logging.getLogger(__name__)


def setup_logging(args: TrainingArguments) -> None:
    """Rank-tagged log lines; replicas log warnings only unless asked (``--log_level_replica``)."""
    rank = args.process_index
    logging.basicConfig(
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    level = args.get_process_log_level()
    if args.should_log and args.log_level == "passive":
        level = logging.INFO  # the main process tells the user what it is doing
    logging.getLogger().setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # Library chatter (every config save, every shard) stays at WARNING unless the user asks for more.
    library_level = level if args.log_level not in ("passive",) else logging.WARNING
    datasets.utils.logging.set_verbosity(max(library_level, logging.WARNING))
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


@contextlib.contextmanager
def recipe_errors() -> Iterator[None]:
    """Bad input found while setting up (data, model, output folder, Hub) -> one line on stderr, exit status 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, HubNotReadyError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}") from None


@dataclass
class RunPlan:
    checkpoint: str | None  # checkpoint to resume from, if any
    lr_line: str  # how the learning rate was derived, for the log and the model card


def prepare_run(args: TrainingArguments) -> RunPlan:
    """Checks shared by every recipe, in the order that fails fastest, before anything is written:
    resume target, output folder, Hub access (token moved out of the saved arguments), batch-scaled learning rate."""
    checkpoint = resolve_resume_checkpoint(args)
    check_output_dir(args, args.overwrite_output_dir, resuming=checkpoint is not None)
    if args.push_to_hub:
        user = check_hub_ready(args)
        keep_token_out_of_outputs(args)
        logger.info("Hub ready: pushing as %s", user)
    lr_line = apply_base_learning_rate(args, getattr(args, "base_learning_rate", None))
    return RunPlan(checkpoint=checkpoint, lr_line=lr_line)


def build_recipe_callbacks(args: TrainingArguments, monitoring_args: MonitoringArguments) -> list[TrainerCallback]:
    """Callbacks every recipe installs: loss history, monitoring (profiler, alerts, logs, throughput)."""
    return [LossHistoryCallback(args.output_dir), *build_monitoring_callbacks(monitoring_args, args)]
