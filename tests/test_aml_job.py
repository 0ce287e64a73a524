"""`hf-medvis aml-job` writes an Azure ML CLI v2 command job and its environment's build context; validated offline by
azure-ai-ml. The job itself runs in tests/test_aml_rehearsal.py."""

import re

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement

from hf_medvis.cli import main as cli_main
from hf_medvis.infra.aml import AmlJobError, check_data_input

ARGS = [
    "aml-job",
    "--recipe",
    "pretrain_mae",
    "--config",
    str(REPO / "recipes" / "configs" / "mae_tiny_demo.yaml"),
    "--compute",
    "gpu-cluster",
    "--instance-type",
    "Standard_ND96isr_H100_v5",
    "--nodes",
    "2",
    "--gpus-per-node",
    "8",
    "--data",
    "azureml://datastores/xrays/paths/nih/",
    "--code",
    str(REPO),
]


@pytest.fixture
def job_file(tmp_path):
    out = tmp_path / "jobs" / "job.yml"
    assert (
        cli_main(
            [
                *ARGS,
                "--deepspeed",
                str(REPO / "ds_configs" / "zero2.json"),
                "--job-tier",
                "Spot",
                "--out",
                str(out),
                "--",
                "--bf16",
                "true",
            ]
        )
        == 0
    )
    return out


def test_job_yaml_has_the_documented_structure(job_file):
    job = yaml.safe_load(job_file.read_text())
    assert job["$schema"] == "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
    assert job["type"] == "command" and job["compute"] == "azureml:gpu-cluster"
    # One process per node; accelerate starts the 8 per node (AML starting 8 would make 64).
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 1}
    assert job["resources"] == {"instance_count": 2, "instance_type": "Standard_ND96isr_H100_v5", "shm_size": "64g"}
    assert job["inputs"]["data"] == {
        "type": "uri_folder",
        "path": "azureml://datastores/xrays/paths/nih/",
        "mode": "ro_mount",
    }
    assert job["outputs"]["output_dir"]["type"] == "uri_folder"
    assert job["environment_variables"]["NCCL_DEBUG"] and "NCCL_SOCKET_IFNAME" in job["environment_variables"]
    assert job["queue_settings"] == {"job_tier": "Spot"}
    command = job["command"]
    for part in (
        'export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" && accelerate launch',  # hf_medvis from the snapshot
        "--num_machines 2",
        "--num_processes 16",
        "--machine_rank $NODE_RANK",
        "--main_process_ip $MASTER_ADDR",
        "--main_process_port $MASTER_PORT",
        "--deepspeed_config_file ${{inputs.deepspeed}}",
        "recipes/pretrain_mae.py",
        "--train_data ${{inputs.data}}",
        "--output_dir ${{outputs.output_dir}}",
        "--resume_from_checkpoint last",
        "--report_to mlflow",  # what Azure ML charts
        "--bf16 true",
    ):
        assert part in command, part
    assert "--multi_gpu" not in command
    # Local paths are relative to the YAML's folder, as Azure ML resolves them.
    assert (job_file.parent / job["code"] / "recipes" / "pretrain_mae.py").is_file()
    assert (job_file.parent / job["inputs"]["config"]["path"]).is_file()
    assert (job_file.parent / job["inputs"]["deepspeed"]["path"]).is_file()


def test_environment_is_an_acpt_image_that_env_passes_plus_this_package(job_file, capsys):
    job = yaml.safe_load(job_file.read_text())
    context = job_file.parent / job["environment"]["build"]["path"]
    assert job["environment"]["build"]["dockerfile_path"] == "Dockerfile"
    base = re.search(r"^FROM (\S+)$", (context / "Dockerfile").read_text(), re.M).group(1)
    assert base == "mcr.microsoft.com/azureml/curated/acpt-pytorch-2.8-cuda12.6:latest"
    capsys.readouterr()
    assert cli_main(["env", "--image", base]) == 0  # the image the job names passes its own check
    report = capsys.readouterr().out
    assert "compatibility: OK" in report and "torch 2.8.0" in report and "read 2026-12-02" in report
    assert "transformers" not in report.split("build 1")[1].split("\n")[0]  # only what the image documents
    # What the install step installs: this package's declared ranges, the job extras, Azure ML's MLflow plugin.
    requirements = (context / "requirements.txt").read_text().splitlines()
    declared = {Requirement(r).name: Requirement(r).specifier for r in requirements if r and not r.startswith("#")}
    for line in ("torch>=2.4", "transformers>=5.3", "deepspeed>=0.16", "pylibjpeg>=2.0", "azureml-mlflow"):
        wanted = Requirement(line)
        assert wanted.name in declared and set(wanted.specifier) <= set(declared[wanted.name]), line
    assert any(r.startswith("mlflow-skinny") for r in requirements) and any(
        r.startswith("tensorboard") for r in requirements
    )
    assert "RUN PIP_NO_CACHE_DIR=1 bash /opt/hf_medvis_env/install.sh" in (context / "Dockerfile").read_text()
    assert not list(context.glob(".*.tmp"))


