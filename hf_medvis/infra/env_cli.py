"""``hf-medvis env``: versions, GPUs and DeepSpeed ops checked against the compatibility matrix."""

from __future__ import annotations

import argparse
import json

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
        "--image",
        default=None,
        help="check an Azure ML ACPT environment instead of this machine, from what its definition documents "
        "(e.g. acpt-pytorch-2.8-cuda12.6); every documented build of the name must pass",
    )
    parser.add_argument("--no-deepspeed-ops", action="store_true", help="skip probing DeepSpeed op compatibility")
    parser.set_defaults(func=run)


def parse_assumptions(items: list[str]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"--assume expects NAME=VERSION, got '{item}'")
        versions[name.strip().lower().replace("-", "_")] = version.strip()
    return versions


def run(args: argparse.Namespace) -> int:
    from .env import collect_env_report, env_exit_code, format_env_report, package_requirements

    if args.image:
        if args.assume:
            raise ValueError("--image checks an image's documented contents; --assume changes this machine's: use one")
        from .acpt import check_acpt, format_acpt_check, parse_acpt_reference

        reference = parse_acpt_reference(args.image)
        if reference is None:
            raise ValueError(f"--image: '{args.image}' is not an ACPT environment (e.g. acpt-pytorch-2.8-cuda12.6)")
        check = check_acpt(reference.name, package_requirements())
        print(json.dumps(check, indent=2) if args.json else format_acpt_check(check))
        return 0 if check["usable"] else 1
    report = collect_env_report(
        versions=parse_assumptions(args.assume) or None, include_deepspeed_ops=not args.no_deepspeed_ops
    )
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return env_exit_code(report)
