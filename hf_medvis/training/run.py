"""A run's setup, shared by the recipes: logging, the environment report, the checks that fail fast before anything is
written (resume target, output folder, Hub, learning rate, DeepSpeed config), and setup failures as one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import TrainingArguments, set_seed

from ..core.errors import one_line
from ..core.storage import explain_storage_error, is_secret_name
from ..data.streaming import ShardReadError
from ..infra.env import collect_env_report, format_env_report
from .deepspeed_config import check_deepspeed_config
from .distributed import check_world_size
from .hub import HubNotReadyError, check_hub_ready, keep_token_out_of_outputs
from .lr import apply_base_learning_rate
from .outputs import (
    FINAL_RESULTS,
    check_output_dir,
    disable_evaluation_without_data,
    finished_run_step,
    resolve_resume_checkpoint,
    resume_requested,
)
from .reporting import resolve_reporters

logger = logging.getLogger(__name__)


def setup_logging(args: TrainingArguments) -> None:
    """Rank-tagged log lines; replicas log warnings only unless asked (``--log_level_replica``)."""
    rank = args.process_index
    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    log_format = f"%(asctime)s [node {node} rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        format=log_format,
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
    # transformers and DeepSpeed log through their own handlers: give them the rank-tagged format too.
    tagged = logging.Formatter(log_format, datefmt="%H:%M:%S")
    for name in ("transformers", "DeepSpeed"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(tagged)
    logging.captureWarnings(True)  # Python warnings become tagged log lines as well
    # DeepSpeed's ZeRO calls torch collectives that torch has since renamed: a FutureWarning per call site and rank, about
    # DeepSpeed's code, not the run. Everything else still shows.
    warnings.filterwarnings(
        "ignore",
        category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    )


@contextlib.contextmanager
def recipe_errors() -> Iterator[None]:
    """Bad input found while setting up (data, model, output folder, Hub) -> one line on stderr, exit status 1."""
    try:
        yield
    except Exception as err:
        message = explain_storage_error(err)  # refused credentials, bad names: the SDK's page reduced to one line
        if message is None and isinstance(err, _SETUP_INPUT_ERRORS):
            message = one_line(err)
        if message is None:
            raise
        raise one_line_exit(message) from None


def one_line_exit(message: str) -> SystemExit:
    """The exit of a run stopped by bad input or a failed write: ``recipe.py: error: <message>`` on stderr, status 1."""
    return SystemExit(f"{Path(sys.argv[0]).name}: error: {' '.join(message.split())}")


_SETUP_INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    HubNotReadyError,
    ShardReadError,
)


@dataclass
class RunSetup:
    """What ``setup_run`` decided, and every setting it changed on the way (``changes``: argument or environment
    variable -> (before, after)), so nothing a helper adjusts happens out of sight."""

    checkpoint: str | None  # checkpoint to resume from, if any
    lr_line: str  # how the learning rate was derived, for the log and the model card
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @contextlib.contextmanager
    def recording(self, args: TrainingArguments, why: str) -> Iterator[None]:
        """Records (and logs, in one line) what the enclosed code changes in ``args`` and the environment."""
        before_args, before_env = args.to_dict(), dict(os.environ)
        yield
        found = _changed(before_args, args.to_dict())
        found.update({f"${k}": v for k, v in _changed(before_env, dict(os.environ)).items()})
        self.changes.update(found)
        if found and args.should_log:
            logger.info("%s changed: %s", why, describe_changes(found))


def setup_run(args: TrainingArguments, launch_environment: dict[str, tuple[Any, Any]] | None = None) -> RunSetup:
    """Everything a recipe does between parsing its arguments and reading data: rank-tagged logging, the environment
    report, then the checks that fail fastest before anything is written (world size, resume target, output folder,
    Hub access, batch-scaled learning rate, DeepSpeed config, reporters) and the seed. Bad input ends the run in one
    line. Returns the resume checkpoint, the learning-rate line, and what was changed (also logged): the arguments it
    adjusted and the environment variables set for this run, ``launch_environment`` (``setup_distributed_env``'s
    return) included."""
    setup_logging(args)
    log_environment(args)
    run = RunSetup(checkpoint=None, lr_line="")
    if launch_environment:
        run.changes.update({f"${k}": v for k, v in _without_secrets(launch_environment).items()})
        if args.should_log:
            logger.info("launch changed: %s", describe_changes(run.changes))
    with recipe_errors(), run.recording(args, "run setup"):
        check_world_size(args)
        run.checkpoint = resolve_resume_checkpoint(args)
        # With --resume_from_checkpoint last and no complete checkpoint yet (a first attempt stopped before its first
        # save), the folder holds that attempt's leftovers: start fresh in it.
        check_output_dir(args, args.overwrite_output_dir, resuming=resume_requested(args))
        finished = finished_run_step(args, run.checkpoint)
        if finished is not None:  # a restart of a job that already finished: change nothing
            logger.info(
                "%s holds a finished run (step %d, %s): nothing to do. Raise --max_steps / --num_train_epochs to train "
                "on, or pass another --output_dir",
                args.output_dir,
                finished,
                FINAL_RESULTS,
            )
            raise SystemExit(0)
        if args.push_to_hub:
            user = check_hub_ready(args)
            keep_token_out_of_outputs(args)
            logger.info("Hub ready: pushing as %s", user)
        run.lr_line = apply_base_learning_rate(args, getattr(args, "base_learning_rate", None))
        deepspeed_line = check_deepspeed_config(args)  # after the lr is final: "auto" is filled with it
        if deepspeed_line:
            logger.info("%s", deepspeed_line)
        resolve_reporters(args)  # --report_to: azure_ml means MLflow; a missing package fails here
        set_seed(args.seed)
    return run


def fit_run_to_data(run: RunSetup, args: TrainingArguments, train_dataset: Any, eval_dataset: Any) -> None:
    """The arguments the data decides (a stream has no length; no evaluation set means no evaluation), recorded in
    ``run.changes`` and logged like the setup's."""
    with recipe_errors(), run.recording(args, "the data"):
        configure_stream_loading(args, train_dataset)
        disable_evaluation_without_data(args, eval_dataset)


