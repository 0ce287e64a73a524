"""Output-folder policy: never silently mix two runs in one folder."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from ..core.local_disk import format_size, free_bytes, mount_of
from ..models.weights import saved_model_differences
from .checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problem,
    is_complete,
    last_complete_checkpoint,
    numbered_checkpoints,
)

logger = logging.getLogger(__name__)


class OutputDirError(ValueError):
    pass


class ResumeMismatchError(ValueError):
    """The checkpoint to resume holds another model, or a stream position of other data or batches, than this run's."""


def resume_requested(args: TrainingArguments) -> bool:
    return args.resume_from_checkpoint not in (None, "", "false", "False")


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint last`` -> the newest complete checkpoint in output_dir (None when there is none yet,
    so a preempted job's first attempt and its restarts run the same command)."""
    resume = args.resume_from_checkpoint
    if not resume_requested(args):
        return None
    if resume in ("last", "latest", "true", "True"):
        folder = Path(args.output_dir)
        # Never one left half-written by a crash mid-save, nor one damaged since.
        last = last_complete_checkpoint(folder)
        if last is None and folder.is_dir() and numbered_checkpoints(folder):
            logger.warning(
                "--resume_from_checkpoint %s: no sound checkpoint in %s (each one is named above with what is wrong): "
                "starting fresh",
                resume,
                folder,
            )
        elif last is None:
            logger.info("--resume_from_checkpoint %s: no checkpoint in %s yet, starting fresh", resume, folder)
        return last
    folder = Path(resume)
    if not folder.is_dir():
        raise OutputDirError(f"--resume_from_checkpoint: no checkpoint folder at {resume}")
    if not is_complete(folder):
        raise OutputDirError(
            f"--resume_from_checkpoint {resume}: incomplete checkpoint (no {COMPLETE_MARKER}: interrupted while saving, "
            "or not written by hf_medvis); pass --resume_from_checkpoint last to take the newest complete one"
        )
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise OutputDirError(
            f"--resume_from_checkpoint {resume}: damaged checkpoint, it has {problem}; pass --resume_from_checkpoint "
            "last to take the newest sound one"
        )
    return resume


# The flags that set each architecture value (saved_model_differences), for the message.
_ARCHITECTURE_FLAGS = {
    "image_size": "--image_size",
    "patch_size": "--patch_size",
    "num_channels": "--num_channels",
    "labels": "labels (--classes, the labels file)",
}


def check_model_matches_checkpoint(config: PretrainedConfig, checkpoint: str | os.PathLike) -> None:
    """Raises ``ResumeMismatchError`` naming every architecture value in which the model built for this run differs
    from the checkpoint's (image size, preset, hidden size, classes...): its weights cannot continue this model."""
    differences = saved_model_differences(config, checkpoint)
    if not differences:
        return
    flags = sorted({_ARCHITECTURE_FLAGS.get(key, "--model_preset / --config_overrides") for key, _, _ in differences})
    found = "; ".join(f"{key} {saved} in the checkpoint, {now} now" for key, saved, now in differences)
    raise ResumeMismatchError(
        f"cannot resume from {checkpoint}: it holds another model ({found}); resume with the checkpoint's "
        f"{', '.join(flags)}, or start a new run in another --output_dir"
    )


FINAL_RESULTS = "all_results.json"  # the recipes write it last: a run that has it has finished


def finished_run_step(args: TrainingArguments, checkpoint: str | None) -> int | None:
    """The step at which the run in ``output_dir`` finished, when resuming ``checkpoint`` would only repeat it: its
    final results are there, from that checkpoint's step, and the run asks for no more steps (or epochs)."""
    results = Path(args.output_dir) / FINAL_RESULTS
    if not results.is_file() or not resume_requested(args):
        return None
    try:
        done = json.loads(results.read_text()).get("global_step")
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text()) if checkpoint else None
    except (OSError, ValueError):
        return None
    if state is None:  # finished without keeping a checkpoint: there is nothing to continue from
        return done
    if done is None or state.get("global_step") != done:
        return None  # the newest checkpoint is past the results: a later attempt trained on
    if args.max_steps > 0:
        return done if args.max_steps <= done else None
    same_epochs = float(state.get("num_train_epochs") or -1) == float(args.num_train_epochs)
    return done if same_epochs and 0 < (state.get("max_steps") or 0) <= done else None


