"""``hf-medvis env``: versions, GPUs and DeepSpeed ops checked against the compatibility matrix."""

from __future__ import annotations

import argparse
import json

from .catalog import load_data

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="report versions, GPUs and DeepSpeed ops; exit 1 on a known-bad combination",
        description="Reports Python, torch (CUDA, cuDNN, NCCL), transformers, datasets, accelerate, deepspeed (and which "
        "of its ops can build here), evaluate, adlfs and the GPUs, checked against the compatibility matrix in "
        "hf_medvis/infra/data/compat.yaml. Exits 1 when a known-bad combination is found.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--assume",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="check a planned environment: replace a detected version (repeatable; NAME is python or a package)",
    )
    parser.add_argument(
        "--image", default=None, help="check an ACPT image's documented versions (e.g. acpt-pytorch-2.2-cuda12.1)"
    )
    parser.add_argument("--no-deepspeed-ops", action="store_true", help="skip probing DeepSpeed op compatibility")
    parser.set_defaults(func=run)


def parse_assumptions(items: list[str], image: str | None = None) -> dict[str, str]:

    versions: dict[str, str] = {}
    if image:
        images = {i["name"]: i for i in load_data("compat")["acpt_images"]}
        name = image.removeprefix("azureml:").removeprefix("AzureML-").split("@")[0].split(":")[0]
        if name not in images:
            raise ValueError(f"unknown ACPT image '{image}' (known: {', '.join(images)})")
        versions.update({k: str(v) for k, v in images[name].items() if k in ("python", "torch", "deepspeed")})
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"--assume expects NAME=VERSION, got '{item}'")
        versions[name.strip().lower().replace("-", "_")] = version.strip()
    return versions


def run(args: argparse.Namespace) -> int:
    from .env import collect_env_report, env_exit_code, format_env_report

    report = collect_env_report(
        versions=parse_assumptions(args.assume, args.image) or None, include_deepspeed_ops=not args.no_deepspeed_ops
    )
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return env_exit_code(report)
