"""One distributed environment whatever launched us: torchrun / ``accelerate launch``, Azure ML's PyTorch distribution, or
an MPI launch (Azure ML's MPI distribution, ``mpirun``).

torch.distributed and accelerate read RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; MPI
launchers set OMPI_COMM_WORLD_* and Azure ML's AZ_BATCH_MASTER_NODE / AZ_BATCHAI_MPI_MASTER_NODE instead.
``setup_distributed_env`` translates them (and NODE_RANK) into torch's names before the process group starts, i.e. at the
top of a recipe's ``main``, before TrainingArguments are built. Local rank picks the device (accelerate does that);
global rank decides who writes (``is_world_process_zero``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Azure ML's documented MASTER_PORT for MPI jobs whose master variable carries no port (AZ_BATCHAI_MPI_MASTER_NODE).
AML_MPI_DEFAULT_PORT = "54965"
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedEnvError(ValueError):
    """Launcher variables that cannot describe a valid process group."""


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    node_rank: int
    master_addr: str | None
    master_port: str | None
    source: str  # "torch" (torchrun, accelerate, Azure ML PyTorch) or "mpi"

    def torch_vars(self) -> dict[str, str]:
        values = {
            "RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank,
            "LOCAL_WORLD_SIZE": self.local_world_size, "NODE_RANK": self.node_rank,
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": self.master_port,
        }
        return {key: str(value) for key, value in values.items() if value is not None}


def _int(env: MutableMapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedEnvError(f"{name}={raw!r} is not an integer") from None


def _check(env: DistributedEnv) -> DistributedEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise DistributedEnvError(f"rank {env.rank} is outside world size {env.world_size} ({env.source} launch)")
    if env.local_world_size is not None and not 0 <= env.local_rank < env.local_world_size:
        raise DistributedEnvError(
            f"local rank {env.local_rank} is outside local world size {env.local_world_size} ({env.source} launch)"
        )
    if env.world_size > 1 and env.master_port is not None and not env.master_port.isdigit():
        raise DistributedEnvError(f"master port {env.master_port!r} is not a port number ({env.source} launch)")
    return env


def _from_torch(env: MutableMapping[str, str]) -> DistributedEnv:
    world_size = _int(env, "WORLD_SIZE", 1)
    local_world_size = _int(env, "LOCAL_WORLD_SIZE")
    rank = _int(env, "RANK", 0)
    local_rank = _int(env, "LOCAL_RANK", rank if local_world_size in (None, world_size) else None)
    if local_rank is None:
        raise DistributedEnvError("RANK is set but LOCAL_RANK is not; the launcher must say which device is ours")
    # torchrun calls the node index GROUP_RANK; Azure ML and accelerate call it NODE_RANK.
    node_rank = _int(env, "NODE_RANK", _int(env, "GROUP_RANK"))
    if node_rank is None:
        node_rank = rank // local_world_size if local_world_size else 0
    return _check(DistributedEnv(rank, world_size, local_rank, local_world_size, node_rank,
                                 env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torch"))


def _from_mpi(env: MutableMapping[str, str]) -> DistributedEnv:
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
    local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if env.get("AZ_BATCH_MASTER_NODE"):  # "addr:port"
        master_addr, _, master_port = env["AZ_BATCH_MASTER_NODE"].rpartition(":")
        if not master_addr:
            raise DistributedEnvError(f"AZ_BATCH_MASTER_NODE={env['AZ_BATCH_MASTER_NODE']!r} is not 'address:port'")
        addr, port = addr or master_addr, port or master_port
    elif env.get("AZ_BATCHAI_MPI_MASTER_NODE"):  # address only
        addr, port = addr or env["AZ_BATCHAI_MPI_MASTER_NODE"], port or AML_MPI_DEFAULT_PORT
    if addr is None:
        if local_world_size != world_size:
            raise DistributedEnvError(
                "multi-node MPI launch without a master address: set MASTER_ADDR, AZ_BATCH_MASTER_NODE "
                "or AZ_BATCHAI_MPI_MASTER_NODE"
            )
        addr = "127.0.0.1"  # one node: rank 0 is on this machine
    port = port or "29500"
    return _check(DistributedEnv(rank, world_size, local_rank, local_world_size, rank // max(local_world_size, 1),
                                 addr, port, "mpi"))


def detect_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistributedEnv | None:
    """The launch this process is part of, or None for a plain single process.

    torch's variables win when present (torchrun also runs under MPI schedulers); otherwise Open MPI's.
    """
    env = os.environ if environ is None else environ
    if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
        return _from_torch(env)
    if env.get("OMPI_COMM_WORLD_RANK") is not None and env.get("OMPI_COMM_WORLD_SIZE") is not None:
        return _from_mpi(env)
    return None


def normalize_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistributedEnv | None:
    """Writes the detected launch into torch's variables (never overwriting one a launcher already set)."""
    env = os.environ if environ is None else environ
    detected = detect_distributed_env(env)
    if detected is None:
        return None
    for key, value in detected.torch_vars().items():
        env.setdefault(key, value)
    return detected


def setup_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistributedEnv | None:
    """What a recipe calls first: normalise the launcher's variables, and make multi-process CPU launches real."""
    detected = normalize_distributed_env(environ)
    if detected is not None and detected.world_size > 1:
        use_gloo_without_accelerators()
    return detected


def use_gloo_without_accelerators() -> None:
    """On a host without GPUs (CI, laptops), accelerate picks no backend for a torchrun or DeepSpeed launch that did not
    pass ``--use_cpu``: every process then trains alone with world size 1 while DeepSpeed itself sees the real world
    size. Make such a launch a gloo process group on CPU, as ``--use_cpu`` would, but keep DeepSpeed usable."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_hf_medvis_cpu_fallback", False):
        return

    def prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
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
    try:
        import deepspeed.ops
    except ImportError:
        return
    compatible = deepspeed.ops.__compatible_ops__  # a module-level dict DeepSpeed keeps; edits persist
    compatible["deepspeed_shm_comm"] = False


def rank_tag(environ: MutableMapping[str, str] | None = None) -> str:
    """``node N rank R`` for log lines (rank 0 node 0 for a single process)."""
    detected = detect_distributed_env(environ)
    if detected is None:
        return "node 0 rank 0"
    return f"node {detected.node_rank} rank {detected.rank}"


def check_world_size(args) -> None:
    """A launch of N processes that trains with world size 1 (e.g. ``accelerate launch --cpu --num_processes N`` on some
    setups) would silently run N independent copies; stop before anything is written."""
    launched = _int(os.environ, "WORLD_SIZE", 1)
    if launched > 1 and args.world_size != launched:
        raise DistributedEnvError(
            f"the launcher started {launched} processes (WORLD_SIZE) but training sees world size {args.world_size}; "
            "each process would train alone. On CPU use torchrun or `accelerate launch --multi_gpu`"
        )