def test_azure_ml_sdk_loads_the_job_and_environment_offline(job_file, monkeypatch):
    azure_ml = pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed (pip install hf_medvis[aml])")
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    job = azure_ml.load_job(str(job_file))
    assert type(job).__name__ == "Command"
    assert job.distribution.process_count_per_instance == 1 and job.resources.instance_count == 2
    assert job.inputs["data"].mode == "ro_mount"
    assert job.environment.build.path.endswith("env-acpt-pytorch-2.8-cuda12.6")
    context = job_file.parent / "env-acpt-pytorch-2.8-cuda12.6"
    environment = azure_ml.load_environment(str(context / "environment.yml"))  # to register it once
    assert (
        environment.name == "hf-medvis-acpt-pytorch-2.8-cuda12.6" and environment.build.dockerfile_path == "Dockerfile"
    )


def test_ddp_job_on_a_pinned_acpt_build_and_a_registered_environment(tmp_path):
    from azure.ai.ml import load_job

    out = tmp_path / "ddp.yml"
    pinned = "mcr.microsoft.com/azureml/curated/acpt-pytorch-2.8-cuda12.6:12"
    assert cli_main([*ARGS, "--environment", pinned, "--data-mode", "download", "--out", str(out)]) == 0
    job = yaml.safe_load(out.read_text())
    assert "--multi_gpu" in job["command"] and "deepspeed" not in job["command"]
    dockerfile = (out.parent / job["environment"]["build"]["path"] / "Dockerfile").read_text()
    assert f"FROM {pinned}\n" in dockerfile
    assert load_job(str(out)).inputs["data"].mode == "download"
    # An environment registered from an earlier job's environment.yml: used as it is, nothing written beside the job.
    out = tmp_path / "registered" / "job.yml"
    registered = "azureml:hf-medvis-acpt-pytorch-2.8-cuda12.6:3"
    user_report = ["--", "--report_to", "tensorboard"]
    assert cli_main([*ARGS, "--environment", registered, "--out", str(out), *user_report]) == 0
    job = yaml.safe_load(out.read_text())
    assert job["environment"] == registered and [p.name for p in out.parent.iterdir()] == ["job.yml"]
    assert "--report_to tensorboard" in job["command"] and "mlflow" not in job["command"]


def test_data_inputs_take_the_forms_azure_ml_accepts():
    for uri in (
        "azureml://datastores/xrays/paths/nih/",
        "azureml://subscriptions/s/resourcegroups/g/workspaces/w/datastores/xrays/paths/nih",
        "abfss://xrays@account.dfs.core.windows.net/nih",
        "wasbs://xrays@account.blob.core.windows.net/nih",
        "https://account.blob.core.windows.net/xrays/nih",
        "azureml:nih-shards:3",
        "azureml:nih-shards@latest",
    ):
        assert check_data_input(uri) == uri
    assert check_data_input("azureml:nih-shards@3") == "azureml:nih-shards:3"  # a version, in Azure ML's spelling
    with pytest.raises(AmlJobError) as refused:
        check_data_input("az://xrays/nih/shards")
    message = str(refused.value)
    assert "abfss://xrays@<account>.dfs.core.windows.net/nih/shards" in message and "\n" not in message
    for bad, why in (
        ("/data/xrays", "register a local folder"),
        ("http://account.blob.core.windows.net/x", "must be azureml://"),
        ("abfss://xrays/nih", "has no '@'"),
        ("azureml:bad name", "azureml:NAME:VERSION"),
    ):
        with pytest.raises(AmlJobError, match=re.escape(why)):
            check_data_input(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--nodes", "0"], "--nodes and --gpus-per-node must be >= 1"),
        (["--data", "/local/folder"], "register a local folder first"),
        (["--data", "az://xrays/nih"], "write abfss://xrays@<account>.dfs.core.windows.net/nih"),
        (["--deepspeed", "/nonexistent.json"], "--deepspeed: file not found"),
        (["--environment", "acpt-pytorch-2.2-cuda12.1"], "torch 2.2.2 (needs torch>=2.4) (2024 build); use acpt-"),
        (["--environment", "myimage:1"], "must be an ACPT environment"),
    ],
)
def test_bad_job_arguments_are_one_line(tmp_path, capsys, change, message):
    assert cli_main([*ARGS, *change, "--out", str(tmp_path / "j.yml")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
