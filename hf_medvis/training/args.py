"""Recipe argument parsing: HfArgumentParser dataclasses plus ``--config FILE.yaml`` whose keys are the argument names.

Precedence: command-line flags > config file > dataclass defaults. The YAML is turned into ``--key value`` tokens placed
before the real command line, so argparse's "last one wins" gives the precedence and every value goes through the same
type conversion and validation as a flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser


class RecipeArgumentError(SystemExit):
    """A bad argument. Uncaught, the interpreter prints the one-line message to stderr and exits with status 1."""

    def __init__(self, message: str):
        self.message = message if message.startswith(_prog()) else f"{_prog()}: error: {message}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _prog() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "hf_medvis"


class RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line naming the argument, not a page of usage."""

    def error(self, message: str) -> NoReturn:
        raise RecipeArgumentError(message)


def _yaml_to_tokens(config: dict[str, Any], known: set[str], config_path: str) -> list[str]:
    tokens: list[str] = []
    for key, value in config.items():
        if key == "config":
            raise RecipeArgumentError(f"config file {config_path}: 'config' cannot be nested")
        if key not in known:
            raise RecipeArgumentError(f"config file {config_path}: unknown key '{key}' (not an argument of this recipe)")
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            tokens += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            tokens += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            import json

            tokens += [flag, json.dumps(value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeArgumentError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RecipeArgumentError(f"--config: {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeArgumentError(f"--config: {path} must hold a mapping of argument names to values")
    return data


def parse_recipe_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parses ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config FILE.yaml`` may appear anywhere; its keys must be argument names of the given dataclasses.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeArgumentParser(dataclass_types)
    known = {action.dest for action in parser._actions if action.dest != "help"}

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre_args, rest = pre.parse_known_args(argv)
    tokens: list[str] = []
    if pre_args.config:
        tokens = _yaml_to_tokens(load_config_file(pre_args.config), known, pre_args.config)
    # Let the parser see which config was used (recipes record it in the model card).
    if "config" in known and pre_args.config:
        rest = [*rest, "--config", pre_args.config]
    try:
        return parser.parse_args_into_dataclasses(args=tokens + rest, look_for_args_file=False)
    except ValueError as err:  # unknown arguments, or a dataclass __post_init__ check
        message = " ".join(str(err).split())
        raise RecipeArgumentError(message) from None
