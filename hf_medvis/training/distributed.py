"""One distributed environment whatever launched us: torchrun / ``accelerate launch``, Azure ML's PyTorch distribution, or
an MPI launch (Azure ML's MPI distribution, ``mpirun``).

torch.distributed and accelerate read RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; MPI
launchers set OMPI_COMM_WORLD_* and Azure ML's AZ_BATCH_MASTER_NODE / AZ_BATCHAI_MPI_MASTER_NODE instead.
``setup_distributed_env`` translates them (and NODE_RANK) into torch's names before the process group starts, i.e. at the
top of a recipe's ``main``, before TrainingArguments are built; ``hf_medvis.core.launch_env`` reads them. Local rank picks
the device (accelerate does that); global rank decides who writes (``is_world_process_zero``).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from transformers import TrainingArguments

from ..core.launch_env import (
    DistributedEnvError,
    detect_distributed_env,
    normalize_distributed_env,
    rank_and_world_size,
)


def setup_distributed_env(environ: MutableMapping[str, str] | None = None) -> dict[str, tuple[str | None, str]]:
    """What a recipe calls first: normalise the launcher's variables, and make multi-process CPU launches real.
    Returns the variables it set, as ``{name: (before, after)}``, for ``setup_run`` to log with the run's other changes."""
    env = os.environ if environ is None else environ
    before = dict(env)
    if not torch.cuda.is_available():
        # DeepSpeed would pick the CPU itself, with a WARNING in every process saying it could not find a GPU.
        env.setdefault("DS_ACCELERATOR", "cpu")
    detected = normalize_distributed_env(env)
    if detected is not None and detected.world_size > 1:
        use_gloo_without_accelerators()
        atexit.register(_destroy_process_group)
    return {key: (before.get(key), value) for key, value in env.items() if before.get(key) != value}


def _destroy_process_group() -> None:
    # A process group left to the interpreter's teardown can abort the process after a finished run (gloo's threads:
    # "terminate called without an active exception", SIGABRT), which a launcher reports as a failed rank. The same
    # holds for communication handles that outlive the run in reference cycles (DeepSpeed ZeRO-3's parameter prefetch
    # keeps async all-gathers): collect them while the interpreter is whole, then end the group.
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_distributed_process(status: int = 0) -> None:
    """The last call of a recipe run as one of several processes, after ``main`` returned: every exit handler runs
    (loggers flushed, reporters closed, the process group ended), then the process exits without the interpreter's
    teardown. That teardown is where, now and then, a native thread still owned by gloo or DeepSpeed aborted a
    finished rank ("terminate called without an active exception", SIGABRT), which the launcher reports as a failed
    run. A single process returns and exits normally."""
    if rank_and_world_size()[1] <= 1:
        return
    atexit._run_exitfuncs()  # the handlers a normal exit runs, _destroy_process_group included
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def use_gloo_without_accelerators() -> None:
    """On a host without GPUs (CI, laptops), accelerate picks no backend for a torchrun or DeepSpeed launch that did not
    pass ``--use_cpu``: every process then trains alone with world size 1 while DeepSpeed itself sees the real world
    size. Make such a launch a gloo process group on CPU, as ``--use_cpu`` would, but keep DeepSpeed usable.

    No public switch does this: ``--use_cpu`` / ``ACCELERATE_USE_CPU`` pick gloo but also turn DeepSpeed off
    (accelerate's state takes the DeepSpeed path only ``if not cpu``), and CPU DeepSpeed is what laptops and CI run.
    ``tests/test_trainer_overrides.py`` fails by name if accelerate renames or re-signs the method wrapped here."""
    original = PartialState._prepare_backend
    if getattr(original, "_hf_medvis_cpu_fallback", False):
        return

    def prepare_backend(
        self: PartialState, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None
    ) -> tuple[str | None, DistributedType]:
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        launched = rank_and_world_size()[1] > 1  # setup_distributed_env has written the launch as torch's variables
        if chosen is None and kind == DistributedType.NO and launched:
            _skip_deepspeed_cpu_shm_op()
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    prepare_backend._hf_medvis_cpu_fallback = True  # type: ignore[attr-defined]
    PartialState._prepare_backend = prepare_backend


def _skip_deepspeed_cpu_shm_op() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~70 s of CPU) that only its inference path uses;
    # a gloo training run does not need it. HF_MEDVIS_DS_SHM_COMM=1 keeps it.
    if os.environ.get("HF_MEDVIS_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops  # here, not at the top: importing DeepSpeed costs seconds, and only this launch needs it

    compatible = deepspeed.ops.__compatible_ops__  # a module-level dict DeepSpeed keeps; edits persist
    compatible["deepspeed_shm_comm"] = False


def rank_tag(environ: MutableMapping[str, str] | None = None) -> str:
    """``node N rank R`` for log lines (rank 0 node 0 for a single process)."""
    detected = detect_distributed_env(environ)
    if detected is None:
        return "node 0 rank 0"
    return f"node {detected.node_rank} rank {detected.rank}"


def check_world_size(args: TrainingArguments) -> None:
    """A launch of N processes that trains with world size 1 (e.g. ``accelerate launch --cpu --num_processes N`` on some
    setups) would silently run N independent copies; stop before anything is written."""
    launched = rank_and_world_size()[1]
    if launched > 1 and args.world_size != launched:
        raise DistributedEnvError(
            f"the launcher started {launched} processes (WORLD_SIZE) but training sees world size {args.world_size}; "
            "each process would train alone. On CPU use torchrun or `accelerate launch --multi_gpu`"
        )
