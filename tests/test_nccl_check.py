"""nccl-check: bandwidth definitions, sweep parsing, watchdog, a real 2-process gloo run under torchrun, and ranks that
never join or die (plain processes: one line naming the rank and the collective, exit 3)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from subprocess import PIPE

import pytest

from hf_medvis.cli import main
from hf_medvis.infra.nccl import (
    CollectiveResult,
    Watchdog,
    busbw_factor,
    parse_bytes,
    size_sweep,
)
from hf_medvis.infra.nccl_cli import _expected_figure
from hf_medvis.infra.nccl_failures import DIE_AT_ENV, _cause, is_communication_error
from hf_medvis.infra.nccl_report import evaluate_expectation


def test_busbw_factors_follow_nccl_tests():
    assert busbw_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert busbw_factor("all_gather", 8) == pytest.approx(7 / 8)
    assert busbw_factor("reduce_scatter", 4) == pytest.approx(3 / 4)
    assert busbw_factor("broadcast", 8) == busbw_factor("reduce", 8) == 1.0
    with pytest.raises(ValueError, match="unknown collective"):
        busbw_factor("alltoall", 2)


def test_sizes_and_byte_parsing():
    assert parse_bytes("1K") == 1024 and parse_bytes("64KiB") == 65536 and parse_bytes("1G") == 2**30
    assert parse_bytes("4096") == 4096
    assert size_sweep(1024, 8192) == [1024, 2048, 4096, 8192]
    with pytest.raises(ValueError, match="not a byte size"):
        parse_bytes("lots")
    with pytest.raises(ValueError):
        size_sweep(4096, 1024)


def test_expectation_uses_peak_all_reduce_and_sku_figures():
    results = [
        CollectiveResult("all_reduce", 2**20, 2**18, "float32", 10.0, 100.0, 150.0, True),
        CollectiveResult("all_reduce", 2**30, 2**28, "float32", 10.0, 200.0, 350.0, True),
        CollectiveResult("broadcast", 2**30, 2**28, "float32", 10.0, 900.0, 900.0, True),
    ]
    verdict = evaluate_expectation(results, 480.0, 0.8, "x")
    assert verdict["measured_gbps"] == 350.0 and not verdict["passed"]  # broadcast does not count
    assert evaluate_expectation(results, 400.0, 0.8, "x")["passed"]
    assert _expected_figure("Standard_ND96isr_H200_v5", nodes=1) == (480.0, "Standard_ND96isr_H200_v5 single node")
    assert _expected_figure("nd96isr_h200_v5", nodes=2)[0] == 46 * 8
    assert _expected_figure("123.5", nodes=1) == (123.5, "--expect-busbw")
    with pytest.raises(ValueError, match="no known single-node busbw"):
        _expected_figure("Standard_ND96isr_H100_v5", nodes=1)
    with pytest.raises(ValueError, match="unknown Azure SKU"):
        _expected_figure("Standard_Bogus", nodes=1)


def test_watchdog_reports_a_hang_and_stays_quiet_when_disarmed():
    fired: list[str] = []
    event = threading.Event()
    dog = Watchdog(0.2, rank=1, on_timeout=lambda msg: (fired.append(msg), event.set()))
    try:
        dog.arm("all_reduce of 1 KiB")
        dog.disarm()
        time.sleep(0.3)
        assert not fired
        dog.arm("all_reduce of 1 MiB")
        assert event.wait(2.0)
    finally:
        dog.close()
    assert "rank 1: all_reduce of 1 MiB did not complete within 0.2 s" in fired[0]


def test_not_launched_distributed_is_a_one_line_error(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["nccl-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not launched distributed" in err and "torchrun" in err


def _torchrun(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_medvis.cli",
        "nccl-check",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_DEBUG="WARN", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
@pytest.mark.allow_traceback("ChildFailedError", reason="torchrun's report of the rank that exits 1 on purpose")
def test_two_gloo_ranks_correct_table_json_and_expectation(tmp_path):
    out = tmp_path / "nccl.json"
    proc = _torchrun(
        "--max-bytes", "16K", "--iters", "3", "--warmup", "1", "--json", str(out), "--expect-busbw", "1000000"
    )
    # Every collective is correct, but 1 PB/s all-reduce is not: the expectation fails the run.
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "# nccl-check: 2 ranks on 1 node(s), backend gloo" in proc.stdout
    assert "NCCL_DEBUG=WARN" in proc.stdout
    assert proc.stdout.count("  all_reduce ") == 5 and "FAIL (" not in proc.stdout
    assert "correctness: all OK" in proc.stdout and "FAIL" in proc.stdout.splitlines()[-1]
    assert "below the required" in proc.stderr
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["all_correct"] is True
    assert {r["op"] for r in report["results"]} == {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce"}
    for r in report["results"]:
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * busbw_factor(r["op"], 2))
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / (r["time_us"] * 1e-6) / 1e9)
    gather = [r for r in report["results"] if r["op"] == "all_gather"][0]
    assert gather["size_bytes"] == gather["count"] * 2 * 4  # whole gathered array, as nccl-tests counts it
    assert report["expectation"]["passed"] is False


@pytest.mark.slow
@pytest.mark.allow_traceback("ChildFailedError", reason="torchrun's report of the rank that exits 1 on purpose")
def test_a_missing_rank_times_out_with_a_clear_error():
    proc = _torchrun("--max-bytes", "1K", "--iters", "1", "--warmup", "0", "--timeout", "3", "--debug-absent-rank", "1")
    assert proc.returncode != 0
    assert "did not complete within 3 s" in proc.stderr
    assert "rank 1 is alive but last entered init" in proc.stderr  # the stalled rank is told apart from a dead one


def test_failure_causes_are_a_few_words():
    assert _cause(RuntimeError("[pair.cc:534] Read error [127.0.0.1]:1234: Connection reset by peer")) == (
        "connection reset"
    )
    assert _cause(RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed.")) == "connection closed"
    assert is_communication_error(RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer"))
    assert not is_communication_error(RuntimeError("expected a tensor of dtype float"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks(ranks: list[int], *args: str, world_size: int = 2, die_at: str | None = None) -> dict[int, tuple]:
    """Starts the given ranks of a ``world_size`` gloo job as plain processes (no launcher that would kill the
    survivors); returns {rank: (exit code, stdout, stderr, seconds)}."""
    port = _free_port()
    procs = {}
    for rank in ranks:
        env = _env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
        env.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        if die_at:
            env[DIE_AT_ENV] = die_at
        command = [sys.executable, "-m", "hf_medvis.cli", "nccl-check", "--max-bytes", "4K", "--iters", "2", *args]
        procs[rank] = (time.monotonic(), subprocess.Popen(command, env=env, stdout=PIPE, stderr=PIPE, text=True))
    results = {}
    for rank, (start, proc) in procs.items():
        out, err = proc.communicate(timeout=90)
        results[rank] = (proc.returncode, out, err, time.monotonic() - start)
    return results


def _one_error_line(err: str, rank: int) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hf-medvis nccl-check: error: rank {rank}: "), lines[0]
    return lines[0]


SLACK_S = 20  # process start and torch import on a loaded 2-core CI machine


@pytest.mark.slow
@pytest.mark.parametrize("absent", [1, 0])
def test_a_rank_that_never_joins_is_named_within_the_timeout(absent):
    present = 1 - absent
    code, _, err, seconds = _ranks([present], "--timeout", "5")[present]
    line = _one_error_line(err, present)
    assert code == 3 and seconds < 5 + SLACK_S
    if absent == 1:
        assert "rank 1 never joined (2 expected, 1 joined within 5 s) during rendezvous" in line
    else:  # rank 0 hosts the store: the others cannot even reach it
        assert "rank 0 (which hosts the rendezvous store at 127.0.0.1:" in line and "during rendezvous" in line


@pytest.mark.slow
def test_a_rank_that_dies_mid_run_is_named_by_the_survivor():
    results = _ranks([0, 1], "--timeout", "10", die_at="1:all_gather")
    assert results[1][0] == 9  # the test hook's os._exit(9), as a killed rank
    code, out, err, seconds = results[0]
    line = _one_error_line(err, 0)
    assert code == 3 and seconds < 10 + SLACK_S
    assert "rank 1 died during all_gather of 1 KiB (" in line and line.endswith("surviving ranks: 0")
    assert "# nccl-check" not in out  # no table from an incomplete run


@pytest.mark.slow
def test_when_rank_0_dies_its_store_goes_with_it_and_rank_1_still_says_so():
    results = _ranks([0, 1], "--timeout", "10", die_at="0:all_gather")
    assert results[0][0] == 9
    code, _, err, seconds = results[1]
    line = _one_error_line(err, 1)
    assert code == 3 and seconds < 10 + SLACK_S
    assert "rank 0 (which hosts the rendezvous store at 127.0.0.1:" in line
    assert "is unreachable during all_gather of 1 KiB" in line
