"""Process-level setup shared by the recipes: logging and the translation of setup failures into one-line errors."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import transformers
from transformers import TrainingArguments

from .hub import HubNotReadyError


def setup_logging(args: TrainingArguments) -> None:
    """Rank-tagged log lines; replicas log warnings only unless asked (``--log_level_replica``)."""
    rank = args.process_index
    logging.basicConfig(
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    level = args.get_process_log_level()
    if args.should_log and args.log_level == "passive":
        level = logging.INFO  # the main process tells the user what it is doing
    logging.getLogger().setLevel(level)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # Library chatter (every config save, every shard) stays at WARNING unless the user asks for more.
    library_level = level if args.log_level not in ("passive",) else logging.WARNING
    datasets.utils.logging.set_verbosity(max(library_level, logging.WARNING))
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


@contextlib.contextmanager
def recipe_errors() -> Iterator[None]:
    """Bad input found while setting up (data, model, output folder, Hub) -> one line on stderr, exit status 1."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, HubNotReadyError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}") from None
