"""Output-folder policy: never silently mix two runs in one folder."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


class OutputDirError(ValueError):
    pass


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint last`` -> the newest complete checkpoint in output_dir (None when there is none yet,
    so a preempted job's first attempt and its restarts run the same command)."""
    resume = args.resume_from_checkpoint
    if resume in (None, "", "false", "False"):
        return None
    if resume in ("last", "latest", "true", "True"):
        folder = Path(args.output_dir)
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if last is None:
            logger.info("--resume_from_checkpoint %s: no checkpoint in %s yet, starting fresh", resume, folder)
        return last
    if not Path(resume).is_dir():
        raise OutputDirError(f"--resume_from_checkpoint: no checkpoint folder at {resume}")
    return resume


def check_output_dir(args: TrainingArguments, overwrite: bool, resuming: bool) -> None:
    """An output_dir that already holds another run is an error unless the user asked to overwrite or resume."""
    folder = Path(args.output_dir)
    if not folder.exists() or overwrite or resuming:
        return
    if not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder} exists and is not a folder")
    if any(folder.iterdir()):
        raise OutputDirError(
            f"--output_dir {folder} already holds another run; pass --overwrite_output_dir to replace it "
            "or --resume_from_checkpoint last to continue it"
        )
