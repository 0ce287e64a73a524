"""``loss_history.jsonl``: every log record of a run (loss, eval metrics, lr, grad norm), one line per step across
resumed attempts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...core.storage import write_text_atomic

LOSS_HISTORY_FILE = "loss_history.jsonl"


class LossHistoryCallback(TrainerCallback):
    """Appends every log record (loss, eval loss, lr, grad norm, ...) to ``output_dir/loss_history.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOSS_HISTORY_FILE
        self._start = time.time()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        if state.global_step == 0:  # a fresh run (or a first attempt started again) starts a fresh history
            self.path.unlink()
            return
        # Resumed: keep what was logged up to the checkpoint; steps after it (lost with the interrupted attempt) are
        # trained again and logged again.
        kept = "".join(
            line
            for line in self.path.read_text().splitlines(keepends=True)
            if _logged_step(line) is not None and _logged_step(line) <= state.global_step
        )
        write_text_atomic(self.path, kept)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self._start, 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    """The step of one history line; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
