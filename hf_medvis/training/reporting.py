"""What reaches the experiment trackers of ``--report_to``: reporter setup, one MLflow run per job, the final numbers.

- ``resolve_reporters``: ``--report_to azure_ml`` means "Azure ML reads the job's MLflow metrics": it becomes
  ``mlflow`` (transformers' own azure_ml reporter needs the retired azureml-core v1 SDK); a missing tracker package or
  an MLflow store that cannot be opened is one line before any data is read.
- ``reporting_run`` holds one MLflow run open (rank 0) around training and the final evaluation: transformers'
  MLflowCallback then logs into it and neither ends it at the end of training nor opens a second one for the final
  numbers. The run is ``MLFLOW_RUN_ID``'s when set (Azure ML sets it for a job's run), else the one recorded in
  ``output_dir/mlflow_run.json`` when the job resumes, else a new one (recorded there).
- The reporter callbacks themselves (one MLflow run and one TensorBoard folder per job, and their place among the
  callbacks) are in ``callbacks/reporters.py``.

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

from ..core.storage import write_json_atomic
from .outputs import resume_requested

logger = logging.getLogger(__name__)

RUN_RECORD = "mlflow_run.json"
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
    recorded = read_job_record(record, "run_id") if resume_requested(args) else None
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


def read_job_record(record: Path, key: str) -> str | None:
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
