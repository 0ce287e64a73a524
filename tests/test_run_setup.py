"""``setup_run``: what the run setup changes (arguments, environment) is returned and logged, credentials never by value;
``setup_distributed_env`` reports the launcher variables it wrote."""

import logging

import pytest

from hf_medvis.training.args import FinetuningArguments, PretrainingArguments
from hf_medvis.training.distributed import setup_distributed_env
from hf_medvis.training.run import RunSetup, fit_run_to_data, setup_run


def _setup(args, launch, capsys):
    run = setup_run(args, launch)
    return run, capsys.readouterr().out  # setup_logging logs to stdout


def test_the_scaled_learning_rate_is_returned_and_logged_as_a_change(tmp_path, capsys):
    args = PretrainingArguments(
        output_dir=str(tmp_path / "run"),
        base_learning_rate=1.5e-4,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=4,
        report_to="none",
    )
    launch = {"DS_ACCELERATOR": (None, "cpu"), "AZURE_STORAGE_SAS_TOKEN": (None, "sv=2024&sig=c2VjcmV0")}
    run, log = _setup(args, launch, capsys)
    expected = 1.5e-4 * 16 * 4 / 256  # MAE's rule, world size 1
    assert run.changes["learning_rate"] == (1e-3, pytest.approx(expected))
    assert args.learning_rate == pytest.approx(expected)
    assert run.changes["$DS_ACCELERATOR"] == (None, "cpu")
    assert f"learning_rate 0.001 -> {expected}" in log and "$DS_ACCELERATOR None -> cpu" in log
    # a credential the launch set is recorded and logged as set, never by value
    assert run.changes["$AZURE_STORAGE_SAS_TOKEN"] == (None, "<set>") and "c2VjcmV0" not in log
    assert run.checkpoint is None and "base_learning_rate 0.00015" in run.lr_line


def test_a_run_setup_that_changes_nothing_reports_nothing(tmp_path, capsys):
    args = FinetuningArguments(output_dir=str(tmp_path / "run"), report_to="none")
    run, log = _setup(args, {}, capsys)
    assert run.changes == {} and "changed:" not in log


def test_credentials_set_during_setup_are_recorded_without_their_value(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    args = FinetuningArguments(output_dir=str(tmp_path / "run"), report_to="none")
    secret = "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=c2VjcmV0LWtleQ=="
    caplog.set_level(logging.INFO)
    run = RunSetup(checkpoint=None, lr_line="")
    with run.recording(args, "test"):
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", secret)
        args.logging_steps = 7
    assert run.changes["$AZURE_STORAGE_CONNECTION_STRING"] == (None, "<set>")
    assert run.changes["logging_steps"][1] == 7
    assert secret not in repr(run.changes) and "c2VjcmV0" not in caplog.text
    assert "$AZURE_STORAGE_CONNECTION_STRING None -> <set>" in caplog.text


def test_a_dataset_without_evaluation_set_turns_evaluation_off_as_a_recorded_change(tmp_path):
    args = PretrainingArguments(output_dir=str(tmp_path / "run"), eval_strategy="steps", report_to="none")
    run = RunSetup(checkpoint=None, lr_line="")
    fit_run_to_data(run, args, train_dataset=[1, 2, 3], eval_dataset=None)
    assert run.changes["eval_strategy"] == ("steps", "no") and args.eval_strategy == "no"


def test_launcher_variables_written_for_torch_are_returned():
    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    changed = setup_distributed_env(environ)
    assert changed["RANK"] == (None, "0") and changed["WORLD_SIZE"] == (None, "1")
    assert changed["LOCAL_RANK"] == (None, "0") and "OMPI_COMM_WORLD_RANK" not in changed
    assert all(environ[key] == after for key, (_, after) in changed.items())
