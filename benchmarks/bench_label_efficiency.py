"""Label efficiency: does MAE pretraining on the unlabelled training images pay off when few labels exist?

On the embedded phantoms, split by patient (train / val / test), the same fine-tuning recipe (same steps, seed,
augmentation, evaluation) starts from (a) the MAE encoder pretrained on every training image (no labels used) and
(b) random initialisation, with the labels of 1 %, 10 % and 100 % of the training patients (nested subsets of one
seeded patient order; a subset is extended until every class has a positive, and the JSON says how many patients it
holds). A third arm, (c) linear probing of the MAE encoder (`--linear_probe`), runs at the same fractions. Each arm is
scored on the test patients: macro AUROC with a patient-bootstrap 95 % CI.

The CI covers the sampling of test patients, not the training run: a short fine-tune of a tiny ViT can end elsewhere
with another seed (or another CPU's rounding). ``--seeds 0 1 2`` repeats every fine-tuning arm with those training
seeds (initialisation of the new weights, augmentation, batch order; the MAE, the split and the label subsets stay
fixed) and reports each arm's mean, spread and the per-seed MAE-vs-scratch differences.

Writes results.json and label_efficiency.png into --out; the last line is
``auroc_gain_at_10pct=<MAE - scratch> mae_auroc_at_10pct=<x> scratch_auroc_at_10pct=<y>`` (means over the seeds).
``--quick`` (CI): fewer patients and steps, fractions 10 % and 100 %, a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL = {"patients": 600, "mae_steps": 900, "ft_steps": 2400, "fractions": (0.01, 0.1, 1.0), "bootstrap": 500}
QUICK = {"patients": 120, "mae_steps": 150, "ft_steps": 60, "fractions": (0.1, 1.0), "bootstrap": 100}
ARMS = ("mae", "scratch", "linear_probe")


def _log(message: str) -> None:
    print(f"[bench_label_efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quiet(main, argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def nested_subsets(rows: list[dict], fractions: tuple[float, ...], seed: int = 0) -> dict[float, list[dict]]:
    """Rows of the first ``fraction`` of the training patients in one seeded order (nested), each subset extended until
    every class has a positive."""
    import numpy as np

    from hf_medvis.data.labels import parse_finding_labels

    patients = sorted({r["Patient ID"] for r in rows})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    classes = {n for r in rows for n in parse_finding_labels(r["Finding Labels"])}
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row["Patient ID"], []).append(row)
    subsets = {}
    for fraction in fractions:
        count = max(1, round(fraction * len(order)))
        while count < len(order):
            seen = {n for p in order[:count] for r in by_patient[p] for n in parse_finding_labels(r["Finding Labels"])}
            if seen >= classes:
                break
            count += 1
        subsets[fraction] = [r for p in order[:count] for r in by_patient[p]]
    return subsets


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def test_auroc(model_dir: Path, images: Path, labels: Path, bootstrap: int) -> dict:
    """Macro AUROC on the test patients with its patient-bootstrap CI (as `hf-medvis evaluate`)."""
    from hf_medvis.data.folder import build_folder_records
    from hf_medvis.data.labels import encode_labels, is_labelled, label_matrix
    from hf_medvis.evaluation import Predictor, metrics_with_ci

    predictor = Predictor(model_dir)
    records = build_folder_records(images, labels)
    keep = [i for i, v in enumerate(records["finding_labels"]) if is_labelled(v)]
    truth = label_matrix(encode_labels([records["finding_labels"][i] for i in keep], predictor.spec), predictor.spec)
    probs = predictor.predict([records["path"][i] for i in keep])
    groups = [records["group"][i] for i in keep]
    metrics = metrics_with_ci(truth, probs, groups, predictor.spec, n_resamples=bootstrap, seed=0)
    return {key: metrics.get(key) for key in ("auroc_macro", "auroc_macro_ci95_low", "auroc_macro_ci95_high")}


def summarize(runs: list[dict], metric: str = "auroc_macro") -> list[dict]:
    """Per arm and fraction: the mean test ``metric`` (macro AUROC; the segmentation benchmark: macro Dice) over the
    training seeds, its sample standard deviation (0 for one seed), lowest and highest; for the MAE arm also the
    per-seed difference to scratch (same seed, same labels)."""
    import numpy as np

    by_key: dict[tuple[str, float], dict[int, float]] = {}
    for run in runs:
        by_key.setdefault((run["arm"], run["fraction"]), {})[run["seed"]] = run[metric]
    summary = []
    for (arm, fraction), scores in sorted(by_key.items(), key=lambda item: (ARMS.index(item[0][0]), item[0][1])):
        values = np.array(list(scores.values()))
        row = {"arm": arm, "fraction": fraction, "seeds": sorted(scores), f"{metric}_mean": float(values.mean()),
               f"{metric}_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
               f"{metric}_min": float(values.min()), f"{metric}_max": float(values.max())}  # fmt: skip
        scratch = by_key.get(("scratch", fraction), {})
        if arm == "mae" and scratch:
            row["gain_vs_scratch"] = {seed: scores[seed] - scratch[seed] for seed in sorted(scores) if seed in scratch}
        summary.append(row)
    return summary


def phantoms_and_mae(out: Path, patients: int, mae_steps: int, masks: bool = False) -> tuple:
    """The phantoms (64 px; with their masks for segmentation) split by patient (train / val / test: 55 / 15 / 30 %),
    and an MAE pretrained on the training images (no labels used): (data folder, split, training rows, MAE folder,
    the MAE's metrics)."""
    import datasets

    from hf_medvis.data.phantoms import write_phantom_dataset
    from hf_medvis.data.splits import split_labels_csv

    datasets.disable_progress_bars()
    data = write_phantom_dataset(
        out / "data", patients=patients, image_size=64, dicom=False, overwrite=True, masks=masks
    )
    split = split_labels_csv(data / "labels.csv", out / "split", val=0.15, test=0.3, seed=0)
    with open(split.paths["train"]) as f:
        train_rows = list(csv.DictReader(f))
    _log(f"{patients} patients; MAE pretraining on {len(train_rows)} unlabelled training images")
    mae_dir = out / "mae"
    mae_metrics = _quiet(_recipe("pretrain_mae").main, f"--train_data {data / 'images'} --labels_file "
                         f"{split.paths['train']} --output_dir {mae_dir} --max_steps {mae_steps} "
                         "--overwrite_output_dir true --disable_tqdm true".split())  # fmt: skip
    return data, split, train_rows, mae_dir, mae_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: a few minutes on 2 cores")
    parser.add_argument("--out", default=None, help="folder for results.json and label_efficiency.png")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds of the fine-tuning arms (default: 0)"
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once (got {' '.join(map(str, args.seeds))})")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_label_efficiency-"))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    data, split, train_rows, mae_dir, mae_metrics = phantoms_and_mae(out, cfg["patients"], cfg["mae_steps"])
    finetune = _recipe("finetune_vit").main

    config = {**cfg, "fractions": list(cfg["fractions"]), "seeds": args.seeds}
    results: dict = {"config": config, "mae": mae_metrics, "runs": []}
    for fraction, rows in nested_subsets(train_rows, cfg["fractions"]).items():
        labels = out / f"train_{fraction:g}.csv"
        _write_rows(labels, rows)
        patients = len({r["Patient ID"] for r in rows})
        for seed in args.seeds:
            for arm in ARMS:
                run_dir = out / f"{arm}_{fraction:g}_seed{seed}"
                argv = f"--train_data {data / 'images'} --labels_file {labels} --validation_data {data / 'images'} "
                argv += f"--validation_labels_file {split.paths['val']} --output_dir {run_dir} "
                argv += f"--overwrite_output_dir true --seed {seed} --max_steps {cfg['ft_steps']} "
                argv += f"--eval_steps {cfg['ft_steps']} --save_steps {cfg['ft_steps']} "
                argv += "--ci_bootstrap_samples 0 --label_names Cardiomegaly Effusion Nodule --disable_tqdm true"
                if arm != "scratch":
                    argv += f" --model_name_or_path {mae_dir}"
                if arm == "linear_probe":
                    argv += " --config recipes/configs/vit_linear_probe.yaml"
                _quiet(finetune, argv.split())
                score = test_auroc(run_dir, data / "images", split.paths["test"], cfg["bootstrap"])
                run = {"arm": arm, "fraction": fraction, "seed": seed, "patients": patients, "images": len(rows)}
                results["runs"].append({**run, **score})
                _log(f"{arm:12s} {fraction:>5.0%} of the training patients ({patients}), seed {seed}: test macro AUROC "
                     f"{score['auroc_macro']:.3f} [{score['auroc_macro_ci95_low']:.3f}, {score['auroc_macro_ci95_high']:.3f}]")  # fmt: skip
    results["summary"] = summarize(results["runs"])
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "label_efficiency.png")
    for row in results["summary"]:
        line = f"{row['arm']:12s} {row['fraction']:>5.0%}: mean {row['auroc_macro_mean']:.3f}"
        if len(row["seeds"]) > 1:
            line += (
                f" sd {row['auroc_macro_sd']:.3f} range [{row['auroc_macro_min']:.3f}, {row['auroc_macro_max']:.3f}]"
            )
        if len(row["seeds"]) > 1 and "gain_vs_scratch" in row:
            gains = row["gain_vs_scratch"].values()
            line += f"; vs scratch, same seed: {' '.join(f'{g:+.3f}' for g in gains)}"
            line += f" (MAE higher in {sum(g > 0 for g in gains)} of {len(gains)})"
        print(line)
    at = {r["arm"]: r["auroc_macro_mean"] for r in results["summary"] if r["fraction"] == 0.1}
    print(f"results: {out / 'results.json'}, plot: {out / 'label_efficiency.png'} ({results['seconds']} s)")
    print(
        f"auroc_gain_at_10pct={at['mae'] - at['scratch']:.3f} mae_auroc_at_10pct={at['mae']:.3f} "
        f"scratch_auroc_at_10pct={at['scratch']:.3f}"
    )
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results["config"]["seeds"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm in ARMS:
        if len(seeds) == 1:  # the run's patient-bootstrap CI
            runs = sorted((r for r in results["runs"] if r["arm"] == arm), key=lambda r: r["fraction"])
            x, y = [r["fraction"] * 100 for r in runs], [r["auroc_macro"] for r in runs]
            low = [r["auroc_macro"] - r["auroc_macro_ci95_low"] for r in runs]
            high = [r["auroc_macro_ci95_high"] - r["auroc_macro"] for r in runs]
        else:  # mean over the training seeds, bars from the lowest to the highest seed
            rows = [r for r in results["summary"] if r["arm"] == arm]
            x, y = [r["fraction"] * 100 for r in rows], [r["auroc_macro_mean"] for r in rows]
            low = [r["auroc_macro_mean"] - r["auroc_macro_min"] for r in rows]
            high = [r["auroc_macro_max"] - r["auroc_macro_mean"] for r in rows]
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=arm.replace("_", " "))
    ax.set_xscale("log")
    percents = [f * 100 for f in results["config"]["fractions"]]
    ax.set_xticks(percents, [f"{p:g}" for p in percents])
    ax.minorticks_off()
    ax.set_xlabel("% of training patients labelled")
    ax.set_ylabel(
        "test macro AUROC (95% CI)" if len(seeds) == 1 else f"test macro AUROC ({len(seeds)} seeds: mean, range)"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
