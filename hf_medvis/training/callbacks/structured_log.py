"""Per-rank JSON-line logs: keeps the handler's step current and records each metrics line (main process)."""

from __future__ import annotations

import json
import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...infra.jsonlog import JsonLinesHandler

logger = logging.getLogger(__name__)


class StructuredLogCallback(TrainerCallback):
    """Keeps the JSON-line handler's step current and records each metrics log line (main process)."""

    def __init__(self, handler: JsonLinesHandler) -> None:
        self.handler = handler

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.handler.step = state.global_step + 1  # the step being run

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.handler.step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and state.is_world_process_zero:
            logger.info("metrics %s", json.dumps(logs, default=float), extra={"step": state.global_step})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logger.info("training ended at step %d", state.global_step, extra={"step": state.global_step})
