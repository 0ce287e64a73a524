"""The launcher's variables (torchrun, accelerate, Azure ML, MPI) -> this process's rank, world size, node and master.

Torch-style launches (torchrun, ``accelerate launch``, Azure ML's PyTorch distribution: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT) and MPI launches (OMPI_COMM_WORLD_*, Azure ML's
AZ_BATCH_MASTER_NODE / AZ_BATCHAI_MPI_MASTER_NODE). The recipes (``hf_medvis.training.distributed``), shard streaming,
per-rank logs and ``hf-medvis nccl-check`` all read a launch through it, so they agree on what it is.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

# Azure ML's documented MASTER_PORT for MPI jobs whose master variable carries no port (AZ_BATCHAI_MPI_MASTER_NODE).
AML_MPI_DEFAULT_PORT = "54965"


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
            "RANK": self.rank,
            "WORLD_SIZE": self.world_size,
            "LOCAL_RANK": self.local_rank,
            "LOCAL_WORLD_SIZE": self.local_world_size,
            "NODE_RANK": self.node_rank,
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": self.master_port,
        }
        return {key: str(value) for key, value in values.items() if value is not None}


def int_env(env: MutableMapping[str, str], name: str, default: int | None = None) -> int | None:
    """An integer launcher variable; a malformed one is an error naming it."""
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
    world_size = int_env(env, "WORLD_SIZE", 1)
    local_world_size = int_env(env, "LOCAL_WORLD_SIZE")
    rank = int_env(env, "RANK", 0)
    local_rank = int_env(env, "LOCAL_RANK", rank if local_world_size in (None, world_size) else None)
    if local_rank is None:
        raise DistributedEnvError("RANK is set but LOCAL_RANK is not; the launcher must say which device is ours")
    # torchrun calls the node index GROUP_RANK; Azure ML and accelerate call it NODE_RANK.
    node_rank = int_env(env, "NODE_RANK", int_env(env, "GROUP_RANK"))
    if node_rank is None:
        node_rank = rank // local_world_size if local_world_size else 0
    return _check(
        DistributedEnv(
            rank,
            world_size,
            local_rank,
            local_world_size,
            node_rank,
            env.get("MASTER_ADDR"),
            env.get("MASTER_PORT"),
            "torch",
        )
    )


def _from_mpi(env: MutableMapping[str, str]) -> DistributedEnv:
    rank = int_env(env, "OMPI_COMM_WORLD_RANK")
    world_size = int_env(env, "OMPI_COMM_WORLD_SIZE")
    local_rank = int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
    local_world_size = int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)
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
    return _check(
        DistributedEnv(
            rank, world_size, local_rank, local_world_size, rank // max(local_world_size, 1), addr, port, "mpi"
        )
    )


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


def rank_and_world_size(environ: MutableMapping[str, str] | None = None) -> tuple[int, int]:
    """This process's global rank and the world size: ``(0, 1)`` for a plain single process."""
    detected = detect_distributed_env(environ)
    return (0, 1) if detected is None else (detected.rank, detected.world_size)
