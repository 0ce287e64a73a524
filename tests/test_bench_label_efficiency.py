"""benchmarks/bench_label_efficiency.py --quick (issue 14): every arm at every fraction, scored on the test patients,
and the summary line CI and RESULTS.md read."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env


@pytest.mark.slow
def test_label_efficiency_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_label_efficiency.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"auroc_gain_at_10pct=(-?[\d.]+) mae_auroc_at_10pct=([\d.]+) scratch_auroc_at_10pct=([\d.]+)", last
    )
    assert match, last
    gain, mae, scratch = map(float, match.groups())
    assert gain == pytest.approx(mae - scratch, abs=2e-3)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["arm"], r["fraction"]): r for r in results["runs"]}
    assert set(runs) == {(arm, f) for arm in ("mae", "scratch", "linear_probe") for f in (0.1, 1.0)}
    for run in runs.values():
        assert run["auroc_macro_ci95_low"] <= run["auroc_macro"] <= run["auroc_macro_ci95_high"]
    assert runs[("mae", 0.1)]["patients"] < runs[("mae", 1.0)]["patients"]  # nested subsets, fewer labelled patients
    assert runs[("mae", 0.1)]["auroc_macro"] == pytest.approx(mae, abs=1e-3)
    assert (tmp_path / "label_efficiency.png").stat().st_size > 5000
