"""Azure ML CLI v2 command-job specs for the recipes (``az ml job create -f job.yml``).

Layout: ``distribution: pytorch`` with ONE process per node; inside it ``accelerate launch`` starts one process per GPU
and wires the nodes together from the variables Azure ML sets for that distribution (MASTER_ADDR, MASTER_PORT,
NODE_RANK). Letting Azure ML start G processes per node and accelerate G more would start G x G. Schema:
https://azuremlschemas.azureedge.net/latest/commandJob.schema.json

The environment is a build context written beside the job (aml_environment.py): a curated ACPT image that `hf-medvis
env --image` passes, plus this package's dependencies. The command puts the job's code snapshot on PYTHONPATH (the
recipes import hf_medvis from it) and reports to MLflow, which Azure ML charts.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .acpt import AcptReference, check_acpt, default_acpt_name, failure_reasons, parse_acpt_reference
from .aml_environment import context_folder_name, write_environment_context
from .env import package_requirements

SCHEMA_URL = "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
RECIPES = ("pretrain_mae", "finetune_vit")
DATA_MODES = ("ro_mount", "download")
# Forms of an input Azure ML accepts (a local path would be uploaded from this machine: not for patient images).
DATA_URI_SCHEMES = ("azureml://", "https://", "abfss://", "wasbs://")
_ASSET = re.compile(
    r"^azureml:(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:(?::(?P<version>[A-Za-z0-9_.\-]+))|(?:@(?P<label>[A-Za-z0-9_.\-]+)))$"
)
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
    environment: str | None = None  # None: the newest documented ACPT environment that passes `hf-medvis env --image`
    deepspeed: str | None = None
    output_path: str | None = None  # a datastore folder for the outputs; default: the job's own folder
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
        self.data = check_data_input(self.data)
        if self.output_path is not None and not self.output_path.startswith("azureml://datastores/"):
            raise AmlJobError(
                f"--output-path must be a datastore folder azureml://datastores/NAME/paths/PATH, got '{self.output_path}'"
            )


def check_data_input(value: str) -> str:
    """The data input in a form Azure ML accepts (a registered asset's ``@VERSION`` written ``:VERSION``), or one line
    saying what to write instead."""
    if value.startswith("az://"):
        container, _, path = value.removeprefix("az://").partition("/")
        raise AmlJobError(
            f"--data: az:// is an fsspec spelling Azure ML does not accept (the storage account is not in it): write "
            f"abfss://{container}@<account>.dfs.core.windows.net/{path}, or a datastore URI "
            f"azureml://datastores/<datastore>/paths/{path}"
        )
    if value.startswith("azureml:") and not value.startswith("azureml://"):
        match = _ASSET.match(value)
        if match is None:
            raise AmlJobError(
                f"--data: a registered data asset is azureml:NAME:VERSION or azureml:NAME@latest, got '{value}'"
            )
        if match.group("label") and match.group("label").isdigit():  # NAME@3 means version 3: Azure ML writes NAME:3
            return f"azureml:{match.group('name')}:{match.group('label')}"
        return value
    if value.startswith(DATA_URI_SCHEMES):
        if value.startswith(("abfss://", "wasbs://")) and "@" not in value.split("/")[2]:
            raise AmlJobError(f"--data: {value.split(':')[0]} URIs name container@account: '{value}' has no '@'")
        return value
    raise AmlJobError(
        f"--data must be {', '.join(DATA_URI_SCHEMES)} URI or a registered data asset azureml:NAME:VERSION, got "
        f"'{value}' (register a local folder first: az ml data create --type uri_folder --path ...)"
    )


def resolve_environment(value: str | None) -> AcptReference | str:
    """An ACPT environment to build on (checked: refused with the reasons when it cannot carry hf_medvis), or a
    registered environment (``azureml:NAME:VERSION`` / ``@latest``) used as it is."""
    requirements = package_requirements()
    if value is None:
        return AcptReference(default_acpt_name(requirements))
    reference = parse_acpt_reference(value)
    if reference is not None:
        check = check_acpt(reference.name, requirements)
        if not check["usable"]:
            raise AmlJobError(
                f"--environment {value}: {'; '.join(failure_reasons(check))}; use {default_acpt_name(requirements)} "
                f"(hf-medvis env --image {reference.name} shows the documented builds)"
            )
        return reference
    if _ASSET.match(value):
        return value  # the user's registered environment, e.g. one built from an earlier job's environment.yml
    raise AmlJobError(
        f"--environment must be an ACPT environment (e.g. {default_acpt_name(requirements)}) or a registered "
        f"environment azureml:NAME:VERSION, got '{value}'"
    )


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
        "--dynamo_backend",
        "no",
        # precision comes from the recipe's --bf16 / --fp16 (the Trainer hands it to accelerate and fills DeepSpeed's
        # "auto"); "no" here only keeps accelerate from warning that it used a default
        "--mixed_precision",
        "no",
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
    if not any(arg == "--report_to" or arg.startswith("--report_to=") for arg in spec.extra_args):
        recipe += ["--report_to", "mlflow"]  # Azure ML charts the run's MLflow metrics
    # Shell variables ($NODE_RANK...) must reach the shell unquoted; user extras are quoted.
    extras = " ".join(shlex.quote(arg) for arg in spec.extra_args)
    # The recipes import hf_medvis from the code snapshot (the working directory), not from the image.
    code_on_path = 'export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" && '
    return code_on_path + " ".join(launch + recipe) + (f" {extras}" if extras else "")


def _relative(path: str | Path, base_dir: Path) -> str:
    # Local paths in a job YAML are resolved against the YAML's own folder.
    return os.path.relpath(Path(path).resolve(), base_dir.resolve())


def build_job(
    spec: AmlJobSpec,
    code_root: str | Path = ".",
    base_dir: str | Path = ".",
    environment: AcptReference | str | None = None,
) -> dict:
    """The job as a dict in Azure ML CLI v2 command-job YAML form, local paths relative to ``base_dir`` (the folder the
    YAML is written to). ``environment``: ``spec.environment`` already resolved (``resolve_environment``)."""
    spec.check()
    base_dir = Path(base_dir)
    if environment is None:
        environment = resolve_environment(spec.environment)
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
        "environment": (
            {"build": {"path": context_folder_name(environment), "dockerfile_path": "Dockerfile"}}
            if isinstance(environment, AcptReference)
            else environment
        ),
        "compute": spec.compute if spec.compute.startswith("azureml:") else f"azureml:{spec.compute}",
        "distribution": {"type": "pytorch", "process_count_per_instance": 1},
        "resources": {"instance_count": spec.nodes, "instance_type": spec.instance_type, "shm_size": spec.shm_size},
        "inputs": inputs,
        "outputs": {"output_dir": _output(spec.output_path)},
        "environment_variables": dict(NCCL_ENVIRONMENT),
    }
    if spec.timeout_hours:
        job["limits"] = {"timeout": int(spec.timeout_hours * 3600)}
    if spec.job_tier:
        job["queue_settings"] = {"job_tier": spec.job_tier}
    return job


def _output(path: str | None) -> dict:
    # Without a path Azure ML names the folder after the job, which a restarted (preempted) job keeps; with one, a
    # new job can resume another's checkpoints.
    return {"type": "uri_folder", "mode": "rw_mount", **({"path": path} if path else {})}


def write_job(spec: AmlJobSpec, out: str | Path, code_root: str | Path = ".") -> tuple[Path, Path | None]:
    """Writes the job YAML (a temp name, then renamed) and, for an ACPT environment, its build context beside it;
    returns both paths (the context: None for a registered environment, used as it is)."""
    out = Path(out)
    environment = resolve_environment(spec.environment)  # once: the job names it, the context is built on it
    job = build_job(spec, code_root, base_dir=out.parent, environment=environment)
    out.parent.mkdir(parents=True, exist_ok=True)
    context = None
    if isinstance(environment, AcptReference):
        context = write_environment_context(environment, out.parent / context_folder_name(environment))
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(yaml.safe_dump(job, sort_keys=False, width=200))
    temporary.replace(out)
    return out, context
