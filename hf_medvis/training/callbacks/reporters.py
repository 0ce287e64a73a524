"""The ``--report_to`` reporters, job-aware, and their place among the callbacks.

- The Trainer calls its reporters (MLflow, TensorBoard, ...) before user callbacks, so keys our callbacks add to a log
  (throughput, alerts) would never reach them: ``arrange_reporters`` moves callbacks that add to the logs
  (``adds_to_logs = True``) ahead of the first reporter, keeping their order.
- MLflow: ``JobRunMLflowCallback`` logs into the job's run (held open by ``reporting.reporting_run``), leaving the
  parameters a resumed job's run already holds as they were.
- TensorBoard: one folder per job too. ``JobTensorBoardCallback`` writes every attempt of a job into the folder the
  first attempt chose (``output_dir/runs/<time>_<host>``, recorded in ``output_dir/tensorboard_run.json``), and a
  resumed attempt purges what the interrupted one logged after its checkpoint, so the charts show one line per job
  with each step once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.integrations.integration_utils import (
    INTEGRATION_TO_CALLBACK,
    MLflowCallback,
    TensorBoardCallback,
    default_logdir,
)
from transformers.trainer_callback import CallbackHandler

from ...core.storage import write_json_atomic
from ...core.text import short_list
from ..outputs import resume_requested
from ..reporting import read_job_record

logger = logging.getLogger(__name__)

TENSORBOARD_RECORD = "tensorboard_run.json"


def arrange_reporters(handler: CallbackHandler) -> None:
    """Callbacks that add metrics to the logs run before the reporters, in their own order; transformers' MLflowCallback
    becomes ``JobRunMLflowCallback`` and its TensorBoardCallback ``JobTensorBoardCallback``."""
    callbacks = handler.callbacks
    for index, callback in enumerate(callbacks):
        # exactly these types: subclasses (DagsHub's) and callbacks given a writer keep their own behaviour
        if type(callback) is MLflowCallback:
            callbacks[index] = JobRunMLflowCallback()
        elif type(callback) is TensorBoardCallback and callback.tb_writer is None:
            callbacks[index] = JobTensorBoardCallback()
    reporters = tuple(INTEGRATION_TO_CALLBACK.values())
    producers = [cb for cb in callbacks if getattr(cb, "adds_to_logs", False)]
    rest = [cb for cb in callbacks if not getattr(cb, "adds_to_logs", False)]
    first = next((i for i, cb in enumerate(rest) if isinstance(cb, reporters)), None)
    if producers and first is not None:
        callbacks[:] = rest[:first] + producers + rest[first:]


class JobRunMLflowCallback(MLflowCallback):
    """transformers' MLflowCallback, logging into the job's open run without trying to change its parameters.

    A resumed job logs the Trainer's arguments into a run that already holds the first attempt's, some with other
    values (``resume_from_checkpoint``, a raised ``max_steps``); MLflow refuses to change a logged parameter and drops
    the whole batch with an ERROR. Parameters the run already holds keep their first value; new ones are added."""

    def setup(self, args: TrainingArguments, state: Any, model: Any) -> None:
        run = self._ml_flow.active_run() if state.is_world_process_zero else None
        if run is None:
            super().setup(args, state, model)
            return
        logged = self._ml_flow.tracking.MlflowClient().get_run(run.info.run_id).data.params
        mlflow = self._ml_flow
        self._ml_flow = keeper = _KeepLoggedParams(mlflow, logged)
        try:
            super().setup(args, state, model)
        finally:
            self._ml_flow = mlflow
        if keeper.changed:
            logger.info(
                "MLflow run continued: %d parameters keep the values first logged (%s)",
                len(keeper.changed),
                short_list(keeper.changed),
            )


class JobTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoardCallback, writing all attempts of a job into one folder.

    transformers opens ``output_dir/runs/<time>_<host>`` per attempt: a preempted and resumed job shows as two runs
    whose lines overlap over the steps the first attempt logged after its last checkpoint. Here the first attempt's
    folder is recorded (``tensorboard_run.json``) and reused when the job resumes, with the writer's ``purge_step`` at
    the first step after the checkpoint: TensorBoard hides what the interrupted attempt logged from there on.
    ``TENSORBOARD_LOGGING_DIR``, when set, names the folder instead (still purged on resume)."""

    def __init__(self) -> None:
        super().__init__()
        self._purge_step: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # A resumed job is one restarted with --resume_from_checkpoint, as for MLflow: also when its first attempt
        # ended before any checkpoint (global_step 0), whose steps are then all purged.
        resumed = resume_requested(args)
        if state.is_world_process_zero and self.logging_dir is None and not state.is_hyper_param_search:
            self.logging_dir = str(_job_logging_dir(args, resumed))
        if state.is_world_process_zero and self.tb_writer is None and resumed:
            self._purge_step = state.global_step + 1  # step global_step was logged before its checkpoint was saved
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args: TrainingArguments) -> None:
        purge_step, self._purge_step = self._purge_step, None  # once: later writers (final evaluation) append
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=purge_step)


def _job_logging_dir(args: TrainingArguments, resumed: bool) -> Path:
    output_dir = Path(args.output_dir or ".")
    record = output_dir / TENSORBOARD_RECORD
    recorded = read_job_record(record, "logging_dir") if resumed else None
    if recorded and (output_dir / recorded).is_dir():
        logger.info("TensorBoard: resumed job continues %s", output_dir / recorded)
        return output_dir / recorded
    name = default_logdir()
    write_json_atomic(record, {"logging_dir": name})
    return output_dir / name


class _KeepLoggedParams:
    """The mlflow module, whose ``log_params`` leaves out the parameters a run already holds."""

    def __init__(self, mlflow: Any, logged: Mapping[str, str]) -> None:
        self._mlflow, self._logged = mlflow, logged
        self.changed: list[str] = []  # parameters whose value now differs from the logged one

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mlflow, name)

    def log_params(self, params: Mapping[str, Any], **kwargs: Any) -> Any:
        self.changed += sorted(k for k in params if k in self._logged and self._logged[k] != str(params[k]))
        fresh = {k: v for k, v in params.items() if k not in self._logged}
        return self._mlflow.log_params(fresh, **kwargs) if fresh else None
