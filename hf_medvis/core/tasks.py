"""The task names, one spelling each: "mae" (masked-autoencoder pretraining), "classification" and "segmentation"
(fine-tuning)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

MAE = "mae"
CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
TASKS = (MAE, CLASSIFICATION, SEGMENTATION)

# Old spellings still accepted where a person types a task (``hf-medvis size --task classify``), with a warning.
DEPRECATED_ALIASES = {"classify": CLASSIFICATION}


def check_task(task: str) -> str:
    """``task`` itself when it is one of TASKS; otherwise a ValueError naming the choices."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}' (one of {', '.join(TASKS)})")
    return task


def resolve_task(name: str) -> str:
    """A task name as typed: a deprecated alias becomes its task, with one warning; anything else is checked."""
    if name in DEPRECATED_ALIASES:
        task = DEPRECATED_ALIASES[name]
        logger.warning("task '%s' is deprecated: use '%s'", name, task)
        return task
    return check_task(name)
