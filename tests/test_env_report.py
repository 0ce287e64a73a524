"""hf-medvis env: the report, its speed, the compatibility matrix and planted bad combinations."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import torch  # noqa: F401  (imported before timing: the recipes have torch loaded when they log the report)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from hf_medvis.cli import main
from hf_medvis.infra.catalog import load_data
from hf_medvis.infra.env import (
    _arch_supported,
    collect_env_report,
    env_exit_code,
    format_env_report,
    package_requirements,
)

REPO = Path(__file__).resolve().parents[1]


def test_report_is_complete_and_clean_here():
    report = collect_env_report()
    for name in ("torch", "transformers", "datasets", "accelerate", "deepspeed", "evaluate", "adlfs"):
        assert report["packages"][name], name
    assert report["torch"]["cuda"] == torch.version.cuda
    assert isinstance(report["deepspeed_ops"], dict) and "cpu_adam" in report["deepspeed_ops"]
    assert env_exit_code(report) == 0, report["problems"]
    text = format_env_report(report)
    assert "DeepSpeed ops that can build:" in text and "compatibility: OK" in text
    json.dumps(report)  # machine-readable as is


def test_planted_bad_combination_exits_nonzero_with_reason_and_fix():
    report = collect_env_report(versions={"torch": "2.2.2", "numpy": "2.0.0"}, include_deepspeed_ops=False)
    ids = {p["id"]: p for p in report["problems"]}
    assert "torch-too-old" in ids and "numpy2-old-torch" in ids
    assert ids["numpy2-old-torch"]["severity"] == "error" and "numpy<2" in ids["numpy2-old-torch"]["fix"]
    assert "torchvision-needs-torch" in ids  # the installed torchvision declares a newer torch
    assert env_exit_code(report) == 1
    text = format_env_report(report)
    assert "ERROR [numpy2-old-torch]" in text and "Fix: " in text and "assumed versions" in text


def test_gpu_not_in_the_torch_build_is_an_error():
    v100 = {"index": 0, "name": "Tesla V100-SXM2-16GB", "memory_gib": 15.8, "compute_capability": "7.0"}
    report = collect_env_report(gpus=[v100], include_deepspeed_ops=False)
    ids = {p["id"] for p in report["problems"]}
    arch_list = report["torch"]["arch_list"]
    assert ("gpu-arch-unsupported" in ids) == (not _arch_supported("7.0", arch_list))
    assert "no-bf16" in ids
    assert _arch_supported("9.0", ["sm_80", "sm_90a"]) and _arch_supported("8.6", ["sm_80"])
    assert not _arch_supported("7.0", ["sm_75", "sm_80"]) and _arch_supported("12.0", ["compute_90"])


def test_cli_json_and_acpt_image_check(capsys):
    assert main(["env", "--json", "--no-deepspeed-ops"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"python", "packages", "gpus", "problems", "acpt_images"} <= set(report)
    images = {i["name"]: i for i in report["acpt_images"]}
    assert images["acpt-pytorch-2.2-cuda12.1"]["usable"] is False  # torch 2.2.2 < 2.4
    assert main(["env", "--image", "acpt-pytorch-2.2-cuda12.1", "--no-deepspeed-ops"]) == 1
    out = capsys.readouterr().out
    # Only the image's documented contents, each build with its source and date; torch is binding (the job keeps the
    # image's CUDA build), DeepSpeed 0.13.1 is not (the job's install step upgrades it).
    assert "ERROR [torch-too-old]: build 1 (2024): torch 2.2.2 (needs torch>=2.4)" in out
    assert "deepspeed 0.13.1" in out and "ERROR [deepspeed" not in out and "transformers 5" not in out
    assert "build 2 on mcr.microsoft.com/aifx/acpt/stable-ubuntu2204-cu118-py310-torch271" in out
    assert out.rstrip().endswith("Fix: use the ACPT environment acpt-pytorch-2.8-cuda12.6")
    assert main(["env", "--image", "AzureML-acpt-pytorch-2.8-cuda12.6@latest", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["usable"] and [b["torch"] for b in check["builds"]] == ["2.8.0"]
    assert main(["env", "--image", "ubuntu:22.04"]) == 2
    assert "is not an ACPT environment" in capsys.readouterr().err
    assert main(["env", "--assume", "torch"]) == 2
    assert "NAME=VERSION" in capsys.readouterr().err


def test_matrix_requirements_match_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    declared = {}
    for line in parser["options"]["install_requires"].split():
        requirement = Requirement(line)
        declared[requirement.name.lower()] = requirement.specifier
    declared["python"] = parser["options"]["python_requires"].strip()
    checked = package_requirements()
    assert set(checked) == set(load_data("compat")["requirements"])
    for name, spec in checked.items():
        expected = spec if name == "python" else SpecifierSet(spec)
        assert declared.get(name) == expected, f"env check {name}{spec} vs setup.cfg {declared.get(name)}"
