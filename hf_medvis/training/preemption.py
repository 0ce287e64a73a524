"""Preemption-safe training: SIGTERM -> checkpoint at the next step boundary and exit 0; checkpoints that resume trusts.

Spot / low-priority nodes get SIGTERM shortly before eviction (torchrun and accelerate forward it to every worker and
SIGKILL them ~30 s later). ``PreemptionCallback`` turns the signal into "save now, stop" at the next optimizer step; all
ranks agree on it (one tiny all-reduce per step; on CUDA read one step later, so it never drains the device queue) so
no rank waits in a collective the others left. The recipe then calls ``exit_if_preempted`` and the job's next attempt
runs the same command with ``--resume_from_checkpoint last``.

A checkpoint folder counts only once it holds ``checkpoint_complete.json``, written by rank 0 after every rank has
finished writing (``CheckpointCommitCallback``, installed last by ``MedVisTrainer``). A crash or SIGKILL mid-save leaves a
folder without it, which ``last_complete_checkpoint`` skips. The marker also records every file of the checkpoint with
its size, so a checkpoint damaged later (a copy cut short, a file lost) is found before resuming from it: sizes, the
headers of safetensors and torch zip files, the JSON files parsed; nothing is loaded (``checkpoint_problem``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..data.storage import write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in a checkpoint folder, but the marker and hidden temp files."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith(".")
    }


def mark_complete(checkpoint_dir: str | os.PathLike, global_step: int) -> None:
    """Writes the marker atomically (it exists whole or not at all), with the size of every file the save wrote."""
    folder = Path(checkpoint_dir)
    record = {"global_step": global_step, "time": time.time(), "files": _checkpoint_files(folder)}
    write_json_atomic(folder / COMPLETE_MARKER, record)


def mark_incomplete(checkpoint_dir: str | os.PathLike) -> None:
    """Before (re)writing into a folder: until the new save is whole, it must not look complete."""
    marker = Path(checkpoint_dir) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / COMPLETE_MARKER).is_file()


def _size_change(name: str, actual: int, recorded: int) -> str:
    if actual < recorded:
        return f"a truncated {name} ({actual:,} of {recorded:,} bytes)"
    return f"a changed {name} ({actual:,} bytes, {recorded:,} when saved)"


def _safetensors_problem(path: Path) -> str | None:
    """The 8-byte header length, the JSON header, and the end of its last tensor against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if size < 8 or length > size - 8:
            return f"a truncated {path.name} ({size:,} bytes, shorter than its header)"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"an unreadable {path.name} (its header is not safetensors JSON)"
    expected = 8 + length + end
    return None if expected == size else _size_change(path.name, size, expected)


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose central directory is at the end: a file cut short has none. Opening the
    archive reads that directory only (``testzip`` would read everything)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # torch's legacy pickle format, or not ours: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as archive:
            last = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"a truncated or damaged {path.name} (no zip central directory)"
    return None if last <= path.stat().st_size else f"a truncated {path.name}"


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return f"an unreadable {path.name} (not JSON)"
    return None


_FORMAT_CHECKS = {".safetensors": _safetensors_problem, ".json": _json_problem}
_FORMAT_CHECKS.update(dict.fromkeys((".pt", ".pth", ".bin"), _torch_file_problem))


