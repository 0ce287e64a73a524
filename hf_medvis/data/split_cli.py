"""``hf-medvis split LABELS_CSV --out DIR``: patient-disjoint, label-stratified train / val / test CSVs and a report."""

from __future__ import annotations

import argparse

from .labels.layouts import add_labels_format_arguments, labels_format_from_args

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "split",
        help="patient-disjoint, label-stratified train/val/test split of a labels CSV, with a metric-precision report",
        description="Writes DIR/train.csv, DIR/val.csv, DIR/test.csv (the input's columns) and DIR/split_report.json: "
        "per class and split the positives/negatives and the expected SE and 95%% CI half-width of AUROC "
        "(Hanley-McNeil) and accuracy (binomial).",
    )
    parser.add_argument("labels_csv", help="labels CSV (NIH layout, or another with --labels-format)")
    parser.add_argument("--out", required=True, help="output folder")
    add_labels_format_arguments(parser, label_names=False)
    parser.add_argument("--val", type=float, default=0.1, help="fraction of images for validation (default 0.1)")
    parser.add_argument("--test", type=float, default=0.2, help="fraction of images for test (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--label-names",
        nargs="+",
        default=None,
        help="classes to stratify on (default: all in the data); wide layout: the class columns",
    )
    parser.add_argument("--problem-type", default="auto", choices=("auto", "multi_label", "single_label"))
    parser.add_argument("--assumed-auroc", type=float, default=0.85, help="AUROC assumed for the SE (default 0.85)")
    parser.add_argument("--assumed-accuracy", type=float, default=0.8, help="accuracy assumed for the SE (default 0.8)")
    parser.add_argument(
        "--target-ci",
        type=float,
        default=None,
        help="95%% CI half-width to reach (e.g. 0.02): report the validation size it needs",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .splits import format_split_report, split_labels_csv

    if not 0 < args.assumed_auroc < 1 or not 0 < args.assumed_accuracy < 1:
        raise ValueError("--assumed-auroc and --assumed-accuracy must be in (0, 1)")
    if args.target_ci is not None and not 0 < args.target_ci < 0.5:
        raise ValueError(f"--target-ci must be in (0, 0.5), got {args.target_ci}")
    result = split_labels_csv(
        args.labels_csv,
        args.out,
        labels_format=labels_format_from_args(args),
        val=args.val,
        test=args.test,
        seed=args.seed,
        label_names=args.label_names,
        problem_type=args.problem_type,
        assumed_auroc=args.assumed_auroc,
        assumed_accuracy=args.assumed_accuracy,
        target_ci=args.target_ci,
    )
    print(format_split_report(result.report))
    print(f"\nwrote {', '.join(p.name for p in result.paths.values())} to {result.paths['train'].parent}")
    return 0