def check_output_dir(args: TrainingArguments, overwrite: bool, resuming: bool) -> None:
    """An output folder that is a file or cannot be written is an error, and so is one that already holds another run
    unless the user asked to overwrite or resume. Nothing is left behind by the check."""
    folder = Path(args.output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder} exists and is not a folder")
    _check_writable(folder)
    if not folder.exists() or overwrite or resuming:
        return
    if holds_a_run(folder):
        raise OutputDirError(
            f"--output_dir {folder} already holds another run; pass --overwrite_output_dir to replace it "
            "or --resume_from_checkpoint last to continue it"
        )


def _check_writable(folder: Path) -> None:
    """Create-and-remove a probe in the folder, or in its nearest existing parent (the folder itself is made later)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"--output_dir {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputDirError(
            f"--output_dir {folder} cannot be written ({err.strerror or type(err).__name__})"
        ) from None


# What a finished or interrupted run leaves; logs of a run that failed during setup do not count.
RUN_MARKERS = ("config.json", "model.safetensors", "trainer_state.json", "all_results.json", "checkpoint-*")


def holds_a_run(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in RUN_MARKERS)


def disable_evaluation_without_data(args: TrainingArguments, eval_dataset: Any) -> None:
    """No evaluation set (e.g. shards without --validation_data): evaluate never, rather than fail in the Trainer."""
    if eval_dataset is None and args.eval_strategy != IntervalStrategy.NO:
        logger.warning(
            "no evaluation data: --eval_strategy %s ignored", getattr(args.eval_strategy, "value", args.eval_strategy)
        )
        args.eval_strategy = IntervalStrategy.NO
        args.do_eval = False
        if args.load_best_model_at_end:
            raise OutputDirError("--load_best_model_at_end needs evaluation data (--validation_data)")


def newest_checkpoint_bytes(output_dir: str | os.PathLike) -> int | None:
    """The size of the newest complete checkpoint in ``output_dir``: what the next one will take."""
    folder = Path(output_dir)
    complete = [p for _, p in numbered_checkpoints(folder) if is_complete(p)] if folder.is_dir() else []
    if not complete:
        return None
    return sum(p.stat().st_size for p in complete[0].rglob("*") if p.is_file())


def describe_write_failure(kind: str, output_dir: str | os.PathLike, what: str, need: int | None = None) -> str:
    """One line for a write of ``what`` (``checkpoint-12``, ``the final model``) into ``output_dir`` that failed
    (``write_failure_kind``): the filesystem, the space a checkpoint takes (``need``, else the newest one's), and how
    to go on."""
    device = mount_of(output_dir)
    rerun = "then rerun with --resume_from_checkpoint last (it continues from the last complete checkpoint)"
    if kind == "read-only":
        return (
            f"cannot write {what} under {output_dir}: {device} is read-only; make it writable (or pass another "
            f"--output_dir), {rerun}"
        )
    need, free = need or newest_checkpoint_bytes(output_dir), free_bytes(output_dir)
    if need is not None and free is not None:
        amount = f"free ~{format_size(max(need - free, 0) + need // 10)} (a checkpoint takes ~{format_size(need)}, {format_size(free)} free)"
    else:
        amount = "free space there" + (f" ({format_size(free)} free now)" if free is not None else "")
    reason = "no space left" if kind == "full" else "disk quota exceeded"
    return (
        f"{reason} on {device} for {what} under {output_dir}: {amount} or keep fewer checkpoints "
        f"(--save_total_limit), {rerun}"
    )
