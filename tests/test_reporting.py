"""What reaches the experiment trackers: the real recipes with ``--report_to mlflow tensorboard`` into a real MLflow file
store and real TensorBoard event files, read back. Throughput, MFU and alert scalars at every logging step, the
fine-tune's final CIs and counts, one MLflow run per job (final evaluation and a resumed attempt included), a run given
by ``MLFLOW_RUN_ID`` (what Azure ML does), and ``--report_to azure_ml``."""

from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from conftest import load_recipe, output_defects

LOGGED = ("images_per_second", "data_wait_pct", "tflops_per_gpu", "mfu", "alerts_total", "loss")
# --peak_tflops gives MFU a peak on the CPU; an alert_data_wait of 0.01 % makes the data-wait alert fire at the first
# step it is judged at (the second log: the first one holds start-up).
MONITORING = "--logging_steps 1 --peak_tflops 1 --alert_data_wait 0.0001 --dataloader_num_workers 0".split()
MAE_ARGS = (
    "--per_device_train_batch_size 8 --eval_steps 2 --save_steps 2 --validation_split_percentage 20 "
    "--num_reconstruction_images 0"
).split()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """A file store of its own (MLflow 3 refuses one without MLFLOW_ALLOW_FILE_STORE), no MLflow variables from the
    caller's environment, and no run left active afterwards."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_NESTED_RUN", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.delenv("HF_MLFLOW_LOG_ARTIFACTS", raising=False)
    try:
        yield MlflowClient(tracking_uri=uri)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


def run_recipe(name: str, argv: list[str]) -> tuple[str, list[logging.LogRecord]]:
    """The recipe in this process: its log (stdout: the root logger's records, Python warnings included) and the
    WARNING-or-worse records of transformers and mlflow, which do not propagate to the root logger."""
    handler, log = _Records(), io.StringIO()
    loggers = [logging.getLogger("transformers"), logging.getLogger("mlflow")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with redirect_stdout(log):  # setup_logging logs to stdout
            load_recipe(name).main(argv)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return log.getvalue(), handler.records


def assert_clean(log: str, records: list[logging.LogRecord]) -> None:
    """No traceback, no error, nothing a reporter dropped, no warning from or about MLflow, TensorBoard or a reporter.
    (Expected warnings: the forced data-wait alert; transformers' note on checkpoint ordering by mtime.)"""
    assert not output_defects(log), output_defects(log)
    lines = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line or "CRITICAL" in line]
    lines += [f"{r.levelname} {r.name}: {r.getMessage()[:300]}" for r in records]
    suspect = ("dropped", "Traceback", "mlflow", "MLflow", "tensorboard", "transformers.integrations")
    assert not [line for line in lines if "ERROR" in line or "CRITICAL" in line or any(s in line for s in suspect)], (
        lines
    )


def all_runs(client) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def tensorboard_scalars(output_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under output_dir/runs (an attempt writes its own folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for folder in sorted((output_dir / "runs").iterdir()):
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def test_live_and_final_metrics_reach_mlflow_and_tensorboard(mlflow_store, phantom_dir, tmp_path):
    out = tmp_path / "ft"
    argv = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *MONITORING]
    argv += "--max_steps 4 --per_device_train_batch_size 8 --eval_steps 2 --save_steps 2".split()
    argv += "--validation_split_percentage 30 --ci_bootstrap_samples 20 --eval_subsample 8".split()
    log, records = run_recipe("finetune_vit", [*argv, "--report_to", "mlflow", "tensorboard"])
    assert_clean(log, records)

    (run,) = all_runs(mlflow_store)  # one run: training, its evaluations and the final numbers
    assert run.info.status == "FINISHED"
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    steps = [1, 2, 3, 4]
    for key in LOGGED:
        assert sorted(history(mlflow_store, run.info.run_id, key)) == steps, key
    (alert,) = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    assert alert["kind"] == "data_wait"
    assert history(mlflow_store, run.info.run_id, "alert_data_wait") == {alert["step"]: 1.0}
    assert history(mlflow_store, run.info.run_id, "alerts_total")[4] == 1.0

    results = json.loads((out / "all_results.json").read_text())
    # Only the final evaluation has CIs and counts; the point estimates were also logged by the evaluations in training.
    final = [k for k in results if k.startswith("eval_") and k.endswith(("_ci95_low", "_ci95_high"))]
    final += ["eval_images", "eval_patients"]
    assert "eval_auroc_macro_ci95_low" in final and "eval_auroc_Nodule_ci95_high" in final
    estimates = ["eval_auroc_macro", "eval_ap_macro", "eval_f1_macro", "eval_auroc_Nodule"]
    scalars = tensorboard_scalars(out)
    for key in final:
        assert history(mlflow_store, run.info.run_id, key) == {4: pytest.approx(results[key])}, key
        assert scalars[key.replace("eval_", "eval/", 1)] == {4: pytest.approx(results[key])}, key
    for key in estimates:  # the last value at step 4 is the final evaluation's
        assert history(mlflow_store, run.info.run_id, key)[4] == pytest.approx(results[key]), key
        assert scalars[key.replace("eval_", "eval/", 1)][4] == pytest.approx(results[key]), key

    for key in LOGGED:
        assert sorted(scalars[f"train/{key}"]) == steps, key
    assert scalars["train/alert_data_wait"] == {alert["step"]: 1.0}
    # trainer_state.json keeps the training's own log: its two evaluations, not the final numbers.
    state = json.loads((out / "trainer_state.json").read_text())
    assert len([r for r in state["log_history"] if "eval_auroc_macro" in r]) == 2


def test_one_mlflow_run_per_job_through_the_final_evaluation_and_a_resume(mlflow_store, phantom_dir, tmp_path):
    out = tmp_path / "mae"
    argv = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *MONITORING, *MAE_ARGS]
    argv += ["--report_to", "mlflow"]
    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "4"])
    assert_clean(log, records)
    (run,) = all_runs(mlflow_store)  # transformers alone opens a second run for the final evaluation
    run_id = run.info.run_id
    assert history(mlflow_store, run_id, "eval_loss_mean_patch").keys() == {4}  # the final evaluation's baselines
    assert 4 in history(mlflow_store, run_id, "eval_loss")

    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "6", "--resume_from_checkpoint", "last"])
    assert_clean(log, records)  # no ERROR from MLflow refusing to change the first attempt's parameters
    assert f"resumed job continues run {run_id}" in log
    (run,) = all_runs(mlflow_store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("loss", "images_per_second", "data_wait_pct", "alerts_total"):
        assert sorted(history(mlflow_store, run_id, key)) == [1, 2, 3, 4, 5, 6], key
    assert history(mlflow_store, run_id, "eval_loss_mean_patch").keys() == {4, 6}
    assert run.data.params["max_steps"] == "4"  # a run's parameters keep their first values


def test_one_tensorboard_run_per_job_with_each_step_once_after_a_resume(mlflow_store, phantom_dir, tmp_path):
    """A job resumed from an earlier checkpoint than its last log writes into the first attempt's folder, and
    TensorBoard drops what the first attempt logged after that checkpoint (purge_step): one line, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "mae"
    argv = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *MONITORING, *MAE_ARGS]
    argv += ["--report_to", "tensorboard"]
    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "4"])
    assert_clean(log, records)
    (folder,) = (out / "runs").iterdir()
    first = EventAccumulator(str(folder))
    first.Reload()
    first_losses = {e.step: e.value for e in first.Scalars("train/loss")}

    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-2")]
    log, records = run_recipe("pretrain_mae", [*argv, *resume])
    assert_clean(log, records)
    assert f"TensorBoard: resumed job continues {folder}" in log
    assert list((out / "runs").iterdir()) == [folder]
    events = EventAccumulator(str(folder))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the first attempt purged
    assert dict(losses)[2] == first_losses[2]
    # the resumed attempt replays steps 3-4 on the same samples: same losses (what the purge hides is a duplicate here)
    assert dict(losses)[3] == pytest.approx(first_losses[3], rel=1e-5)
    assert [e.step for e in events.Scalars("eval/loss_mean_patch")] == [6]  # the first final evaluation (4) purged too


def test_a_job_stopped_before_its_first_checkpoint_keeps_one_tensorboard_run(mlflow_store, phantom_dir, tmp_path):
    """Azure ML restarts a job with the same command (--resume_from_checkpoint last) also when the first attempt was
    stopped before any checkpoint: the restart starts from step 0 in the same folder and the first attempt's steps
    are purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "mae"
    argv = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *MONITORING, *MAE_ARGS]
    argv += ["--report_to", "tensorboard", "--resume_from_checkpoint", "last"]
    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "2", "--save_strategy", "no"])
    assert_clean(log, records)
    (folder,) = (out / "runs").iterdir()
    (out / "all_results.json").unlink()  # written last: without it the job did not finish, as when preempted

    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "3", "--save_strategy", "no"])
    assert_clean(log, records)
    assert list((out / "runs").iterdir()) == [folder]
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # the first attempt's 1 and 2 purged


