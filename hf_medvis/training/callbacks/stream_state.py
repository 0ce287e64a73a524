"""Saves the shard stream's position with every Trainer checkpoint and restores it on resume, so the interrupted
epoch continues with exactly the samples it had not yet delivered (none twice, none lost).

Why the Trainer's own resume is not enough for a streamed ``IterableDataset``: it has no length, so after a resume the
Trainer restarts its epoch count at 0 and fast-forwards by *all* steps trained, through the wrong epoch's order, decoding
every skipped batch. This callback records the stream's own epoch and the batches consumed in it
(``stream_state.json`` in the checkpoint folder), turns the Trainer's skip off, and makes each DataLoader worker drop
the samples it had already delivered before they are decoded (``hf_medvis.data.streaming.StreamControl``).

Use with non-persistent DataLoader workers (the default), the same world size, worker count, batch size and data: a
resume that differs in one of them is refused before training starts (``check_resume``), naming the values.
Under several processes only rank 0 writes the record: the ranks step together (MedVisTrainer ends an epoch on all
ranks at once), so its epoch and step count hold for every rank, and each rank's twin replays its own node split.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...core import storage
from ...data.streaming import StreamControl, drive_epochs, resume_position, stream_control
from ..outputs import ResumeMismatchError

logger = logging.getLogger(__name__)

STATE_FILE = "stream_state.json"


def _datasets_in(loader: Any) -> list:
    """The dataset objects a (possibly accelerate-wrapped) DataLoader iterates, outermost first."""
    found, obj, seen = [], loader, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        obj = getattr(obj, "dataset", None)
        if obj is not None and hasattr(obj, "set_epoch"):
            found.append(obj)
    return found


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """True on every rank when it is True on one (one collective; resume only)."""
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([1 if flag else 0], device=args.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        flag = bool(tensor.item())
    return flag


class StreamStateCallback(TrainerCallback):
    """Pass the dataset that ``load_image_dataset`` returned for training; a map-style dataset makes this a no-op
    (the Trainer's own resume is exact for those). ``resume_from_checkpoint``: the folder being resumed, when it is
    not ``output_dir/checkpoint-<global_step>``."""

    def __init__(self, train_dataset: Any, resume_from_checkpoint: str | None = None) -> None:
        self.control: StreamControl | None = stream_control(train_dataset)
        self.dataset = train_dataset
        self.resume_from_checkpoint = resume_from_checkpoint
        self._epoch = -1
        self._epoch_start_step = 0
        self._resumed_pass = False

    def _checkpoint_dir(self, args: TrainingArguments, state: TrainerState) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.control is None:
            return
        for dataset in [self.dataset, *_datasets_in(train_dataloader)]:
            if type(dataset).__name__ == "IterableDataset":
                drive_epochs(dataset, self.control)
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            logger.warning(
                "persistent DataLoader workers keep an old copy of the stream: epochs and resume are not exact"
            )
        self._epoch, self._epoch_start_step, self._resumed_pass = -1, state.global_step, False
        if state.global_step == 0:
            return
        folder = self.resume_from_checkpoint or self._checkpoint_dir(args, state)
        saved = self.check_resume(args, folder)
        if saved is None:
            logger.warning("no %s in %s: the stream restarts its epoch (samples may repeat)", STATE_FILE, folder)
            args.ignore_data_skip = True  # the Trainer's own skip cannot position a stream (it counts all epochs)
            return
        batches = saved["steps_in_epoch"] * args.gradient_accumulation_steps
        position = resume_position(
            self.control,
            epoch=saved["epoch"],
            batches=batches,
            batch_size=args.per_device_train_batch_size,
            num_workers=args.dataloader_num_workers,
            drop_last=args.dataloader_drop_last,
        )
        # We position the stream; the Trainer must not also skip (it would count from the wrong epoch).
        args.ignore_data_skip = True
        # Ranks stop an epoch together as soon as one runs out (MedVisTrainer), so the epoch ended if it did on any.
        if _any_rank(position.epoch_ended, args):
            # Saved exactly at the end of an epoch: the next pass is the next epoch, from its start. (Replaying the
            # finished epoch would give an empty pass, which the Trainer takes for the end of the data.)
            self._epoch, self._epoch_start_step = saved["epoch"], state.global_step
            logger.info(
                "stream resumes at the start of epoch %d (the checkpoint ended epoch %d)",
                saved["epoch"] + 1,
                saved["epoch"],
            )
            return
        self.control.skip, self.control.resume_order = position.skip, position.order
        self.control.skip_epoch = saved["epoch"]
        self._epoch = saved["epoch"] - 1
        self._epoch_start_step = state.global_step - saved["steps_in_epoch"]
        self._resumed_pass = True
        logger.info("stream resumes epoch %d after %d batches", saved["epoch"], batches)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.control is None:
            return
        self._epoch += 1
        if self._resumed_pass:
            self._resumed_pass = False  # this pass continues the checkpoint's epoch
        else:
            self._epoch_start_step = state.global_step
        self.control.epoch = self._epoch

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.control is None or not state.is_world_process_zero:
            return
        folder = self._checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            return
        record = {
            "epoch": self._epoch,
            "steps_in_epoch": state.global_step - self._epoch_start_step,
            "global_step": state.global_step,
            "fingerprint": self._position_fingerprint(args),
        }
        storage.write_bytes_atomic(os.path.join(folder, STATE_FILE), (json.dumps(record, indent=1) + "\n").encode())

    def check_resume(self, args: TrainingArguments, checkpoint: str | os.PathLike) -> dict | None:
        """The stream position saved in ``checkpoint`` (None when it has none, or the data is not a stream); raises
        ``ResumeMismatchError`` naming each value in which this run differs from the run that saved it (batch size,
        workers, world size, data, seed...): its position means other samples here. Reads one small file."""
        path = os.path.join(checkpoint, STATE_FILE)
        if self.control is None or not os.path.exists(path):
            return None
        with open(path) as f:
            saved = json.load(f)
        recorded = saved["fingerprint"]
        differences = [
            f"{key} {_shown(key, recorded.get(key))} in the checkpoint, {_shown(key, value)} now"
            for key, value in self._position_fingerprint(args).items()
            if recorded.get(key) != value
        ]
        if differences:
            raise ResumeMismatchError(
                f"cannot resume the shard stream from {Path(checkpoint).name}: this run differs from the one that "
                f"saved it in {'; '.join(differences)}; resume with the checkpoint's values, or start a new run in "
                "another --output_dir"
            )
        return saved

    def _position_fingerprint(self, args: TrainingArguments) -> dict:
        return {
            **self.control.position_fingerprint(),
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "dataloader_num_workers": args.dataloader_num_workers,
            "dataloader_drop_last": args.dataloader_drop_last,
        }


def _shown(key: str, value: Any) -> str:
    """A fingerprint value, a checksum by its first characters."""
    return str(value)[:12] if key.endswith("sha256") and value else str(value)
