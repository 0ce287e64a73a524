"""Output-folder policy: never silently mix two runs in one folder."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainingArguments

from .preemption import last_complete_checkpoint

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
        last = last_complete_checkpoint(folder)  # never one left half-written by a crash mid-save
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
    if holds_a_run(folder):
        raise OutputDirError(
            f"--output_dir {folder} already holds another run; pass --overwrite_output_dir to replace it "
            "or --resume_from_checkpoint last to continue it"
        )


# What a finished or interrupted run leaves; logs of a run that failed during setup do not count.
RUN_MARKERS = ("config.json", "model.safetensors", "trainer_state.json", "all_results.json", "checkpoint-*")


def holds_a_run(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in RUN_MARKERS)


def disable_evaluation_without_data(args: TrainingArguments, eval_dataset) -> None:
    """No evaluation set (e.g. shards without --validation_data): evaluate never, rather than fail in the Trainer."""
    from transformers.trainer_utils import IntervalStrategy

    if eval_dataset is None and args.eval_strategy != IntervalStrategy.NO:
        logger.warning("no evaluation data: --eval_strategy %s ignored", getattr(args.eval_strategy, "value", args.eval_strategy))
        args.eval_strategy = IntervalStrategy.NO
        args.do_eval = False
        if args.load_best_model_at_end:
            raise OutputDirError("--load_best_model_at_end needs evaluation data (--validation_data)")
