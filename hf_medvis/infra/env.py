"""Environment report: versions of the training stack, GPUs, DeepSpeed op compatibility, checked against the
compatibility matrix in ``data/compat.yaml``. Fast enough (well under 2 s once torch is imported) to log at every start:
versions come from package metadata and DeepSpeed ops are probed with ``is_compatible()``, never built."""

from __future__ import annotations

import configparser
import contextlib
import importlib.metadata as metadata
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from .acpt import acpt_names, check_acpt, failure_reasons
from .catalog import load_data
from .versions import base_version, satisfies

# Distributions reported, in this order. Requirements between them are checked too (a "pip check" of the stack).
STACK: tuple[str, ...] = (
    "torch", "torchvision", "transformers", "datasets", "accelerate", "deepspeed", "evaluate", "adlfs", "numpy",
    "safetensors", "huggingface_hub",
)  # fmt: skip


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _source_version() -> str | None:
    # Not installed: run from a source tree, as an Azure ML job's code snapshot on PYTHONPATH is.
    from .. import __version__

    return f"{__version__} (source tree)"


def _torch_facts() -> dict[str, Any]:
    # torch is imported here, not at the top: `hf-medvis env` must also report on a node where it is missing or broken.
    import torch

    facts: dict[str, Any] = {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}
    try:
        facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        facts["cudnn"] = None
    facts["nccl"] = None
    if torch.version.cuda and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        try:
            version = torch.cuda.nccl.version()
            facts["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (RuntimeError, AttributeError):
            pass
    facts["arch_list"] = torch.cuda.get_arch_list() if torch.version.cuda else []
    facts["cuda_available"] = torch.cuda.is_available()
    return facts


def _gpus() -> list[dict[str, Any]]:
    # imported here for the reason given in _torch_facts
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 2),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return gpus


def _deepspeed_ops() -> tuple[dict[str, bool] | None, dict[str, Any]]:
    """{op: compatible} from DeepSpeed's own builders (probe only), plus what its prebuilt ops were compiled against."""
    try:
        # DeepSpeed's logger writes its import-time notices to stdout; keep stdout clean for --json.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.git_version_info import installed_ops, torch_info
            from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception:  # not installed, or broken enough that importing fails: reported as no ops
        return None, {}
    ops = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            ops[name] = bool(builder.is_compatible(False))
        except Exception:  # a probe that itself fails means "cannot build here", as ds_report treats it
            ops[name] = False
    prebuilt = sorted(name for name, built in installed_ops.items() if built)
    return ops, {"prebuilt_ops": prebuilt, "built_with_torch": torch_info.get("version")}


def collect_env_report(
    versions: Mapping[str, str | None] | None = None,
    gpus: list[dict[str, Any]] | None = None,
    include_deepspeed_ops: bool = True,
) -> dict[str, Any]:
    """Everything ``hf-medvis env`` reports, as a JSON-ready dict, with ``problems`` already checked.

    ``versions`` overrides detected versions (keys: "python" or a distribution name; None = not installed), to check
    a planned image before using it; ``gpus`` overrides the detected GPU list (dicts as in the report).
    """
    overrides = dict(versions or {})
    packages = {name: _installed_version(name) for name in STACK}
    packages["hf_medvis"] = _installed_version("hf_medvis") or _source_version()
    packages.update({k: v for k, v in overrides.items() if k != "python"})
    report: dict[str, Any] = {
        "python": overrides.get("python") or platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "assumed": sorted(overrides),
        "torch": _torch_facts() if packages.get("torch") and "torch" not in overrides else {},
        "gpus": _gpus() if gpus is None and packages.get("torch") else (gpus or []),
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
    }
    if include_deepspeed_ops and packages.get("deepspeed") and "deepspeed" not in overrides:
        report["deepspeed_ops"], report["deepspeed_build"] = _deepspeed_ops()
    else:
        report["deepspeed_ops"], report["deepspeed_build"] = None, {}
    report["problems"] = check_env(report)
    requirements = package_requirements()
    report["acpt_images"] = []
    for name in acpt_names():
        check = check_acpt(name, requirements)
        report["acpt_images"].append({"name": name, "usable": check["usable"], "reasons": failure_reasons(check)})
    return report


def _problem(severity: str, pid: str, reason: str, fix: str) -> dict[str, str]:
    return {"severity": severity, "id": pid, "reason": reason, "fix": fix}


def _version_of(report: Mapping[str, Any], name: str) -> str | None:
    return report["python"] if name == "python" else report["packages"].get(name)