def _layout_problem(folder: Path) -> str | None:
    """The files a resume reads whatever the layout: the Trainer's state, and the weights (one safetensors file, an
    index and the shards it names, or DeepSpeed's ``latest`` and the ``global_stepN`` folder it names)."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    latest = folder / "latest"
    if latest.is_file():  # DeepSpeed: its engine state, per rank, in the folder ``latest`` names
        tag = latest.read_text().strip()
        if not tag or not (folder / tag).is_dir() or not any((folder / tag).iterdir()):
            return f"no DeepSpeed folder {tag or '(latest is empty)'}"
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"an unreadable {index.name}"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        return f"no {missing[0]} (named in {index.name})" if missing else None
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return "no model.safetensors"
    return None


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from, as words that follow "the checkpoint has", naming the file
    (``"no checkpoint_complete.json (...)"``, ``"a truncated model.safetensors (1,000 of 2,000 bytes)"``); None when it
    is sound. Cheap whatever the checkpoint's size: sizes, file headers and small JSON files are read, no tensor."""
    folder = Path(checkpoint_dir)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (interrupted while saving, or not written by hf_medvis)"
    try:
        recorded = json.loads(marker.read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return f"an unreadable {COMPLETE_MARKER}"
    try:
        for name, size in recorded.items():  # what the save wrote (markers of older versions list nothing)
            path = folder / name
            if not path.is_file():
                return f"no {name} (it had one when saved)"
            if path.stat().st_size != size:
                return _size_change(name, path.stat().st_size, size)
        problem = _layout_problem(folder)
        if problem is not None:
            return problem
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            check = _FORMAT_CHECKS.get(path.suffix)
            problem = check(path) if check is not None and path.name != COMPLETE_MARKER else None
            if problem is not None:
                return problem
    except OSError as err:
        return f"a file that cannot be read ({err.strerror or type(err).__name__}: {err.filename})"
    return None


def numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders, newest first."""
    found = ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)))
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` that is complete and readable (``checkpoint_problem``); each newer one that is
    not (half-written by a crash, truncated, a file lost) is named in one warning line, with what is wrong, and
    skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    for _step, path in numbered_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("%s has %s: not resuming from it", path.name, problem)
    return None


class CheckpointCommitCallback(TrainerCallback):
    """After every checkpoint save (and after the other callbacks' ``on_save``, which may add files), wait for all ranks,
    then mark the folder complete from the main process."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _barrier()  # every rank's shards (DeepSpeed writes one per rank) are on disk
        if state.is_world_process_zero and folder.is_dir():
            mark_complete(folder, state.global_step)
        _barrier()  # nobody moves on (or is killed by a preemption exit) before the marker exists


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


_PARENT_EXITING = None  # shared-memory flag, set when this (training) process shuts down normally


def _parent_exiting() -> torch.Tensor:
    global _PARENT_EXITING
    if _PARENT_EXITING is None:
        _PARENT_EXITING = torch.zeros((), dtype=torch.uint8).share_memory_()
        # atexit runs in reverse order of registration: this runs before multiprocessing's own exit handler, which
        # stops daemonic children (DataLoader workers) with SIGTERM and waits for them.
        atexit.register(_PARENT_EXITING.fill_, 1)
    return _PARENT_EXITING


class _WorkerSigterm:
    """DataLoader ``worker_init_fn``: SIGTERM belongs to the training process, which saves and stops. torchrun,
    Kubernetes and Azure ML also deliver it to the DataLoader workers, and torch's worker handler dies of any SIGTERM
    not sent by its parent: the training process then raises "DataLoader worker ... is killed by signal: Terminated" in
    the middle of its preemption checkpoint. So a worker ignores SIGTERM, unless its parent is shutting down (the
    parent's exit stops workers with SIGTERM); it also ends when its loader is done or its parent is gone.

    A worker is forked with SIGTERM blocked (``_start_with_sigterm_blocked``) and unblocks it here, once this handler
    is in place: a signal that arrives while a new epoch's workers start (torch installs its own handler before it
    calls ``worker_init_fn``) waits for this handler instead of killing the worker."""

    def __init__(self, previous: Callable[[int], None] | None, parent_exiting: Any) -> None:
        self.previous, self.parent_exiting = previous, parent_exiting

    def __call__(self, worker_id: int) -> None:
        exiting = self.parent_exiting

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if exiting.item():
                os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a signal that came during start-up runs now
        if self.previous is not None:
            self.previous(worker_id)


class _StartWithSigtermBlocked:
    """A DataLoader's ``_get_iterator`` (which forks the workers) run with SIGTERM blocked in the calling thread: the
    workers inherit the blocked signal until ``_WorkerSigterm`` unblocks it; here a SIGTERM that came meanwhile is
    delivered, to the preemption handler, as soon as the workers are started."""

    def __init__(self, get_iterator: Callable[[], Any]) -> None:
        self.get_iterator = get_iterator

    def __call__(self) -> Any:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return self.get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def workers_ignore_sigterm(loader: DataLoader) -> DataLoader:
    """Makes ``loader``'s worker processes leave SIGTERM to the training process (``_WorkerSigterm``), from the moment
    they are forked (``_StartWithSigtermBlocked``); returns it."""
    target = vars(loader).get("base_dataloader", loader)  # accelerate's wrappers iterate the DataLoader they hold
    current = getattr(target, "worker_init_fn", None)
    if getattr(target, "num_workers", 0) > 0 and not isinstance(current, _WorkerSigterm):
        target.worker_init_fn = _WorkerSigterm(current, _parent_exiting())
        target._get_iterator = _StartWithSigtermBlocked(target._get_iterator)
    return loader


def find_callback(trainer: Trainer, kind: type) -> TrainerCallback | None:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, kind):
            return callback
    return None


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
