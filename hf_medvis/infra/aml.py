"""Azure ML CLI v2 command-job specs for the recipes (``az ml job create -f job.yml``).

Layout: ``distribution: pytorch`` with ONE process per node; inside it ``accelerate launch`` starts one process per GPU
and wires the nodes together from the variables Azure ML sets for that distribution (MASTER_ADDR, MASTER_PORT,
NODE_RANK). Letting Azure ML start G processes per node and accelerate G more would start G x G. Schema:
https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMA_URL = "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
RECIPES = ("pretrain_mae", "finetune_vit")
DEFAULT_ENVIRONMENT = "azureml:AzureML-acpt-pytorch-2.2-cuda12.1@latest"
DATA_MODES = ("ro_mount", "download")
# NCCL on Azure GPU nodes: warnings visible in the job log, relaxed PCI ordering (Azure's recommendation for IB SKUs),
# the host interface for bootstrap, and a collective that hangs raises instead of waiting for the job timeout.
NCCL_ENVIRONMENT = {
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_PCI_RELAXED_ORDERING": "1",
    "NCCL_SOCKET_IFNAME": "eth0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class AmlJobError(ValueError):
    """Bad job arguments."""


@dataclass
class AmlJobSpec:
    recipe: str
    config: str
    compute: str
    instance_type: str
    nodes: int
    gpus_per_node: int
    data: str
    environment: str = DEFAULT_ENVIRONMENT
    deepspeed: str | None = None
    data_mode: str = "ro_mount"
    shm_size: str = "64g"
    experiment_name: str = "hf-medvis"
    timeout_hours: float | None = None
    job_tier: str | None = None  # Azure ML queue tier, e.g. "Spot" / "Basic" / "Standard" / "Premium"
    extra_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.recipe not in RECIPES:
            raise AmlJobError(f"--recipe must be one of {', '.join(RECIPES)}, got '{self.recipe}'")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise AmlJobError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes} and {self.gpus_per_node}")
        if self.data_mode not in DATA_MODES:
            raise AmlJobError(f"--data-mode must be one of {', '.join(DATA_MODES)}, got '{self.data_mode}'")
        if not Path(self.config).is_file():
            raise AmlJobError(f"--config: file not found: {self.config}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise AmlJobError(f"--deepspeed: file not found: {self.deepspeed}")
        if "://" not in self.data and not self.data.startswith("azureml:"):
            raise AmlJobError(
                f"--data must be a URL (azureml://, https://, abfss://, wasbs://) or azureml:NAME@VERSION, "
                f"got '{self.data}'"
            )


def _environment(value: str) -> str | dict:
    # A registered environment ("azureml:NAME@latest", "azureml:NAME:VERSION") or a docker image reference.
    if value.startswith("azureml:"):
        return value
    return {"image": value}


def _command(spec: AmlJobSpec) -> str:
    launch = [
        "accelerate",
        "launch",
        "--num_machines",
        str(spec.nodes),
        "--num_processes",
        str(spec.nodes * spec.gpus_per_node),
        "--machine_rank",
        "$NODE_RANK",
        "--main_process_ip",
        "$MASTER_ADDR",
        "--main_process_port",
        "$MASTER_PORT",
    ]
    if spec.deepspeed:
        # "standard" = torchrun's rendezvous on every node; accelerate's default (pdsh + hostfile) needs ssh between nodes.
        launch += [
            "--use_deepspeed",
            "--deepspeed_config_file",
            "${{inputs.deepspeed}}",
            "--deepspeed_multinode_launcher",
            "standard",
        ]
    else:
        launch += ["--multi_gpu"]
    recipe = [
        f"recipes/{spec.recipe}.py",
        "--config",
        "${{inputs.config}}",
        "--train_data",
        "${{inputs.data}}",
        "--output_dir",
        "${{outputs.output_dir}}",
        "--resume_from_checkpoint",
        "last",  # a preempted job restarted by Azure ML continues where it stopped
    ]
    # Shell variables ($NODE_RANK...) must reach the shell unquoted; user extras are quoted.
    extras = " ".join(shlex.quote(arg) for arg in spec.extra_args)
    return " ".join(launch + recipe) + (f" {extras}" if extras else "")


def _relative(path: str | Path, base_dir: Path) -> str:
    # Local paths in a job YAML are resolved against the YAML's own folder.
    return os.path.relpath(Path(path).resolve(), base_dir.resolve())


def build_job(spec: AmlJobSpec, code_root: str | Path = ".", base_dir: str | Path = ".") -> dict:
    """The job as a dict in Azure ML CLI v2 command-job YAML form, local paths relative to ``base_dir`` (the folder the
    YAML is written to)."""
    spec.check()
    base_dir = Path(base_dir)
    inputs: dict = {
        "data": {"type": "uri_folder", "path": spec.data, "mode": spec.data_mode},
        "config": {"type": "uri_file", "path": _relative(spec.config, base_dir), "mode": "download"},
    }
    if spec.deepspeed:
        inputs["deepspeed"] = {"type": "uri_file", "path": _relative(spec.deepspeed, base_dir), "mode": "download"}
    job: dict = {
        "$schema": SCHEMA_URL,
        "type": "command",
        "display_name": f"{spec.recipe}-{spec.nodes}x{spec.gpus_per_node}",
        "experiment_name": spec.experiment_name,
        "description": f"hf_medvis {spec.recipe} on {spec.nodes} x {spec.gpus_per_node} GPUs ({spec.instance_type})",
        "code": _relative(code_root, base_dir),
        "command": _command(spec),
        "environment": _environment(spec.environment),
        "compute": spec.compute if spec.compute.startswith("azureml:") else f"azureml:{spec.compute}",
        "distribution": {"type": "pytorch", "process_count_per_instance": 1},
        "resources": {"instance_count": spec.nodes, "instance_type": spec.instance_type, "shm_size": spec.shm_size},
        "inputs": inputs,
        "outputs": {"output_dir": {"type": "uri_folder", "mode": "rw_mount"}},
        "environment_variables": dict(NCCL_ENVIRONMENT),
    }
    if spec.timeout_hours:
        job["limits"] = {"timeout": int(spec.timeout_hours * 3600)}
    if spec.job_tier:
        job["queue_settings"] = {"job_tier": spec.job_tier}
    return job


def write_job(spec: AmlJobSpec, out: str | Path, code_root: str | Path = ".") -> Path:
    out = Path(out)
    job = build_job(spec, code_root, base_dir=out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(job, sort_keys=False, width=200))
    return out
