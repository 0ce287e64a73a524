"""Smoke test of the training benchmark: ``bench_train.py --quick`` runs the plain Trainer and the recipe on tiny models
(CPU) from real prepared shards and ends with the summary line CI parses."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    match = re.fullmatch(r"speedup_vs_plain_trainer=(\S+) mfu=(\S+)", lines[-1])
    assert match, lines[-1]
    assert math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    assert match.group(2) == "n/a"  # no peak on a CPU
    assert any(line.startswith("plain ") for line in lines) and any(line.startswith("recipe ") for line in lines)
    assert (tmp_path / "results-mae-base-quick.json").is_file()
