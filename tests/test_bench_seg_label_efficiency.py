"""benchmarks/bench_seg_label_efficiency.py (issue 28, item 6) reuses the classification benchmark's summary for its
macro Dice: the means, spreads and same-seed MAE-vs-scratch differences are the ones computed directly. (The runs
themselves take minutes: benchmarks/RESULTS.md has the measured table and the command.)"""

from __future__ import annotations

import importlib.util
import random
import statistics

import pytest
from conftest import REPO


def test_dice_summary_over_seeds():
    spec = importlib.util.spec_from_file_location("bench_seg", REPO / "benchmarks/bench_seg_label_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(3)
    runs = [
        {"arm": arm, "fraction": fraction, "seed": seed, bench.METRIC: rng.uniform(0.3, 1.0)}
        for seed in (2, 0, 1)
        for fraction in (1.0, 0.1)
        for arm in ("scratch", "mae")
    ]
    summary = bench.classification_bench.summarize(runs, bench.METRIC)
    assert [(r["arm"], r["fraction"]) for r in summary] == [(a, f) for a in bench.ARMS for f in (0.1, 1.0)]
    for row in summary:
        scores = {
            r["seed"]: r["dice_macro"] for r in runs if (r["arm"], r["fraction"]) == (row["arm"], row["fraction"])
        }
        assert row["dice_macro_mean"] == pytest.approx(statistics.mean(scores.values()))
        assert row["dice_macro_sd"] == pytest.approx(statistics.stdev(scores.values()))
        assert (row["dice_macro_min"], row["dice_macro_max"]) == (min(scores.values()), max(scores.values()))
        if row["arm"] == "mae":
            scratch = {
                r["seed"]: r["dice_macro"] for r in runs if (r["arm"], r["fraction"]) == ("scratch", row["fraction"])
            }
            assert row["gain_vs_scratch"] == {s: pytest.approx(scores[s] - scratch[s]) for s in (0, 1, 2)}
        else:
            assert "gain_vs_scratch" not in row and not any(key.startswith("auroc") for key in row)
