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
    assert {r["seed"] for r in results["runs"]} == {0} and len(results["summary"]) == len(runs)
    assert (tmp_path / "label_efficiency.png").stat().st_size > 5000


def test_seed_summary_means_spreads_and_same_seed_gains():
    """``--seeds``: every arm's mean and spread over the training seeds, and MAE minus scratch paired by seed."""
    import importlib.util
    import random
    import statistics

    spec = importlib.util.spec_from_file_location(
        "bench_label_efficiency", REPO / "benchmarks/bench_label_efficiency.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(7)
    runs = [
        {"arm": arm, "fraction": fraction, "seed": seed, "auroc_macro": rng.uniform(0.5, 1.0)}
        for seed in (3, 0, 1)
        for fraction in (1.0, 0.1)
        for arm in ("linear_probe", "scratch", "mae")
    ]
    summary = bench.summarize(runs)
    assert [(r["arm"], r["fraction"]) for r in summary] == [
        (arm, f) for arm in ("mae", "scratch", "linear_probe") for f in (0.1, 1.0)
    ]
    for row in summary:
        scores = {
            r["seed"]: r["auroc_macro"] for r in runs if (r["arm"], r["fraction"]) == (row["arm"], row["fraction"])
        }
        assert row["seeds"] == [0, 1, 3]
        assert row["auroc_macro_mean"] == pytest.approx(statistics.mean(scores.values()))
        assert row["auroc_macro_sd"] == pytest.approx(statistics.stdev(scores.values()))
        assert (row["auroc_macro_min"], row["auroc_macro_max"]) == (min(scores.values()), max(scores.values()))
        if row["arm"] != "mae":
            assert "gain_vs_scratch" not in row
            continue
        scratch = {
            r["seed"]: r["auroc_macro"] for r in runs if (r["arm"], r["fraction"]) == ("scratch", row["fraction"])
        }
        assert row["gain_vs_scratch"] == {s: pytest.approx(scores[s] - scratch[s]) for s in (0, 1, 3)}
    one_seed = bench.summarize([r for r in runs if r["seed"] == 0])
    assert all(r["auroc_macro_sd"] == 0.0 and r["seeds"] == [0] for r in one_seed)
