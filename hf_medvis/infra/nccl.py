"""Collective-communication check in the manner of nccl-tests: correctness against known answers, then timing.

Definitions (nccl-tests, see docs/infra.md): for a message of S bytes taking t seconds, algbw = S / t and
busbw = algbw × factor, with factor 2(n−1)/n for all-reduce, (n−1)/n for all-gather and reduce-scatter (S is then the
whole gathered / scattered array) and 1 for broadcast and reduce.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..core.launch_env import DistributedEnv, normalize_distributed_env

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NotDistributedError(RuntimeError):
    """Raised when the process was not started by a distributed launcher."""


def busbw_factor(op: str, world_size: int) -> float:
    """nccl-tests' bus-bandwidth factor, so that busbw is comparable to the hardware link speed for any rank count."""
    return collective(op).busbw_factor(world_size)


def size_sweep(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """Message sizes min, min×factor, … up to max (inclusive), as nccl-tests' -b/-e/-f."""
    if min_bytes <= 0 or max_bytes < min_bytes:
        raise ValueError(f"need 0 < --min-bytes <= --max-bytes, got {min_bytes} and {max_bytes}")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def parse_bytes(text: str) -> int:
    """'1K', '64KiB', '1M', '1G', '4096' → bytes (binary multiples, as nccl-tests)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1] if value and value[-1] in "KMG" else ""
    number = value[: len(value) - len(unit)]
    try:
        result = int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"not a byte size: '{text}' (examples: 1024, 64K, 1M, 1G)") from None
    if result <= 0:
        raise ValueError(f"byte size must be positive: '{text}'")
    return result


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def require_launch(environ: dict[str, str] | None = None) -> DistributedEnv:
    """The launch this process is part of, its MPI / Azure ML variables also written as torch's (as the recipes do);
    raises NotDistributedError when RANK, WORLD_SIZE, MASTER_ADDR or MASTER_PORT is missing."""
    env = os.environ if environ is None else environ
    launch = normalize_distributed_env(env)
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if launch is None or missing:
        raise NotDistributedError(
            f"not launched distributed ({', '.join(missing)} not set): run it under a launcher, e.g. "
            "torchrun --nproc_per_node 2 $(which hf-medvis) nccl-check"
        )
    return launch


def init_distributed(
    backend: str = "auto", timeout_s: float = 300.0, environ: dict[str, str] | None = None, store: Any = None
) -> DistributedContext:
    """Joins the process group described by the launcher's environment (torchrun, accelerate launch, Azure ML), over
    ``store`` when given (a c10d Store every rank already reached), else over the env:// rendezvous."""
    launch = require_launch(environ)
    local_rank = launch.local_rank
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA GPUs; none are visible (use --backend gloo on CPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if store is not None:
        kwargs.update(store=store, rank=launch.rank, world_size=launch.world_size)
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator eagerly, so a broken fabric fails here, not mid-sweep
    dist.init_process_group(**kwargs)
    # Count nodes from the ranks' host names: not every launcher sets LOCAL_WORLD_SIZE.
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    world_size = dist.get_world_size()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=max(1, world_size // len(set(hosts))),
        backend=backend,
        device=device,
    )


class Watchdog:
    """Fails loudly when a collective has not returned within ``timeout_s``.

    The process-group timeout alone is not enough: NCCL reports it from its own watchdog after a delay, and some hangs
    (a rank that never joins) block in places the timeout does not cover. ``on_timeout`` defaults to printing one line
    and ``os._exit(3)``; a blocked collective cannot be interrupted from Python any other way.
    """

    def __init__(self, timeout_s: float, rank: int, on_timeout: Callable[[str], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self.on_timeout = on_timeout or self._exit
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nccl-check-watchdog", daemon=True)
        self._thread.start()

    @staticmethod
    def _exit(message: str) -> None:
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        os._exit(3)

    def arm(self, what: str) -> None:
        with self._lock:
            self._what, self._deadline = what, time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
                if expired:
                    self._deadline = None
            if expired:
                self.on_timeout(
                    f"hf-medvis nccl-check: error: rank {self.rank}: {what} did not complete within {self.timeout_s:g} s "
                    "(a rank is missing, stuck or the network is down; check NCCL_DEBUG=INFO output)"
                )


@dataclass
class CollectiveResult:
    op: str
    size_bytes: int
    count: int  # elements per rank in the input buffer
    dtype: str
    time_us: float  # median over iterations, averaged across ranks
    algbw_gbps: float
    busbw_gbps: float
    correct: bool
    max_error: float = 0.0


def nccl_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if k.startswith("NCCL_")}


def nccl_version() -> str | None:
    if not torch.cuda.is_available() and torch.version.cuda is None:
        return None
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


@dataclass(frozen=True)
class Collective:
    """One collective: its bus-bandwidth factor, buffer shapes, call, and the answer it must give on patterned input.

    Every rank fills its input with ``_pattern(numel, rank, offset)``; ``expected(numel, rank, n, device)`` is what this
    rank must then read back in ``out`` (None where the output is undefined: non-root ranks of reduce)."""

    name: str
    busbw_factor: Callable[[int], float]  # nccl-tests' factor for n ranks
    call: Callable[[torch.Tensor, torch.Tensor], None]  # (out, inp)
    expected: Callable[[int, int, int, torch.device], torch.Tensor | None]
    in_fraction: bool = False  # input is 1/n of the whole array (all_gather)
    out_fraction: bool = False  # output is 1/n of the whole array (reduce_scatter)

    @property
    def in_place(self) -> bool:
        return not (self.in_fraction or self.out_fraction)


def _summed(numel: int, n: int, device: torch.device) -> torch.Tensor:
    """The sum over ranks of their patterns: rank 0's pattern times sum(rank + 1)."""
    return _pattern(numel, 0, 0, device) * (n * (n + 1) / 2)


def _reduce_scatter_expected(numel: int, rank: int, n: int, device: torch.device) -> torch.Tensor:
    chunk = numel // n
    return _summed(numel, n, device)[rank * chunk : (rank + 1) * chunk]


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, inp)


def _ring(n: int) -> float:
    return (n - 1) / n


_COLLECTIVES: dict[str, Collective] = {
    c.name: c
    for c in (
        Collective(
            "all_reduce",
            lambda n: 2 * _ring(n),
            lambda out, inp: dist.all_reduce(inp),
            lambda numel, rank, n, device: _summed(numel, n, device),
        ),
        Collective(
            "all_gather",
            _ring,
            _all_gather,
            # each rank's input continues the pattern where the previous rank's ends (see check_collective)
            lambda numel, rank, n, device: torch.cat([_pattern(numel, r, r * numel, device) for r in range(n)]),
            in_fraction=True,
        ),
        Collective("reduce_scatter", _ring, _reduce_scatter, _reduce_scatter_expected, out_fraction=True),
        Collective(
            "broadcast",
            lambda n: 1.0,
            lambda out, inp: dist.broadcast(inp, src=0),
            lambda numel, rank, n, device: _pattern(numel, 0, 0, device),  # rank 0's data
        ),
        Collective(
            "reduce",
            lambda n: 1.0,
            lambda out, inp: dist.reduce(inp, dst=0),
            lambda numel, rank, n, device: _summed(numel, n, device) if rank == 0 else None,
        ),
    )
}
COLLECTIVES: tuple[str, ...] = tuple(_COLLECTIVES)


def collective(op: str) -> Collective:
    try:
        return _COLLECTIVES[op]
    except KeyError:
        raise ValueError(f"unknown collective '{op}' (choose from {', '.join(COLLECTIVES)})") from None


def _buffers(
    op: Collective, size_bytes: int, n: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input and output buffers for one message size. Returns (input, output, elements per rank in input)."""
    elt = torch.tensor([], dtype=dtype).element_size()
    total = max(n, size_bytes // elt // n * n)  # whole array, divisible by the rank count
    inp = torch.empty(total // n if op.in_fraction else total, dtype=dtype, device=device)
    out = inp if op.in_place else torch.empty(total // n if op.out_fraction else total, dtype=dtype, device=device)
    return inp, out, inp.numel()


def _pattern(numel: int, rank: int, offset: int, device: torch.device) -> torch.Tensor:
    """Small integers (exact in bf16/fp16 after summing a few ranks): value = (rank + 1) × (1 + (offset + i) mod 3)."""
    idx = torch.arange(offset, offset + numel, device=device, dtype=torch.float64)
    return (rank + 1) * (1 + torch.remainder(idx, 3))


def check_collective(op: str, inp: torch.Tensor, out: torch.Tensor, rank: int, n: int) -> float:
    """Runs ``op`` once on patterned data and returns the largest absolute error against the known answer
    (0.0 on ranks whose output is undefined, e.g. non-root ranks of reduce)."""
    spec, numel = collective(op), inp.numel()
    inp.copy_(_pattern(numel, rank, rank * numel if spec.in_fraction else 0, inp.device))
    expected = spec.expected(numel, rank, n, inp.device)
    spec.call(out, inp)
    if expected is None:
        return 0.0
    return float((out.to(torch.float64) - expected).abs().max().item())


def _tolerance(dtype: torch.dtype, n: int) -> float:
    # Values are at most 3·n(n+1)/2; allow a few units in the last place of that magnitude.
    return 4 * torch.finfo(dtype).eps * 3 * n * (n + 1) / 2


class _Timer:
    """Per-iteration timing: CUDA events on GPU (no host sync inside the loop), a host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time_iterations(self, fn: Callable[[], None], iters: int) -> list[float]:
        if self.cuda:
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
            ]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) * 1e3 for start, end in events]  # ms → µs
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()  # gloo collectives on CPU tensors return when complete
            times.append((time.perf_counter() - t0) * 1e6)
        return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_collectives(
    ctx: DistributedContext,
    ops: Sequence[str],
    sizes: Sequence[int],
    dtype: str = "float32",
    iters: int = 20,
    warmup: int = 5,
    watchdog: Watchdog | None = None,
) -> Iterator[CollectiveResult]:
    """Yields one result per (collective, size), identical on every rank (times are averaged across ranks)."""
    torch_dtype = DTYPES[dtype]
    n = ctx.world_size
    timer = _Timer(ctx.device)
    for op in ops:
        spec = collective(op)
        factor = spec.busbw_factor(n)
        for size in sizes:
            what = f"{op} of {format_bytes(size)}"
            if watchdog:
                watchdog.arm(what)
            inp, out, count = _buffers(spec, size, n, torch_dtype, ctx.device)
            max_error = check_collective(op, inp, out, ctx.rank, n)
            # Timed buffers hold zeros: in-place repeated sums would otherwise overflow fp16 / produce denormals on CPU.
            inp.zero_()
            for _ in range(warmup):
                spec.call(out, inp)
            _sync(ctx.device)
            dist.barrier()
            times = timer.time_iterations(lambda spec=spec, inp=inp, out=out: spec.call(out, inp), iters)
            stats = torch.tensor([statistics.median(times), max_error, 0.0], dtype=torch.float64, device=ctx.device)
            ok = max_error <= _tolerance(torch_dtype, n)
            stats[2] = 0.0 if ok else 1.0
            # One reduction carries the mean time, the worst error and whether any rank failed.
            summed = stats.clone()
            dist.all_reduce(summed)
            worst = stats.clone()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if watchdog:
                watchdog.disarm()
            time_us = float(summed[0]) / n
            bytes_moved = (count * n if spec.in_fraction else count) * inp.element_size()
            algbw = bytes_moved / (time_us * 1e-6) / 1e9 if time_us > 0 else float("inf")
            yield CollectiveResult(
                op=op,
                size_bytes=bytes_moved,
                count=count,
                dtype=dtype,
                time_us=time_us,
                algbw_gbps=algbw,
                busbw_gbps=algbw * factor,
                correct=float(worst[2]) == 0.0,
                max_error=float(worst[1]),
            )
            del inp, out
