"""The local rehearsal of a generated Azure ML job: its command, exactly as written, on 2 "nodes" (2 local process
groups with the variables Azure ML sets for a PyTorch job), in a Python environment built only by the job
environment's own install.sh on top of a stand-in for the base image (Python, torch, torchvision and what they need), reading the data
as a read-only mounted folder, reporting to an MLflow run created beforehand as Azure ML does. The job trains, is
preempted (SIGTERM to every node), is started again with the same command, resumes and finishes."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, free_port, output_defects

from hf_medvis.cli import main as cli_main
from hf_medvis.infra.aml_rehearsal import (
    copy_code_snapshot,
    local_file_inputs,
    render_command,
    signal_nodes,
    start_nodes,
    wait_nodes,
)

pytestmark = pytest.mark.slow
STEPS = 30
CONFIG = {
    "model_preset": "tiny",
    "image_size": 32,
    "patch_size": 8,
    "max_steps": STEPS,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 15,
    "save_strategy": "steps",
    "save_steps": 2,
    # no save_total_limit: checkpoints less than 1 s apart make the Trainer's rotation warn about mtime
    "alerts": False,  # a 32-px model on 2 CPU processes waits for data: the alerts would be right, and noise here
    "num_reconstruction_images": 4,
    "validation_split_percentage": 20,
    "dataloader_num_workers": 1,
    "seed": 0,
}
# pip's notes about this machine's local package index, not about the install
PIP_NOISE = "is ignored: it is neither a file nor a directory"


def _link_base_image_packages(site_packages: Path, roots: tuple[str, ...] = ("torch", "torchvision")) -> dict:
    """The base image's own packages, torch and torchvision with everything they require, hard-linked from this
    machine's installation (the files pip would unpack, in seconds instead of minutes; each keeps its RECORD, so pip
    in the new environment sees them installed). Returns {name: version}."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    linked, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in linked:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        linked[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        for file in dist.files or []:
            if file.parts[0] == "..":  # console scripts: their first line names this machine's Python
                continue
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(dist.locate_file(file), target)
    return linked


