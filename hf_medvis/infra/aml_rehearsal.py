"""A local rehearsal of an Azure ML job: the job's command, exactly as written, run once per node the way Azure ML
runs a ``pytorch`` distribution job, before paying for the GPUs.

What Azure ML does and the rehearsal does too: the code snapshot (the files git would upload: .gitignore and
.amlignore are honoured) becomes the working directory; ``${{inputs.NAME}}`` and ``${{outputs.NAME}}`` become local
paths (a mounted folder, a downloaded file); the job's ``environment_variables`` are set, plus the variables of the
PyTorch distribution (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK); the command runs under
``bash -c`` once per process of each node. The Python environment is whatever ``PATH`` names first: build it with the
job environment's own ``install.sh`` (aml_environment.py) so that nothing the image would lack is on it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}")


def render_command(command: str, paths: Mapping[str, str]) -> str:
    """The command with each ``${{inputs.x}}`` / ``${{outputs.x}}`` replaced by ``paths['inputs.x']`` (quoted for
    the shell); a placeholder without a path is an error."""
    missing = sorted({f"{kind}.{name}" for kind, name in PLACEHOLDER.findall(command)} - set(paths))
    if missing:
        raise ValueError(f"no local path for {', '.join(missing)}")

    def local(match: re.Match) -> str:
        path = str(paths[f"{match.group(1)}.{match.group(2)}"])
        return path if re.fullmatch(r"[A-Za-z0-9_./:@=+-]+", path) else "'" + path.replace("'", "'\\''") + "'"

    return PLACEHOLDER.sub(local, command)


def local_file_inputs(job: Mapping[str, Any], job_dir: str | Path) -> dict[str, str]:
    """``inputs.NAME`` -> the local file of each input whose path is local (resolved against the YAML's folder, as
    Azure ML uploads it); remote inputs (the data) are for the caller to map to a local folder."""
    paths = {}
    for name, spec in (job.get("inputs") or {}).items():
        path = str(spec.get("path", ""))
        if path and ":" not in path.split("/")[0]:
            paths[f"inputs.{name}"] = str((Path(job_dir) / path).resolve())
    return paths


def copy_code_snapshot(job: Mapping[str, Any], job_dir: str | Path, destination: str | Path) -> Path:
    """Copies the job's ``code`` folder as Azure ML snapshots it: the files git tracks or would track."""
    source = (Path(job_dir) / job["code"]).resolve()
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=source,
        capture_output=True,
        check=True,
    ).stdout.decode()
    ignore = source / ".amlignore"
    patterns = [p for p in ignore.read_text().splitlines() if p and not p.startswith("#")] if ignore.exists() else []
    destination = Path(destination)
    for relative in filter(None, listed.split("\0")):
        if any(Path(relative).match(p) for p in patterns) or not (source / relative).is_file():
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target)
    return destination


def node_environment(
    job: Mapping[str, Any], node_rank: int, master_port: int, base: Mapping[str, str]
) -> dict[str, str]:
    """The environment Azure ML gives node ``node_rank``'s process (one process per node, as hf_medvis jobs run)."""
    nodes = int(job["resources"]["instance_count"])
    per_node = int(job["distribution"].get("process_count_per_instance", 1))
    if per_node != 1:
        raise ValueError("the rehearsal runs one process per node, as `hf-medvis aml-job` writes jobs")
    env = dict(base)
    env.update({k: str(v) for k, v in (job.get("environment_variables") or {}).items()})
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        WORLD_SIZE=str(nodes * per_node),
        NODE_RANK=str(node_rank),
        RANK=str(node_rank * per_node),
        LOCAL_RANK="0",
    )
    return env


@dataclass
class NodeRun:
    node_rank: int
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_nodes(
    job: Mapping[str, Any],
    command: str,
    workdir: str | Path,
    base_env: Mapping[str, str],
    master_port: int,
    log_dir: str | Path,
) -> list[NodeRun]:
    """Starts the rendered ``command`` once per node (each in its own process group, as each node is its own
    machine); output goes to ``log_dir/node-<N>.log``."""
    runs = []
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    for node_rank in range(int(job["resources"]["instance_count"])):
        log = Path(log_dir) / f"node-{node_rank}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=workdir,
                env=node_environment(job, node_rank, master_port, base_env),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        runs.append(NodeRun(node_rank, process, log))
    return runs


def signal_nodes(runs: list[NodeRun], signum: int = signal.SIGTERM) -> None:
    """What Azure ML does to every node of a preempted job: the signal to all of its processes."""
    for run in runs:
        with contextlib.suppress(ProcessLookupError):  # that node has already exited
            os.killpg(run.process.pid, signum)


def wait_nodes(runs: list[NodeRun], timeout: float) -> list[int]:
    """Exit codes of every node; all nodes are killed when one has not finished within ``timeout`` seconds."""
    codes = []
    try:
        for run in runs:
            codes.append(run.process.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        signal_nodes(runs, signal.SIGKILL)
        raise
    return codes
