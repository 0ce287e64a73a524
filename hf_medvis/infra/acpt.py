"""Azure ML's curated ACPT environments as their definitions document them (``data/compat.yaml``), and whether one can
carry hf_medvis: which builds a name has had, what each holds, and what the job's environment installs on top.

Only what cannot change on top of the image is binding: Python, and torch / torchvision, which the job's install step
pins to the image's own CUDA builds. Everything else (transformers, datasets, DeepSpeed, ...) the install step brings
to this package's declared ranges, so an old or undocumented version of it in the image is not a reason to refuse."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from .catalog import load_data
from .versions import satisfies

CURATED_REGISTRY = "mcr.microsoft.com/azureml/curated"
BINDING = ("python", "torch", "torchvision")  # kept as the image has them (see the module docstring)
_SPELLINGS = re.compile(
    r"^(?:azureml:)?(?:azureml-)?(?P<name>acpt-[a-z0-9.\-]+?)(?:(?:@(?P<label>[a-z]+))|(?::(?P<version>\d+)))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AcptReference:
    """A curated ACPT environment: its name and a pinned version (None: the latest)."""

    name: str
    version: str | None = None

    @property
    def image(self) -> str:
        """The curated image a Dockerfile can build FROM."""
        return f"{CURATED_REGISTRY}/{self.name}:{self.version or 'latest'}"

    @property
    def slug(self) -> str:
        """``name`` or ``name-version``, for folder and environment names."""
        return self.name + (f"-{self.version}" if self.version else "")


def parse_acpt_reference(value: str) -> AcptReference | None:
    """An ACPT environment from any of its spellings (``acpt-pytorch-2.8-cuda12.6``, ``AzureML-acpt-...@latest``,
    ``azureml:AzureML-acpt-...:12``, ``mcr.microsoft.com/azureml/curated/acpt-...:12``), or None when ``value`` names
    no ACPT environment."""
    text = value.strip()
    if text.lower().startswith(CURATED_REGISTRY + "/"):
        text = text[len(CURATED_REGISTRY) + 1 :].replace(":latest", "")
    match = _SPELLINGS.match(text)
    if match is None:
        return None
    if match.group("label") and match.group("label").lower() != "latest":
        raise ValueError(f"environment '{value}': the only label curated environments have is @latest")
    return AcptReference(match.group("name").lower(), match.group("version"))


def acpt_names() -> list[str]:
    """Documented names, newest first, each once."""
    return list(dict.fromkeys(build["name"] for build in load_data("compat")["acpt_images"]))


def _binding_requirements(requirements: dict[str, str]) -> dict[str, str]:
    return {name: spec for name, spec in requirements.items() if name in BINDING}


def check_build(build: dict[str, Any], requirements: dict[str, str]) -> dict[str, Any]:
    """One documented build against the requirements: reasons it cannot carry hf_medvis, and what is undocumented."""
    reasons, undocumented = [], []
    for name, spec in _binding_requirements(requirements).items():
        if name not in build:
            if name != "torchvision":  # the install step adds a torchvision built for the image's torch
                undocumented.append(name)
                reasons.append(f"{name} is not documented for this build (needs {name}{spec})")
        elif not satisfies(str(build[name]), spec):
            reasons.append(f"{name} {build[name]} (needs {name}{spec})")
    return {**build, "usable": not reasons, "reasons": reasons, "undocumented": undocumented}


def check_acpt(name: str, requirements: dict[str, str]) -> dict[str, Any]:
    """Every documented build of ``name`` checked; usable only when all are (``@latest`` or a version number does
    not tell which build a workspace gets)."""
    builds = [b for b in load_data("compat")["acpt_images"] if b["name"] == name]
    if not builds:
        raise ValueError(f"unknown ACPT environment '{name}' (documented: {', '.join(acpt_names())})")
    checked = [check_build(build, requirements) for build in builds]
    installed_by_job = [
        f"{pkg}{spec}" for pkg, spec in requirements.items() if pkg not in BINDING or pkg == "torchvision"
    ]
    return {
        "name": name,
        "image": AcptReference(name).image,
        "builds": checked,
        "usable": all(b["usable"] for b in checked),
        "installed_by_job": installed_by_job,
        "requirements": dict(requirements),
    }


def failure_reasons(check: dict[str, Any]) -> list[str]:
    """Every reason of every build of a ``check_acpt`` result, each with the date of the build it concerns."""
    return [f"{reason} ({build['checked']} build)" for build in check["builds"] for reason in build["reasons"]]


def default_acpt_name(requirements: dict[str, str]) -> str:
    """The newest documented ACPT environment whose every build can carry hf_medvis."""
    for name in acpt_names():
        if check_acpt(name, requirements)["usable"]:
            return name
    raise ValueError("no documented ACPT environment meets hf_medvis's requirements (hf_medvis/infra/data/compat.yaml)")


def _describe(build: dict[str, Any]) -> str:
    parts = [f"Ubuntu {build['ubuntu']}" if "ubuntu" in build else None]
    parts += [f"{key} {build[key]}" for key in ("python", "torch", "torchvision", "cuda", "deepspeed") if key in build]
    return ", ".join(p for p in parts if p)


def format_acpt_check(check: dict[str, Any]) -> str:
    """Human-readable ``hf-medvis env --image`` report: only what the image's definition documents."""
    lines = [f"ACPT environment {check['name']} ({check['image']}): documented contents, not this machine"]
    for index, build in enumerate(check["builds"], 1):
        where = f" on {build['base_image']}" if build.get("base_image") else ""
        lines.append(f"  build {index}{where}: {_describe(build)}")
        lines.append(f"    source: {' '.join(str(build['source']).split())} (read {build['checked']})")
    lines.append(
        "  installed on top by the job environment's install step (to hf_medvis's ranges): "
        + ", ".join(check["installed_by_job"])
    )
    if check["usable"]:
        lines.append("compatibility: OK")
        return "\n".join(lines)
    for index, build in enumerate(check["builds"], 1):
        for reason in build["reasons"]:
            package = reason.split()[0]
            problem = "undocumented" if package in build["undocumented"] else "too-old"
            lines.append(f"ERROR [{package}-{problem}]: build {index} ({build['checked']}): {reason}")
    if len(check["builds"]) > 1:
        lines.append(
            "  (the builds of one name differ, and a workspace's @latest or version number does not say which)"
        )
    with contextlib.suppress(ValueError):  # no documented name passes: nothing to suggest
        lines.append(f"Fix: use the ACPT environment {default_acpt_name(check['requirements'])}")
    return "\n".join(lines)
