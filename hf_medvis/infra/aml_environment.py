"""The Azure ML environment of a job: a curated ACPT image plus this package's dependencies, as a Docker build
context that `hf-medvis aml-job` writes beside the job (Azure ML builds it once and caches it by content).

The context holds ``Dockerfile``, ``requirements.txt`` (this package's declared ranges and the extras a job needs),
``install.sh`` (the one install step: the Dockerfile runs it, and so does the local rehearsal of the job) and
``environment.yml`` (to register the environment once: ``az ml environment create -f environment.yml``). hf_medvis
itself is not installed in the image: the job imports it from its code snapshot, so the image does not change with
every commit."""

from __future__ import annotations

from pathlib import Path

import yaml

from .acpt import AcptReference
from .env import declared_requirements

ENVIRONMENT_SCHEMA_URL = "https://azuremlschemas.azureedge.net/latest/environment.schema.json"
# Extras a job needs: compressed DICOM codecs (raw DICOM folders), MLflow + TensorBoard reporters.
JOB_EXTRAS = ("dicom", "tracking")
# Azure ML's MLflow tracking URI (azureml://...) is served by this plugin; the curated images carry it, listed so
# that an environment built on any base has it.
JOB_REQUIREMENTS = ("azureml-mlflow",)
CONTEXT_FILES = ("Dockerfile", "requirements.txt", "install.sh", "environment.yml")

INSTALL_SH = """#!/usr/bin/env bash
# Installs hf_medvis's dependencies into the image's Python. Written by `hf-medvis aml-job`: the Dockerfile runs it,
# and the local rehearsal of the job runs it to build the same environment. torch and torchvision stay the image's own
# CUDA builds (pinned to what is installed); everything else is brought to the ranges in requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
python - > "$pins" <<'PY'
import importlib.metadata as metadata
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
python -m pip install --constraint "$pins" --requirement "$here/requirements.txt"
# Fail the build, not the first GPU hour, when something does not import.
python -c "import torch, torchvision, transformers, datasets, accelerate, evaluate, adlfs, pydicom, mlflow, tensorboard"
"""

DOCKERFILE = """# hf_medvis job environment: {image} plus hf_medvis's dependencies.
# Written by `hf-medvis aml-job`; Azure ML builds it when a job first uses it and reuses the build while these files
# stay the same. `hf-medvis env --image {name}` shows what the base image is documented to hold.
FROM {image}
COPY requirements.txt install.sh /opt/hf_medvis_env/
RUN PIP_NO_CACHE_DIR=1 bash /opt/hf_medvis_env/install.sh
"""


def job_requirements() -> list[str]:
    """Requirement lines of the job environment: install_requires, the job extras, the Azure ML MLflow plugin."""
    _, lines = declared_requirements(JOB_EXTRAS)
    return list(dict.fromkeys([*lines, *JOB_REQUIREMENTS]))


def context_folder_name(reference: AcptReference) -> str:
    return f"env-{reference.slug}"


def environment_name(reference: AcptReference) -> str:
    return f"hf-medvis-{reference.slug}"


def write_environment_context(reference: AcptReference, folder: str | Path) -> Path:
    """Writes the build context into ``folder`` (created; its four files replaced) and returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    python, _ = declared_requirements()
    requirements = "\n".join(
        [
            f"# hf_medvis's dependencies for an Azure ML job on {reference.image} (Python {python}).",
            "# Written by `hf-medvis aml-job` from the package's declared requirements; install with install.sh.",
            *job_requirements(),
        ]
    )
    environment = {
        "$schema": ENVIRONMENT_SCHEMA_URL,
        "name": environment_name(reference),
        "description": f"hf_medvis training: {reference.image} plus hf_medvis's dependencies (install.sh)",
        "build": {"path": ".", "dockerfile_path": "Dockerfile"},
        "os_type": "linux",
    }
    files = {
        "Dockerfile": DOCKERFILE.format(image=reference.image, name=reference.name),
        "requirements.txt": requirements + "\n",
        "install.sh": INSTALL_SH,
        "environment.yml": yaml.safe_dump(environment, sort_keys=False, width=200),
    }
    for name, text in files.items():
        temporary = folder / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(folder / name)  # never a half-written context
    return folder
