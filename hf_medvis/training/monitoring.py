"""Training observability switched on by recipe flags: profiler, metric alerts, per-rank structured logs, throughput.

(The issue-6 work fills this module; the recipes already build their callbacks through ``build_monitoring_callbacks``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainerCallback, TrainingArguments


@dataclass
class MonitoringArguments:
    """Flags shared by both recipes for debugging and watching a run."""


def build_monitoring_callbacks(args: MonitoringArguments, training_args: TrainingArguments) -> list[TrainerCallback]:
    return []
