"""`hf-medvis aml-job` writes an Azure ML CLI v2 command job; validated offline by azure-ai-ml when installed."""

import pytest
import yaml
from conftest import REPO

from hf_medvis.cli import main as cli_main

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
        "accelerate launch",
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
        "--bf16 true",
    ):
        assert part in command, part
    # Local paths are relative to the YAML's folder, as Azure ML resolves them.
    assert (job_file.parent / job["code"] / "recipes" / "pretrain_mae.py").is_file()
    assert (job_file.parent / job["inputs"]["config"]["path"]).is_file()
    assert (job_file.parent / job["inputs"]["deepspeed"]["path"]).is_file()


def test_azure_ml_sdk_loads_the_job_offline(job_file, monkeypatch):
    azure_ml = pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed (pip install hf_medvis[aml])")
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    job = azure_ml.load_job(str(job_file))
    assert type(job).__name__ == "Command"
    assert job.distribution.process_count_per_instance == 1 and job.resources.instance_count == 2
    assert job.inputs["data"].mode == "ro_mount" and "acpt-pytorch-2.2-cuda12.1" in str(job.environment)


def test_ddp_job_with_a_docker_image_and_download_mode(tmp_path):
    pytest.importorskip("azure.ai.ml", reason="azure-ai-ml not installed (pip install hf_medvis[aml])")
    from azure.ai.ml import load_job

    out = tmp_path / "ddp.yml"
    assert (
        cli_main(
            [
                *ARGS,
                "--environment",
                "mcr.microsoft.com/azureml/curated/acpt-pytorch-2.2-cuda12.1:latest",
                "--data-mode",
                "download",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    job = yaml.safe_load(out.read_text())
    assert "--multi_gpu" in job["command"] and "deepspeed" not in job["command"]
    assert job["environment"] == {"image": "mcr.microsoft.com/azureml/curated/acpt-pytorch-2.2-cuda12.1:latest"}
    assert load_job(str(out)).inputs["data"].mode == "download"


@pytest.mark.parametrize(
    "change, message",
    [
        (["--nodes", "0"], "--nodes and --gpus-per-node must be >= 1"),
        (["--data", "/local/folder"], "--data must be a URL"),
        (["--deepspeed", "/nonexistent.json"], "--deepspeed: file not found"),
    ],
)
def test_bad_job_arguments_are_one_line(tmp_path, capsys, change, message):
    assert cli_main([*ARGS, *change, "--out", str(tmp_path / "j.yml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "j.yml").exists()