def _changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = sorted(before.keys() | after.keys())
    return _without_secrets(
        {key: (before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)}
    )


def _without_secrets(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    # A credential's value never reaches a log or the returned record: only that it was set or cleared.
    return {
        key: ("<set>" if old else old, "<set>" if new else new) if is_secret_name(key) else (old, new)
        for key, (old, new) in changes.items()
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``learning_rate 0.0001 -> 0.0003; $DS_ACCELERATOR None -> cpu`` (``$`` marks an environment variable)."""
    return "; ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())


def configure_stream_loading(args: TrainingArguments, train_dataset: Any) -> None:
    """A streamed training set has no length: it needs ``--max_steps``. Under several processes each rank reads its
    own shards: the training stream is split by node when loaded and MedVisTrainer keeps accelerate from sharding it
    again; a streamed validation set is sharded by accelerate, which needs batches not dispatched from rank 0."""
    if hasattr(train_dataset, "__len__"):
        return
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError(
            "--max_steps must be set (> 0) when --train_data is a prepared-shard stream (it has no length)"
        )
    if args.world_size > 1:
        args.accelerator_config.dispatch_batches = False


def log_environment(args: TrainingArguments) -> None:
    """The environment report (versions, GPUs, known-bad combinations) at the top of every run's log."""
    if not args.should_log:
        return
    report = collect_env_report(include_deepspeed_ops=bool(args.deepspeed))
    logger.info("environment:\n%s", format_env_report(report))


def match_model_to_data(config: Any, image_input: dict[str, Any] | None) -> None:
    """A model trained on colour or multi-window images records how they were read (``config.hf_medvis_input``), so
    ``hf-medvis predict``/``evaluate`` read new images the same way; a 1-channel model cannot take 3-channel data."""
    if image_input is None:
        return
    if image_input["channels"] == 3 and getattr(config, "num_channels", 3) != 3:
        raise ValueError(
            f"the training images have 3 channels (colour or 3 CT windows), the model {config.num_channels}: "
            "use --num_channels 3"
        )
    config.hf_medvis_input = dict(image_input)
