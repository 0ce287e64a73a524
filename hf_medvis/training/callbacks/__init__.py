"""The Trainer callbacks of the recipes, and the one function that installs them (``build_recipe_callbacks``):
loss history, throughput, alerts, per-rank JSON logs, profiler, the optimizer read back, SIGTERM checkpoints, the
stream position saved with each checkpoint, early stopping."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments

from ...data.streaming import stream_control
from ...infra.jsonlog import install_json_log_handler
from ..args import MonitoringArguments, parse_step_range
from .alerts import AlertCallback
from .history import LossHistoryCallback
from .optimizer_report import OptimizerReportCallback
from .preemption import PreemptionCallback
from .profiler import ProfilerCallback
from .stream_state import StreamStateCallback
from .structured_log import StructuredLogCallback
from .throughput import ThroughputCallback

logger = logging.getLogger(__name__)


def build_recipe_callbacks(
    args: TrainingArguments,
    monitoring_args: MonitoringArguments,
    train_dataset: object | None = None,
    resume_from_checkpoint: str | None = None,
) -> list[TrainerCallback]:
    """Callbacks every recipe installs: loss history, monitoring (profiler, alerts, logs, throughput), the optimizer's
    lr read back at start, SIGTERM -> checkpoint (the recipe then calls ``preemption.exit_if_preempted``), for a
    shard stream the position it saves with each checkpoint, and early stopping when asked."""
    callbacks = [
        LossHistoryCallback(args.output_dir),
        *build_monitoring_callbacks(monitoring_args, args),
        OptimizerReportCallback(),
        PreemptionCallback(),
    ]
    if train_dataset is not None and stream_control(train_dataset) is not None:
        callbacks.append(StreamStateCallback(train_dataset, resume_from_checkpoint))
    patience = getattr(args, "early_stopping_patience", None)
    if patience is not None:
        callbacks.append(EarlyStoppingCallback(patience, getattr(args, "early_stopping_threshold", 0.0)))
    return callbacks


def build_monitoring_callbacks(args: MonitoringArguments, training_args: TrainingArguments) -> list[TrainerCallback]:
    """The callbacks the flags ask for, in the order they must run (throughput fills the logs the alerts read)."""
    output_dir = Path(training_args.output_dir or ".")
    rank = training_args.process_index
    callbacks: list[TrainerCallback] = []
    if args.throughput:
        callbacks.append(ThroughputCallback(args, training_args))
    if args.alerts:
        callbacks.append(AlertCallback(args, training_args))
        if training_args.logging_nan_inf_filter:
            logger.info(
                "logging_nan_inf_filter is on: NaN/inf step losses are hidden from logs; NaN alerts rely on grad_norm"
            )
    if args.structured_logs:
        # Installed now, not at train begin, so model loading and data preparation messages are captured too. Placed
        # after the throughput callback so the metrics line it writes carries images/s, TFLOP/s and data wait.
        handler = install_json_log_handler(output_dir / "logs", rank=rank)
        callbacks.append(StructuredLogCallback(handler))
    if args.profile_steps:
        callbacks.append(
            ProfilerCallback(parse_step_range(args.profile_steps), output_dir / "profile", rank, args.profile_top_ops)
        )
    return callbacks


__all__ = [
    "AlertCallback",
    "LossHistoryCallback",
    "OptimizerReportCallback",
    "ProfilerCallback",
    "StreamStateCallback",
    "StructuredLogCallback",
    "ThroughputCallback",
    "build_monitoring_callbacks",
    "build_recipe_callbacks",
]
