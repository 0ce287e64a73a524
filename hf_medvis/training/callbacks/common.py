"""Small helpers shared by the callbacks: log records, and finding a callback on a Trainer."""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState


def is_training_log(logs: dict[str, Any]) -> bool:
    """A log record of training steps (not evaluation, not the end-of-training summary)."""
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def add_to_log(state: TrainerState, logs: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Adds ``metrics`` to the log being delivered (the reporters after us, console, structured logs) and to its copy
    in ``state.log_history`` (trainer_state.json). Only numbers: reporters drop anything else with a WARNING."""
    logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def find_callback(trainer: Trainer, kind: type) -> TrainerCallback | None:
    """The first of ``trainer``'s callbacks that is a ``kind`` (transformers' ``pop_callback`` removes it; this does
    not)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, kind):
            return callback
    return None