def test_mlflow_run_id_from_the_environment_takes_everything(mlflow_store, phantom_dir, tmp_path, monkeypatch):
    """Azure ML creates the job's run and sets MLFLOW_RUN_ID; ``--report_to azure_ml`` reports through MLflow."""
    experiment = mlflow_store.create_experiment("azureml-job")
    job_run = mlflow_store.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", job_run)
    out = tmp_path / "mae"
    argv = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *MONITORING, *MAE_ARGS]
    log, records = run_recipe("pretrain_mae", [*argv, "--max_steps", "3", "--report_to", "azure_ml"])
    assert_clean(log, records)
    assert "--report_to azure_ml: reporting to MLflow" in log and f"logging into run {job_run} (MLFLOW_RUN_ID)" in log

    assert [r.info.run_id for r in all_runs(mlflow_store)] == [job_run]
    for key in ("loss", "images_per_second", "tflops_per_gpu", "mfu"):
        assert sorted(history(mlflow_store, job_run, key)) == [1, 2, 3], key
    assert history(mlflow_store, job_run, "eval_loss_position_mean").keys() == {3}
    assert mlflow_store.get_run(job_run).data.params["max_steps"] == "3"  # the Trainer's arguments as parameters


def test_callbacks_that_add_to_the_logs_run_before_the_reporters(tmp_path):
    from transformers import TrainingArguments
    from transformers.integrations import MLflowCallback, TensorBoardCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback

    from hf_medvis.training.args import MonitoringArguments
    from hf_medvis.training.callbacks import AlertCallback, LossHistoryCallback, ThroughputCallback
    from hf_medvis.training.callbacks.reporters import JobRunMLflowCallback, JobTensorBoardCallback, arrange_reporters
    from hf_medvis.training.reporting import numeric_metrics

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    history_cb = LossHistoryCallback(tmp_path)
    throughput, alerts = ThroughputCallback(MonitoringArguments(), args), AlertCallback(MonitoringArguments(), args)
    printer = PrinterCallback()
    handler = CallbackHandler(
        [DefaultFlowCallback(), MLflowCallback(), TensorBoardCallback(), history_cb, throughput, alerts, printer],
        None, None, None, None,
    )  # fmt: skip
    arrange_reporters(handler)
    order = handler.callbacks
    assert [type(cb) for cb in order[:3]] == [DefaultFlowCallback, ThroughputCallback, AlertCallback]
    assert isinstance(order[3], JobRunMLflowCallback) and isinstance(order[4], JobTensorBoardCallback)
    assert order[5:] == [history_cb, printer]

    metrics = {"a": np.float32(0.5), "b": np.int64(3), "c": None, "d": "text", "e": True, "f": 2}
    assert numeric_metrics(metrics) == {"a": 0.5, "b": 3, "f": 2}
    assert type(numeric_metrics(metrics)["a"]) is float and type(numeric_metrics(metrics)["b"]) is int