def _build_job_python(context: Path) -> Path:
    """A virtual environment holding what the base image holds (Python, torch, torchvision and what they require, at
    this machine's versions) plus exactly what the job environment's install.sh adds. Kept in .rehearsal/ between test
    runs, keyed on the install step's files; returns its bin folder."""
    base = {name: metadata.version(name) for name in ("torch", "torchvision")}
    key = hashlib.sha256(
        b"".join((context / name).read_bytes() for name in ("install.sh", "requirements.txt"))
        + json.dumps([sys.version, base, "linked-base-v1"]).encode()
    ).hexdigest()[:12]
    root = REPO / ".rehearsal"
    venv = root / f"venv-{key}"
    if (venv / ".complete").exists():
        return venv / "bin"
    if root.exists():
        shutil.rmtree(root)  # older environments
    env = {**os.environ, "PIP_NO_COMPILE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    linked = _link_base_image_packages(venv / "lib" / version / "site-packages")
    result = subprocess.run(["bash", str(context / "install.sh")], capture_output=True, text=True, env=env, timeout=900)
    noise_free = "\n".join(line for line in result.stderr.splitlines() if PIP_NOISE not in line)
    assert result.returncode == 0, f"install.sh: {noise_free[-3000:]}"
    (venv / ".complete").write_text(json.dumps(linked))
    return venv / "bin"


def _write_job(root: Path, *extra: str) -> tuple[Path, dict]:
    config = root / "configs" / "mae_rehearsal.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(CONFIG))
    out = root / "job" / "job.yml"
    args = ["aml-job", "--recipe", "pretrain_mae", "--config", str(config), "--compute", "cpu-cluster"]
    args += ["--instance-type", "Standard_D4s_v5", "--nodes", "2", "--gpus-per-node", "1"]
    args += ["--data", "azureml://datastores/xrays/paths/phantoms/", "--code", str(REPO), "--out", str(out), *extra]
    assert cli_main(args) == 0
    return out, yaml.safe_load(out.read_text())


def _azure_ml_setting(job_python: Path, root: Path) -> tuple[dict[str, str], Any, str, str]:
    """The environment Azure ML gives a job (the distribution's variables come per node, from start_nodes): this
    Python first on PATH, the Hub unreachable, and an MLflow run created beforehand, as Azure ML creates the job's."""
    from mlflow.tracking import MlflowClient

    tracking = f"file:{root / 'mlruns'}"
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.create_experiment("hf-medvis")
    run_id = client.create_run(experiment).info.run_id
    env = {
        "PATH": f"{job_python}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", str(root)),
        "LANG": "C.UTF-8",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_EXPERIMENT_ID": experiment,
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    return env, client, experiment, run_id


def _mounted(phantom_dir: Path, root: Path) -> Path:
    """The data as a read-only mounted folder (``mode: ro_mount``)."""
    mount = root / "mnt" / "data"
    shutil.copytree(phantom_dir / "images", mount)
    for path in [mount, *mount.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return mount


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, dict]:
    return _write_job(tmp_path_factory.mktemp("aml"))


@pytest.fixture(scope="module")
def job_python(job) -> Path:
    out, spec = job
    if os.environ.get("HF_MEDVIS_REHEARSAL_BIN"):  # an environment built earlier by hand, to iterate on the test
        return Path(os.environ["HF_MEDVIS_REHEARSAL_BIN"])
    return _build_job_python(out.parent / spec["environment"]["build"]["path"])


def _tails(logs: list[str], chars: int = 4000) -> str:
    return "\n".join(f"----- node {rank} -----\n{log[-chars:]}" for rank, log in enumerate(logs))


def _complete_checkpoints(output_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in output_dir.glob("checkpoint-*/checkpoint_complete.json"))


@pytest.mark.allow_traceback("SignalException", reason="torchrun's own exit on SIGTERM, after every rank saved")
def test_generated_job_trains_is_preempted_and_resumes_as_azure_ml_runs_it(
    job, job_python, tmp_path, phantom_dir, monkeypatch
):

    out, spec = job
    # Azure ML: the code snapshot is the working directory, the data a read-only mount, the output a folder.
    workdir = copy_code_snapshot(spec, out.parent, tmp_path / "snapshot")
    assert (workdir / "recipes" / "pretrain_mae.py").is_file() and not (workdir / ".venv").exists()
    mount = _mounted(phantom_dir, tmp_path)
    output_dir = tmp_path / "outputs" / "output_dir"
    paths = {**local_file_inputs(spec, out.parent), "inputs.data": str(mount), "outputs.output_dir": str(output_dir)}
    command = render_command(spec["command"], paths)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for local use behind this
    base_env, client, experiment, run_id = _azure_ml_setting(job_python, tmp_path)

    # Attempt 1: preempted once a checkpoint is complete (Azure ML sends SIGTERM to every node).
    nodes = start_nodes(spec, command, workdir, base_env, free_port(), tmp_path / "logs1")
    deadline = time.time() + 300
    while not _complete_checkpoints(output_dir):
        assert all(n.process.poll() is None for n in nodes), _tails([n.output() for n in nodes])
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    signal_nodes(nodes)
    wait_nodes(nodes, timeout=120)
    logs1 = [n.output() for n in nodes]
    for rank, log in enumerate(logs1):  # a failure shows every node's log: the cause is often on the other node
        preempted = f"rank {rank}] WARNING hf_medvis.training.callbacks.preemption: preempted: checkpoint-"
        assert preempted in log, _tails(logs1)
        assert not output_defects(log, "SignalException"), _tails(logs1)
    assert "world size 2" in logs1[0]
    stopped_at = _complete_checkpoints(output_dir)[-1]
    assert stopped_at < STEPS and not (output_dir / "all_results.json").exists()

    # Attempt 2: the same command, as Azure ML restarts a preempted job.
    nodes = start_nodes(spec, command, workdir, base_env, free_port(), tmp_path / "logs2")
    codes = wait_nodes(nodes, timeout=300)
    logs2 = [n.output() for n in nodes]
    assert codes == [0, 0], _tails(logs2)
    for log in logs2:
        assert not output_defects(log), _tails(logs2)
    assert f"resuming from {output_dir}/checkpoint-{stopped_at}" in logs2[0], logs2[0][-3000:]
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["global_step"] == STEPS and "eval_loss" in results
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()
    assert "hf_medvis 0.1.0 (source tree)" in logs2[0]  # imported from the code snapshot, not installed

    # One MLflow run, Azure ML's, holding the training curve of both attempts and the throughput figures.
    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [run_id]
    metrics = runs[0].data.metrics
    for key in ("loss", "images_per_second", "data_wait_pct", "eval_loss"):
        assert key in metrics, sorted(metrics)
    steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {1, STEPS} <= steps


def test_the_deepspeed_job_runs_as_written_too(job_python, tmp_path, phantom_dir, monkeypatch):
    """The DeepSpeed ZeRO-2 variant of the command (accelerate's DeepSpeed launcher, `standard` multi-node launcher,
    the JSON as a downloaded input): 2 nodes train to the end and save weights that load."""
    from transformers import ViTMAEForPreTraining

    out, spec = _write_job(
        tmp_path / "aml", "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--", "--max_steps", "4"
    )
    assert "--use_deepspeed" in spec["command"]
    workdir = copy_code_snapshot(spec, out.parent, tmp_path / "snapshot")
    output_dir = tmp_path / "outputs" / "output_dir"
    paths = {
        **local_file_inputs(spec, out.parent),
        "inputs.data": str(_mounted(phantom_dir, tmp_path)),
        "outputs.output_dir": str(output_dir),
    }
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    base_env, client, experiment, run_id = _azure_ml_setting(job_python, tmp_path)
    nodes = start_nodes(spec, render_command(spec["command"], paths), workdir, base_env, free_port(), tmp_path / "logs")
    codes = wait_nodes(nodes, timeout=300)
    logs = [n.output() for n in nodes]
    assert codes == [0, 0], _tails(logs)
    for log in logs:
        assert not output_defects(log), _tails(logs)
    assert "world size 2" in logs[0] and "DeepSpeed" in logs[0]
    assert json.loads((output_dir / "all_results.json").read_text())["global_step"] == 4
    assert ViTMAEForPreTraining.from_pretrained(output_dir).config.image_size == CONFIG["image_size"]
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
