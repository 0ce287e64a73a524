"""torch.profiler over a range of optimizer steps (``--profile_steps 10-15``): a TensorBoard trace per rank and a
table of the top operators."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


class ProfilerCallback(TrainerCallback):
    """torch.profiler over optimizer steps FIRST..LAST: a TensorBoard trace per rank in ``trace_dir`` and a table of
    the top operators (printed by the main process, saved per rank as top_ops-rank<R>.txt)."""

    def __init__(self, steps: tuple[int, int], trace_dir: str | os.PathLike, rank: int = 0, top_ops: int = 15) -> None:
        self.first, self.last = steps
        self.trace_dir = Path(trace_dir)
        self.rank = rank
        self.top_ops = top_ops
        self.profiler: torch.profiler.profile | None = None
        self.table: str | None = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if (
            self.profiler is None
            and self.table is None
            and state.global_step + 1 >= self.first
            and state.global_step < self.last
        ):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(
                activities=activities,
                record_shapes=True,
                profile_memory=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    str(self.trace_dir), worker_name=f"{socket.gethostname()}_rank{self.rank}"
                ),
            )
            self.profiler.start()
            logger.info("profiler started at step %d (until step %d)", state.global_step + 1, self.last)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.profiler is not None and state.global_step >= self.last:
            self._finish()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.profiler is not None:  # training ended inside the range
            self._finish()

    def _finish(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()  # writes the trace through on_trace_ready
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self.table = profiler.key_averages().table(sort_by=sort_by, row_limit=self.top_ops)
        (self.trace_dir / f"top_ops-rank{self.rank}.txt").write_text(self.table + "\n")
        if self.rank == 0:
            print(
                f"Top {self.top_ops} operators (profiled steps {self.first}-{self.last}), trace in {self.trace_dir}:\n{self.table}",
                flush=True,
            )
        logger.info("profiler trace written to %s", self.trace_dir)
