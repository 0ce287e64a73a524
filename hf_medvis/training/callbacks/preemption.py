"""Preemption-safe training: SIGTERM -> checkpoint at the next step boundary, then exit 0.

Spot / low-priority nodes get SIGTERM shortly before eviction (torchrun and accelerate forward it to every worker and
SIGKILL them ~30 s later). ``PreemptionCallback`` turns the signal into "save now, stop" at the next optimizer step; all
ranks agree on it (one tiny all-reduce per step; on CUDA read one step later, so it never drains the device queue) so
no rank waits in a collective the others left. The recipe then calls ``exit_if_preempted`` and the job's next attempt
runs the same command with ``--resume_from_checkpoint last``. The checkpoint counts once marked complete
(``checkpoint_commit.py``); the DataLoader workers leave SIGTERM to the training process (``worker_signals.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .common import find_callback

logger = logging.getLogger(__name__)


class PreemptionCallback(TrainerCallback):
    """SIGTERM (or the given signals) -> save a checkpoint at the next step boundary and stop training."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: int | None = None  # signal number, set by the handler
        self.stopped_at: int | None = None  # global step of the preemption checkpoint
        self._previous: dict[int, object] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None  # CUDA: last step's all-reduced flag, on its way

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the handler runs between two Python bytecodes, possibly inside a collective.
        self.received = signum

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM will not trigger a preemption checkpoint")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _any_rank_received(self, args: TrainingArguments) -> bool:
        """Whether any rank has the signal: the same answer on every rank at the same step. On CUDA the answer is the
        previous step's all-reduce, copied to pinned memory: reading it waits for the device to finish that step only,
        while this step's work stays queued (reading this step's value would drain the queue every step)."""
        flag = self.received is not None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        tensor = torch.full((1,), 1.0 if flag else 0.0, device=args.device)  # a fill, not a host-to-device copy
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        if tensor.device.type != "cuda":
            return bool(tensor.item())  # a CPU tensor (gloo): nothing to wait for
        host = torch.empty(1, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self._pending = self._pending, (done, host)
        if previous is None:
            return False
        previous[0].synchronize()
        return bool(previous[1].item())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stopped_at is None and self._any_rank_received(args):
            self.stopped_at = state.global_step
            control.should_save = True  # whatever save_strategy says: this checkpoint is what the restart resumes
            control.should_training_stop = True
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            logger.warning("%s received: saving checkpoint-%d and stopping", name, state.global_step)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self._pending = None


def exit_if_preempted(trainer: Trainer) -> None:
    """After ``trainer.train()``: if training stopped for a preemption, say so and exit 0 (the checkpoint is saved;
    final evaluation, saving and pushing belong to the run that finishes)."""
    callback = find_callback(trainer, PreemptionCallback)
    if callback is None or callback.stopped_at is None:
        return
    logger.warning(
        "preempted: checkpoint-%d saved in %s; rerun the same command with --resume_from_checkpoint last to continue",
        callback.stopped_at,
        trainer.args.output_dir,
    )
    raise SystemExit(0)
