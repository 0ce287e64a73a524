"""What reaches the experiment trackers of ``--report_to``: our callbacks' metrics, the final numbers, and one MLflow run
per job.

- The Trainer calls its reporters (MLflow, TensorBoard, ...) before user callbacks, so keys our callbacks add to a log
  (throughput, alerts) would never reach them: ``arrange_reporters`` moves callbacks that add to the logs
  (``adds_to_logs = True``) ahead of the first reporter, keeping their order.
- ``reporting_run`` holds one MLflow run open (rank 0) around training and the final evaluation: transformers'
  MLflowCallback then logs into it and neither ends it at the end of training nor opens a second one for the final
  numbers. The run is ``MLFLOW_RUN_ID``'s when set (Azure ML sets it for a job's run), else the one recorded in
  ``output_dir/mlflow_run.json`` when the job resumes, else a new one (recorded there).
- TensorBoard: one folder per job too. ``JobTensorBoardCallback`` writes every attempt of a job into the folder the
  first attempt chose (``output_dir/runs/<time>_<host>``, recorded in ``output_dir/tensorboard_run.json``), and a
  resumed attempt purges what the interrupted one logged after its checkpoint, so the charts show one line per job
  with each step once.
- ``--report_to azure_ml`` means "Azure ML reads the job's MLflow metrics": it becomes ``mlflow`` (transformers' own
  azure_ml reporter needs the retired azureml-core v1 SDK).

mlflow is imported only when MLflow reporting is on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.integrations.integration_utils import (
    INTEGRATION_TO_CALLBACK,
    MLflowCallback,
    TensorBoardCallback,
    default_logdir,
)
from transformers.trainer_callback import CallbackHandler

from ..data.storage import write_json_atomic
from .outputs import resume_requested

logger = logging.getLogger(__name__)

RUN_RECORD = "mlflow_run.json"
TENSORBOARD_RECORD = "tensorboard_run.json"
_MODULES = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard", "tensorboardX")}  # reporter -> modules, any one


def resolve_reporters(args: TrainingArguments) -> None:
    """``azure_ml`` -> ``mlflow`` (one INFO line). A reporter whose package is missing, or an MLflow tracking store that
    cannot be opened, is a one-line error here, before any data is read, rather than a traceback later."""
    reporters = list(args.report_to or [])
    if "azure_ml" in reporters:
        reporters = list(dict.fromkeys("mlflow" if r == "azure_ml" else r for r in reporters))
        logger.info(
            "--report_to azure_ml: reporting to MLflow, whose metrics Azure ML shows for the job "
            "(MLFLOW_TRACKING_URI and MLFLOW_RUN_ID are set by Azure ML; install hf_medvis[tracking] azureml-mlflow)"
        )
        args.report_to = reporters
    for reporter in reporters:
        modules = _MODULES.get(reporter, ())
        if modules and not any(importlib.util.find_spec(module) for module in modules):
            raise ValueError(
                f"--report_to {reporter} needs the {modules[0]} package: pip install 'hf_medvis[tracking]'"
            )
    if "mlflow" in reporters and args.process_index == 0:
        _check_tracking_store()


def _check_tracking_store() -> None:
    """Opens the tracking store as the run will. Without MLFLOW_TRACKING_URI MLflow 3 defaults to a sqlite store, which
    mlflow-skinny cannot open; MLflow 3 refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true."""
    import mlflow

    try:
        mlflow.tracking.MlflowClient()
    except Exception as err:  # the store's own errors vary by scheme and plugin: report any as the setup error it is
        first = " ".join(str(err).split()).split(". ")[0] or type(err).__name__
        raise ValueError(
            f"--report_to mlflow: cannot open the MLflow tracking store {mlflow.get_tracking_uri()} ({first}); set "
            "MLFLOW_TRACKING_URI to an MLflow server (Azure ML sets its own in jobs) or to file:./mlruns with "
            "MLFLOW_ALLOW_FILE_STORE=true"
        ) from None


def reports_to_mlflow(args: TrainingArguments) -> bool:
    return "mlflow" in (args.report_to or [])


# --- callback order ---------------------------------------------------------------------------------------------------


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
                _shorten(keeper.changed),
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
    recorded = _recorded(record, "logging_dir") if resumed else None
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


def _shorten(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- one MLflow run per job -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reporting_run(args: TrainingArguments) -> Iterator[str | None]:
    """Holds the job's MLflow run open (rank 0, MLflow reporting on) and yields its id; ends it FINISHED, FAILED on an
    error, KILLED on an exit (a preemption: the restart continues the run). A run the caller already has open (a
    notebook's ``with mlflow.start_run():``) is logged into and left open. Otherwise does nothing and yields None."""
    if not (reports_to_mlflow(args) and args.process_index == 0):
        yield None
        return
    import mlflow

    if mlflow.active_run() is not None:
        yield mlflow.active_run().info.run_id
        return
    run_id = _start_run(mlflow, args)
    status = "FINISHED"
    try:
        yield run_id
    except (SystemExit, KeyboardInterrupt):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.flush_async_logging()  # MLflowCallback logs asynchronously: all of it is stored before the end
            mlflow.end_run(status=status)


def _start_run(mlflow: Any, args: TrainingArguments) -> str:
    # MLflow itself takes MLFLOW_RUN_ID out of the environment once a run uses it; done here as well, because
    # MLflowCallback.setup would otherwise start that run a second time on top of this one and fail.
    from_env = os.environ.pop("MLFLOW_RUN_ID", None)
    record = Path(args.output_dir or ".") / RUN_RECORD
    recorded = _recorded(record, "run_id") if resume_requested(args) else None
    run = None
    if from_env:
        run = mlflow.start_run(run_id=from_env)
        logger.info("MLflow: logging into run %s (MLFLOW_RUN_ID)", from_env)
    elif recorded:
        try:
            run = mlflow.start_run(run_id=recorded)
            logger.info("MLflow: resumed job continues run %s (%s)", recorded, record.name)
        except mlflow.exceptions.MlflowException as err:
            logger.warning("MLflow run %s of %s cannot be continued (%s): starting a new run", recorded, record, err)
    if run is None:
        run = mlflow.start_run(run_name=args.run_name)
        logger.info("MLflow: new run %s in experiment %s", run.info.run_id, run.info.experiment_id)
    run_id = run.info.run_id
    write_json_atomic(record, {"run_id": run_id, "experiment_id": run.info.experiment_id})
    return run_id


def _recorded(record: Path, key: str) -> str | None:
    """``key`` of a job's record (mlflow_run.json, tensorboard_run.json); None when missing or unreadable."""
    try:
        return str(json.loads(record.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the final numbers ------------------------------------------------------------------------------------------------


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers among ``metrics`` as Python int/float (reporters drop anything else with a WARNING; numpy scalars
    included, which MLflow's callback does not take)."""
    numbers_only: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        numbers_only[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return numbers_only


def report_final_metrics(trainer: Trainer, metrics: Mapping[str, Any]) -> None:
    """Sends the numbers among ``metrics`` to the reporters (and the logs) at the current step through
    ``Trainer.log``, once. Every rank calls it, as the Trainer does for its evaluations; the reporters act on the
    main process only."""
    values = numeric_metrics(metrics)
    if values:
        trainer.log(values)
