"""Performance helpers shared by the training benchmark and the recipes: the accelerator's measured matmul peak (the
MFU denominator) and peak-memory bookkeeping."""

from __future__ import annotations

import logging

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