def declared_requirements(extras: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """This package's ``python_requires`` and requirement lines (install_requires plus the named extras).

    From the installed metadata; when hf_medvis runs from a source tree that is not installed (an Azure ML job's code
    snapshot on PYTHONPATH), from the setup.cfg beside the package.
    """
    try:
        python = str(metadata.metadata("hf_medvis").get("Requires-Python", ""))
        lines = []
        for line in metadata.requires("hf_medvis") or []:
            requirement = Requirement(line)
            if requirement.marker is None:
                lines.append(line)
            elif any(requirement.marker.evaluate({"extra": extra}) for extra in extras):
                requirement.marker = None
                lines.append(str(requirement))
        return python, lines
    except metadata.PackageNotFoundError:
        setup_cfg = Path(__file__).resolve().parents[2] / "setup.cfg"
        if not setup_cfg.is_file():
            raise ValueError("hf_medvis is neither installed nor run from its source tree (no setup.cfg)") from None
        config = configparser.ConfigParser()
        config.read(setup_cfg)
        options = config["options"]
        lines = _cfg_lines(options.get("install_requires", ""))
        for extra in extras:
            lines += _cfg_lines(config["options.extras_require"].get(extra, ""))
        return options.get("python_requires", ""), lines


def _cfg_lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def package_requirements() -> dict[str, str]:
    """This package's declared minimum versions (setup.cfg's python_requires and install_requires) for the packages
    compat.yaml lists."""
    python, lines = declared_requirements()
    declared = {"python": python}
    for line in lines:
        requirement = Requirement(line)
        declared[requirement.name.lower().replace("-", "_")] = str(requirement.specifier)
    return {name: declared[name] for name in load_data("compat")["requirements"] if declared.get(name)}


def _requirement_problems(report: Mapping[str, Any]) -> list[dict[str, str]]:
    problems = []
    for name, spec in package_requirements().items():
        found = _version_of(report, name)
        if found is None:
            problems.append(
                _problem(
                    "error",
                    f"{name}-missing",
                    f"{name} is not installed (hf_medvis needs {name}{spec})",
                    f'pip install "{name}{spec}"',
                )
            )
        elif not satisfies(found, spec):
            problems.append(
                _problem(
                    "error",
                    f"{name}-too-old",
                    f"{name} {found} does not satisfy hf_medvis's {name}{spec}",
                    f'pip install "{name}{spec}"',
                )
            )
    return problems


def _stack_problems(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """Requirements the installed stack declares on itself (torchvision pins torch, datasets pins fsspec, ...)."""
    problems = []
    assumed = set(report.get("assumed", ()))
    for dist_name in STACK:
        if dist_name in assumed or report["packages"].get(dist_name) is None:
            continue  # the metadata on disk describes the installed version, not an assumed one
        try:
            requires = metadata.requires(dist_name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = req.name.lower().replace("-", "_")
            if key not in STACK or not str(req.specifier):
                continue
            found = report["packages"].get(key)
            if found is not None and not satisfies(found, str(req.specifier)):
                problems.append(
                    _problem(
                        "error",
                        f"{dist_name}-needs-{key}",
                        f"{dist_name} {report['packages'][dist_name]} requires {key}{req.specifier}, found {found}",
                        f'install matching versions, e.g. pip install "{key}{req.specifier}" or a {dist_name} built for {key} {found}',
                    )
                )
    return problems


def _known_bad_problems(report: Mapping[str, Any]) -> list[dict[str, str]]:
    problems = []
    for rule in load_data("compat")["known_bad"]:
        if all(satisfies(_version_of(report, name), spec) for name, spec in rule["when"].items()):
            problems.append(_problem(rule["severity"], rule["id"], rule["reason"], rule["fix"]))
    return problems


def _arch_supported(capability: str, arch_list: list[str]) -> bool:
    """A cubin runs on the same major with an equal or higher minor; PTX (compute_XY) JIT-compiles for newer GPUs."""
    major, minor = (int(x) for x in capability.split("."))
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        digits = digits.rstrip("af")  # sm_90a / sm_100f are arch-specific variants of the base arch
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _hardware_problems(report: Mapping[str, Any]) -> list[dict[str, str]]:
    problems = []
    torch_facts = report.get("torch") or {}
    arch_list = torch_facts.get("arch_list") or []
    for gpu in report.get("gpus", []):
        cc = gpu["compute_capability"]
        if arch_list and not _arch_supported(cc, arch_list):
            problems.append(
                _problem(
                    "error",
                    "gpu-arch-unsupported",
                    f"GPU {gpu['index']} ({gpu['name']}, sm_{cc.replace('.', '')}) is not in this torch build's arch list {' '.join(arch_list)}",
                    "install a torch wheel built for this GPU (an older CUDA build, e.g. the cu126 index) or use a newer GPU",
                )
            )
        if float(cc) < 8.0:
            problems.append(
                _problem(
                    "warning",
                    "no-bf16",
                    f"GPU {gpu['index']} ({gpu['name']}, compute capability {cc}) has no bf16 support",
                    "train with --fp16 (DeepSpeed fp16) or fp32 instead of --bf16",
                )
            )
    if (
        torch_facts
        and not torch_facts.get("cuda_available")
        and os.path.exists("/dev/nvidia0")
        and not report.get("assumed")
    ):
        problems.append(
            _problem(
                "error",
                "cuda-unusable",
                f"an NVIDIA device is present but torch (CUDA {torch_facts.get('cuda')}) cannot use it",
                "the driver is probably older than this torch build needs: install a torch wheel for an older CUDA or update the driver",
            )
        )
    build = report.get("deepspeed_build") or {}
    torch_version = report["packages"].get("torch")
    built_with = build.get("built_with_torch")
    if build.get("prebuilt_ops") and built_with and torch_version:
        built, running = base_version(built_with), base_version(torch_version)
        if built and running and built.release[:2] != running.release[:2]:
            problems.append(
                _problem(
                    "error",
                    "deepspeed-ops-torch-mismatch",
                    f"DeepSpeed ops {', '.join(build['prebuilt_ops'])} were compiled against torch {built_with}, running torch {torch_version}",
                    "reinstall DeepSpeed against this torch: pip install --force-reinstall --no-cache-dir deepspeed (JIT ops), or DS_BUILD_OPS=1 to prebuild",
                )
            )
    return problems


def check_env(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """Problems found in a report: each a dict with severity (error|warning), id, reason and fix."""
    return (
        _requirement_problems(report)
        + _stack_problems(report)
        + _known_bad_problems(report)
        + _hardware_problems(report)
    )


def env_exit_code(report: Mapping[str, Any]) -> int:
    """1 when the report holds a known-bad combination (an error), else 0."""
    return 1 if any(p["severity"] == "error" for p in report["problems"]) else 0


def format_env_report(report: Mapping[str, Any]) -> str:
    """Human-readable report, one fact per line, for the console and the recipes' start-up log."""
    packages = report["packages"]
    torch_facts = report.get("torch") or {}
    lines = [f"python {report['python']} on {report['platform']}"]
    lines.append("  " + ", ".join(f"{name} {packages[name] or '-'}" for name in packages))
    if torch_facts:
        lines.append(
            f"  torch CUDA {torch_facts.get('cuda') or '-'}, cuDNN {torch_facts.get('cudnn') or '-'}, NCCL {torch_facts.get('nccl') or '-'}, "
            f"arch list {' '.join(torch_facts.get('arch_list') or []) or '-'}"
        )
    if report.get("assumed"):
        lines.append(f"  assumed versions (not detected): {', '.join(report['assumed'])}")
    if report["gpus"]:
        for gpu in report["gpus"]:
            lines.append(
                f"  GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['compute_capability']}"
            )
    else:
        lines.append("  GPUs: none visible")
    if report.get("nccl_env"):
        lines.append("  " + " ".join(f"{k}={v}" for k, v in report["nccl_env"].items()))
    ops = report.get("deepspeed_ops")
    if ops is not None:
        ok = [name for name, compatible in ops.items() if compatible]
        no = [name for name, compatible in ops.items() if not compatible]
        lines.append(f"  DeepSpeed ops that can build: {', '.join(ok) or 'none'}; cannot: {', '.join(no) or 'none'}")
    images = report.get("acpt_images") or []
    if images:
        lines.append(
            "  ACPT images (documented contents): "
            + "; ".join(
                f"{i['name']} {'usable' if i['usable'] else 'not usable: ' + ', '.join(i['reasons'])}" for i in images
            )
        )
    problems = report["problems"]
    if not problems:
        lines.append("compatibility: OK")
    for p in problems:
        lines.append(f"{p['severity'].upper()} [{p['id']}]: {p['reason']}. Fix: {p['fix']}")
    return "\n".join(lines)
