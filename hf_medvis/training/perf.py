"""Performance helpers shared by the training benchmark and the recipes: the accelerator's measured matmul peak (the
MFU denominator), peak-memory bookkeeping, and a check of the settings that cost throughput on a GPU."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


def measure_matmul_tflops(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10
) -> float | None:
    """Dense matmul rate of this GPU on random data (TFLOP/s): the MFU denominator used in ../shared/REFERENCE.md
    (764 measured on an H200 vs ~990 on the datasheet). None without CUDA: a CPU has no meaningful peak here."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device or "cuda")
    a = torch.randn(n, n, device=device, dtype=dtype)  # random, never zeros: zeros run faster than real data
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e12


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated by tensors since the last ``reset_peak_memory`` (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def throughput_warnings(args: Any) -> list[str]:
    """Settings of a TrainingArguments that add a host-device synchronisation per step or starve the GPU. Meant for a
    log line at start-up (recipes) and for the benchmark's report; empty on CPU-only hosts."""
    if not torch.cuda.is_available():
        return []
    found = []
    if getattr(args, "logging_nan_inf_filter", False):
        found.append("logging_nan_inf_filter=True: the Trainer checks every step's loss on the host (one sync per "
                     "micro-batch); set it false (NaN losses then show in the logged loss, which the alerts read)")
    accel = getattr(args, "accelerator_config", None)
    if accel is not None and not getattr(accel, "non_blocking", False):
        found.append("accelerator_config.non_blocking=False: each batch's host-to-device copy waits for the queued "
                     "step (a sync per step); set {\"non_blocking\": true} with dataloader_pin_memory")
    if getattr(args, "dataloader_num_workers", 0) == 0:
        found.append("dataloader_num_workers=0: batches are read and augmented in the training process")
    if not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
        found.append("no bf16: fp32 runs at ~0.6x the bf16 throughput of the Trainer (REFERENCE.md)")
    return found


class StepTimer:
    """Wall-clock timer that first drains the GPU queue, for coarse timings around whole phases (never per step)."""

    def __enter__(self) -> StepTimer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