def test_report_to_parsing_and_a_missing_tracker_package(mlflow_store, monkeypatch, caplog):
    from hf_medvis.training import reporting
    from hf_medvis.training.args import PretrainingArguments, parse_recipe_args

    def parse(*argv: str) -> PretrainingArguments:
        return parse_recipe_args((PretrainingArguments,), [*argv, "--output_dir", "unused"])[0]

    assert parse("--report_to", "mlflow", "tensorboard").report_to == ["mlflow", "tensorboard"]
    assert parse("--report_to", "mlflow,tensorboard").report_to == ["mlflow", "tensorboard"]
    assert parse("--report_to", "none").report_to == [] and parse().report_to == []
    args = parse("--report_to", "azure_ml", "mlflow", "tensorboard")
    with caplog.at_level(logging.INFO, logger=reporting.__name__):
        reporting.resolve_reporters(args)
    assert args.report_to == ["mlflow", "tensorboard"]
    assert [r.getMessage() for r in caplog.records if "azure_ml" in r.getMessage()]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracking")
    with pytest.raises(ValueError, match="cannot open the MLflow tracking store nosuchscheme://tracking"):
        reporting.resolve_reporters(parse("--report_to", "mlflow"))
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ValueError, match=r"--report_to mlflow needs the mlflow package: pip install 'hf_medvis\[tracking\]'"
    ):
        reporting.resolve_reporters(parse("--report_to", "mlflow"))
