"""Launcher variables (torchrun/accelerate, Azure ML PyTorch, MPI) -> torch's, and rank/node-tagged logs."""

import logging

import pytest

from hf_medvis.core.launch_env import (
    AML_MPI_DEFAULT_PORT,
    DistributedEnvError,
    detect_distributed_env,
    normalize_distributed_env,
    rank_and_world_size,
)
from hf_medvis.training.distributed import check_world_size, rank_tag


def test_single_process_is_left_alone():
    env = {"PATH": "/bin"}
    assert normalize_distributed_env(env) is None and env == {"PATH": "/bin"}
    assert rank_tag(env) == "node 0 rank 0"


def test_torchrun_variables_pass_through_and_node_comes_from_group_rank():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.0.0.4",
        "MASTER_PORT": "29500",
    }
    detected = normalize_distributed_env(env)
    assert (detected.rank, detected.world_size, detected.local_rank, detected.node_rank) == (5, 8, 1, 1)
    assert env["NODE_RANK"] == "1" and env["RANK"] == "5" and env["MASTER_ADDR"] == "10.0.0.4"
    assert rank_tag(env) == "node 1 rank 5"


def test_azure_ml_pytorch_distribution():
    env = {
        "MASTER_ADDR": "10.0.0.4",
        "MASTER_PORT": "6105",
        "WORLD_SIZE": "16",
        "NODE_RANK": "1",
        "RANK": "9",
        "LOCAL_RANK": "1",
    }
    detected = normalize_distributed_env(env)
    assert (detected.rank, detected.local_rank, detected.node_rank, detected.source) == (9, 1, 1, "torch")
    assert env["MASTER_PORT"] == "6105"


def test_mpi_with_az_batch_master_node():
    env = {
        "OMPI_COMM_WORLD_RANK": "13",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "5",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        "AZ_BATCH_MASTER_NODE": "10.0.0.7:6105",
    }
    detected = normalize_distributed_env(env)
    assert detected.source == "mpi"
    assert {
        k: env[k]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    } == {
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "6105",
    }


def test_mpi_with_batchai_master_node_uses_the_documented_port():
    env = {
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "AZ_BATCHAI_MPI_MASTER_NODE": "node-0",
    }
    normalize_distributed_env(env)
    assert env["MASTER_ADDR"] == "node-0" and env["MASTER_PORT"] == AML_MPI_DEFAULT_PORT


def test_single_node_mpi_needs_no_master_and_launcher_values_are_not_overwritten():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_PORT": "1234"}
    normalize_distributed_env(env)
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "1234" and env["LOCAL_RANK"] == "0"


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
            "multi-node MPI launch without a master address",
        ),
        ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "rank 4 is outside world size 4"),
        ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "local rank 3 is outside"),
        (
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "AZ_BATCH_MASTER_NODE": "6105"},
            "is not 'address:port'",
        ),
    ],
)
def test_impossible_launches_are_one_clear_error(env, message):
    with pytest.raises(DistributedEnvError, match=message.replace("(", r"\(")):
        detect_distributed_env(env)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2)),  # MPI, before the recipe normalises
    ],
)
def test_rank_and_world_size_read_every_launcher(env, expected):
    assert rank_and_world_size(env) == expected


def test_a_launch_that_trains_alone_is_refused(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedEnvError, match="each process would train alone"):
        check_world_size(SimpleNamespace(world_size=1))
    check_world_size(SimpleNamespace(world_size=2))


def test_log_lines_carry_node_and_rank(monkeypatch, tmp_path, capsys):
    from transformers import TrainingArguments

    from hf_medvis.training.run import setup_logging

    monkeypatch.setenv("NODE_RANK", "3")
    setup_logging(TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    logging.getLogger("pretrain_mae").info("hello")
    out = capsys.readouterr().out
    assert "[node 3 rank 0] INFO pretrain_mae: hello" in out
    # transformers writes through its own handler: same tagged format.
    handlers = logging.getLogger("transformers").handlers
    assert handlers and all("[node 3 rank 0]" in h.formatter._fmt for h in handlers)
