"""DataLoader workers that leave SIGTERM to the training process (``workers_ignore_sigterm``).

On SIGTERM the training process saves a checkpoint and stops (``callbacks/preemption.py``); ``MedVisTrainer`` applies
``workers_ignore_sigterm`` to each of its DataLoaders so their workers do not die of the same signal meanwhile."""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch.utils.data import DataLoader

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
