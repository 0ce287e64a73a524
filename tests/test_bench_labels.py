"""``benchmarks/bench_labels.py --quick``: the list-layout split writes every input row once and the wrong-layout read
ends in the one-line hint; the printed peak is the split process's own (checked against its JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_labels.py"


@pytest.mark.slow
def test_bench_labels_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["rows"] == 20_000 and figures["list"]["rc"] == 0 and figures["misread"]["rc"] != 0
    assert "--labels-format list" in figures["misread"]["last_line"]
    line = next(text for text in result.stdout.splitlines() if text.startswith("split --labels-format list"))
    assert line.split()[-1] == str(figures["list"]["peak_mb"])
