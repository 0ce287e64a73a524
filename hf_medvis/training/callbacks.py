"""Small Trainer callbacks used by every recipe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

LOSS_HISTORY_FILE = "loss_history.jsonl"


class LossHistoryCallback(TrainerCallback):
    """Appends every log record (loss, eval loss, lr, grad norm, ...) to ``output_dir/loss_history.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOSS_HISTORY_FILE
        self._start = time.time()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero and not args.resume_from_checkpoint and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh history; a resumed one appends

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self._start, 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
