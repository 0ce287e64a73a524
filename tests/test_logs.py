"""Per-rank JSON-line logs and `hf-medvis logs` across two ranks on two nodes."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from hf_medvis.cli import main
from hf_medvis.infra.jsonlog import JsonLinesHandler, install_json_log_handler, remove_json_log_handlers
from hf_medvis.infra.logsearch import LogQuery, compile_pattern, parse_since, search_logs


def _record(logger_name: str, level: int, message: str, created: float, step: int | None = None) -> logging.LogRecord:
    record = logging.LogRecord(logger_name, level, __file__, 1, message, None, None)
    record.created = created
    if step is not None:
        record.step = step
    return record


@pytest.fixture()
def two_ranks(tmp_path):
    """Rank 0 on node-a and rank 1 on node-b, interleaved in time, as two separate files."""
    logs = tmp_path / "run" / "logs"
    base = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc).timestamp()
    rank0 = JsonLinesHandler(logs, rank=0, node="node-a")
    rank1 = JsonLinesHandler(logs, rank=1, node="node-b")
    rank0.emit(_record("hf_medvis", logging.INFO, "loading data", base, 0))
    rank1.emit(_record("hf_medvis", logging.INFO, "loading data", base + 1, 0))
    rank0.emit(_record("transformers", logging.INFO, 'metrics {"loss": 1.2}', base + 10, 5))
    rank1.emit(_record("hf_medvis", logging.WARNING, "ALERT memory at step 7: 97% in use", base + 12, 7))
    rank0.emit(_record("hf_medvis", logging.ERROR, "NCCL timeout in all_reduce", base + 20, 9))
    rank0.close()
    rank1.close()
    return tmp_path / "run", base


def test_each_rank_writes_its_own_json_lines(two_ranks):
    run, _ = two_ranks
    files = sorted(p.name for p in (run / "logs").iterdir())
    assert files == ["node-a-rank00000.jsonl", "node-b-rank00001.jsonl"]
    entry = json.loads((run / "logs" / files[1]).read_text().splitlines()[1])
    assert {"time", "node", "rank", "step", "level", "message"} <= set(entry)
    assert (entry["node"], entry["rank"], entry["step"], entry["level"]) == ("node-b", 1, 7, "WARNING")


def test_search_merges_ranks_in_time_order_and_filters(two_ranks):
    run, base = two_ranks
    everything = search_logs(run, LogQuery())
    assert [(e["rank"], e["step"]) for e in everything] == [(0, 0), (1, 0), (0, 5), (1, 7), (0, 9)]
    assert [e["rank"] for e in search_logs(run, LogQuery(pattern=compile_pattern("loading")))] == [0, 1]
    assert [e["message"] for e in search_logs(run, LogQuery(rank=1, min_level=30))] == [
        "ALERT memory at step 7: 97% in use"
    ]
    assert len(search_logs(run, LogQuery(min_level=30))) == 2
    since = datetime.fromtimestamp(base + 11, tz=timezone.utc)
    assert [e["step"] for e in search_logs(run, LogQuery(since=since))] == [7, 9]
    assert parse_since("10m", now=since) == since - timedelta(minutes=10)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


def test_cli_prints_one_line_per_entry_and_skips_torn_lines(two_ranks, capsys):
    run, _ = two_ranks
    with (run / "logs" / "node-b-rank00001.jsonl").open("a") as handle:
        handle.write('{"time": "2026-01-31T12:00:3')  # a rank killed mid-write
    assert main(["logs", str(run), "--grep", "timeout|ALERT", "--level", "warning"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("2026-01-31T12:00:12.000+00:00 node-b rank 1 step 7 WARNING")
    assert "node-a rank 0 step 9 ERROR   NCCL timeout" in lines[1]
    assert "skipped 1 unreadable line" in captured.err
    assert main(["logs", str(run), "--rank", "0", "--json", "--since", "2026-01-31T12:00:15"]) == 0
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [9]
    assert main(["logs", str(run), "--grep", "no such thing"]) == 1
    assert main(["logs", str(run / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["logs", str(run), "--level", "LOUD"]) == 2


def test_installed_handler_captures_library_loggers(tmp_path):
    handler = install_json_log_handler(tmp_path, rank=3, node="n1")
    try:
        logging.getLogger("hf_medvis.test").info("hello from our package")
        logging.getLogger("transformers.trainer").warning("hello from transformers")
    finally:
        remove_json_log_handlers()
    messages = [json.loads(line)["message"] for line in handler.path.read_text().splitlines()]
    assert messages == ["hello from our package", "hello from transformers"]
    assert not any(isinstance(h, JsonLinesHandler) for h in logging.getLogger().handlers)
