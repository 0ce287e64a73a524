"""nccl-check: bandwidth definitions, sweep parsing, watchdog, and a real 2-process gloo run under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

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
