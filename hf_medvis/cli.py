"""The ``hf-medvis`` command. Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func`` default takes the parsed namespace and returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .core.errors import one_line
from .core.storage import explain_storage_error

# One module per subcommand (or family of subcommands); add a line here to add a command.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "hf_medvis.data.phantoms_cli",
    "hf_medvis.data.prepare_cli",
    "hf_medvis.infra.nccl_cli",
    "hf_medvis.infra.env_cli",
    "hf_medvis.infra.size_cli",
    "hf_medvis.infra.logs_cli",
    "hf_medvis.infra.aml_cli",
    "hf_medvis.data.split_cli",
    "hf_medvis.evaluation.cli",
    "hf_medvis.models.import_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-medvis", description="Medical vision transformers on the Hugging Face stack."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings of the library (a labels file with mixed patient-id spellings, ...) reach the terminal once, plainly.
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # Bad input (including storage that refuses our credentials): one line naming what is wrong, no traceback.
        message = explain_storage_error(err)
        if message is None and isinstance(err, (ValueError, FileExistsError, FileNotFoundError, PermissionError)):
            message = one_line(err)
        if message is None:
            raise
        print(f"hf-medvis {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
