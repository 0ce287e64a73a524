"""Label efficiency for segmentation: does MAE pretraining pay off when few images have masks?

The classification benchmark's design (bench_label_efficiency.py, whose helpers this reuses): the embedded phantoms
with their lung, heart and nodule masks, split by patient (train / val / test), one MAE pretrained on every training
image (no labels, no masks), then the segmentation recipe (recipes/finetune_segmentation.py, its defaults: tiny ViT,
64 px, CE + Dice) from (a) that MAE's encoder and (b) random initialisation, with the masks of 10 % and 100 % of the
training patients (nested subsets of one seeded patient order, extended until a subset holds a nodule) and each of
``--seeds``. Each run is scored on the test patients: macro Dice (lung, heart, nodule; background left out) with a
patient-bootstrap 95 % CI, as ``hf-medvis evaluate`` scores a segmentation model.

Writes results.json into --out; the last line is ``dice_gain_at_10pct=<MAE - scratch> mae_dice_at_10pct=<x>
scratch_dice_at_10pct=<y>`` (means over the seeds). ``--quick``: fewer patients and steps, minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("bench_label_efficiency", REPO / "benchmarks/bench_label_efficiency.py")
classification_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(classification_bench)

FULL = {"patients": 600, "mae_steps": 900, "ft_steps": 600, "fractions": (0.1, 1.0), "bootstrap": 500}
QUICK = {"patients": 120, "mae_steps": 150, "ft_steps": 100, "fractions": (0.1, 1.0), "bootstrap": 100}
ARMS = ("mae", "scratch")
METRIC = "dice_macro"


def _log(message: str) -> None:
    print(f"[bench_seg_label_efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def test_dice(model_dir: Path, images: Path, masks: Path, labels: Path, bootstrap: int) -> dict:
    """Macro and per-class Dice on the test patients with patient-bootstrap CIs (as `hf-medvis evaluate`)."""
    from hf_medvis.evaluation.segment import SegmentationPredictor, evaluate_masks, read_masked_images

    predictor = SegmentationPredictor(model_dir, device="cpu")
    sources, true_masks, groups = read_masked_images(
        str(images), predictor.class_names, masks_dir=str(masks), labels_file=str(labels)
    )
    metrics = evaluate_masks(predictor, sources, true_masks, groups, n_resamples=bootstrap, seed=0)
    keys = [METRIC, f"{METRIC}_ci95_low", f"{METRIC}_ci95_high", "iou_macro"]
    keys += [f"dice_{name}" for name in predictor.class_names[1:]]
    return {key: metrics.get(key) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer patients and steps: minutes on 2 cores")
    parser.add_argument("--out", default=None, help="folder for results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the fine-tuning arms")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once (got {' '.join(map(str, args.seeds))})")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_seg_label_efficiency-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, split, train_rows, mae_dir, mae_metrics = classification_bench.phantoms_and_mae(
        out, cfg["patients"], cfg["mae_steps"], masks=True
    )
    finetune = classification_bench._recipe("finetune_segmentation").main
    results: dict = {"config": {**cfg, "fractions": list(cfg["fractions"]), "seeds": args.seeds}, "mae": mae_metrics}
    results["runs"] = []
    for fraction, rows in classification_bench.nested_subsets(train_rows, cfg["fractions"]).items():
        labels = out / f"train_{fraction:g}.csv"
        classification_bench._write_rows(labels, rows)
        patients = len({r["Patient ID"] for r in rows})
        for seed in args.seeds:
            for arm in ARMS:
                run_dir = out / f"{arm}_{fraction:g}_seed{seed}"
                argv = f"--train_data {data / 'images'} --masks_dir {data / 'masks'} --labels_file {labels} "
                argv += f"--validation_data {data / 'images'} --validation_labels_file {split.paths['val']} "
                argv += f"--output_dir {run_dir} --overwrite_output_dir true --seed {seed} "
                argv += f"--max_steps {cfg['ft_steps']} --eval_steps {cfg['ft_steps']} --save_steps {cfg['ft_steps']} "
                argv += "--ci_bootstrap_samples 0 --disable_tqdm true"
                if arm == "mae":
                    argv += f" --model_name_or_path {mae_dir}"
                classification_bench._quiet(finetune, argv.split())
                score = test_dice(run_dir, data / "images", data / "masks", split.paths["test"], cfg["bootstrap"])
                run = {"arm": arm, "fraction": fraction, "seed": seed, "patients": patients, "images": len(rows)}
                results["runs"].append({**run, **score})
                _log(f"{arm:8s} {fraction:>5.0%} of the training patients ({patients}), seed {seed}: test macro Dice "
                     f"{score[METRIC]:.3f} [{score[f'{METRIC}_ci95_low']:.3f}, {score[f'{METRIC}_ci95_high']:.3f}]")  # fmt: skip
    results["summary"] = classification_bench.summarize(results["runs"], METRIC)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for row in results["summary"]:
        line = f"{row['arm']:8s} {row['fraction']:>5.0%}: mean {row[f'{METRIC}_mean']:.3f}"
        if len(row["seeds"]) > 1:
            line += f" sd {row[f'{METRIC}_sd']:.3f} range [{row[f'{METRIC}_min']:.3f}, {row[f'{METRIC}_max']:.3f}]"
        if "gain_vs_scratch" in row:
            gains = row["gain_vs_scratch"].values()
            line += f"; vs scratch, same seed: {' '.join(f'{g:+.3f}' for g in gains)}"
            line += f" (MAE higher in {sum(g > 0 for g in gains)} of {len(gains)})"
        print(line)
    at = {r["arm"]: r[f"{METRIC}_mean"] for r in results["summary"] if r["fraction"] == 0.1}
    print(f"results: {out / 'results.json'} ({results['seconds']} s)")
    print(
        f"dice_gain_at_10pct={at['mae'] - at['scratch']:.3f} mae_dice_at_10pct={at['mae']:.3f} "
        f"scratch_dice_at_10pct={at['scratch']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
