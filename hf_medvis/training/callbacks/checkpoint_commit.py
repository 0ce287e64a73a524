"""Marks each checkpoint complete once every rank has written it: the marker resume trusts (``checkpoints.py``).

``MedVisTrainer`` installs this callback and moves it to the end of the list when training starts, so the marker is
written after every other ``on_save`` (the stream position, ...) has added its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checkpoints import mark_complete


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointCommitCallback(TrainerCallback):
    """After every checkpoint save (and after the other callbacks' ``on_save``, which may add files), wait for all ranks,
    then mark the folder complete from the main process."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _barrier()  # every rank's shards (DeepSpeed writes one per rank) are on disk
        if state.is_world_process_zero and folder.is_dir():
            mark_complete(folder, state.global_step)
        _barrier()  # nobody moves on (or is killed by a preemption exit) before the marker exists
