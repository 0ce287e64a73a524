"""Worker processes of a pool that die with the process that started them, one thread each."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import torch


def init_pool_worker(parent_pid: int) -> None:
    """Pool worker initializer: one thread per worker (N workers on N cores; torch would otherwise start a thread per
    core in each), and no worker outlives its parent."""
    torch.set_num_threads(1)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive a killed parent (``prepare`` would leave it writing shards, then
    block forever on a result queue nobody reads). Linux: the kernel sends SIGKILL when the parent dies; elsewhere, and
    as a backstop, a thread checks every second whether the parent is still ours."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
