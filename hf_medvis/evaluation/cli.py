"""``hf-medvis evaluate`` (metrics with patient-bootstrap CIs and plots) and ``hf-medvis predict`` (JSON lines).

``evaluate --thresholds-from`` adds operating points (``operating_points.py``): per-class thresholds chosen on
validation patients, applied to the evaluated set and saved into the model folder, where ``predict`` reads them to
list findings. ``--calibrate`` fits temperatures on the same validation patients first (``calibration.py``), saved and
applied the same way; ``--subgroups`` adds the metrics of each value of covariate columns (``subgroups.py``).

The heavy imports (torch, transformers, scikit-learn) happen when a command runs, not when ``hf-medvis`` builds its
parser."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.labels.layouts import add_labels_format_arguments, labels_format_from_args

if TYPE_CHECKING:
    import numpy as np

    from ..data.labels import LabelSpec
    from .operating_points import OperatingRule
    from .predict import Predictor

logger = logging.getLogger(__name__)


# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate a fine-tuned classifier: metrics.json with patient-bootstrap 95%% CIs and calibration, plots, "
        "and report.html (one self-contained page of it all)",
        description="Scores every labelled image of --data (images not listed in --labels are skipped) and writes "
        "OUT/metrics.json (per class and macro, 95%% CIs from resampling patients; per class the calibration: ECE over "
        "equal-mass bins and Brier score), OUT/per_class.json, OUT/roc.png, OUT/pr.png, OUT/reliability.png, for "
        "multi-class models OUT/confusion.png, with --subgroups OUT/subgroups.png (forest plot), and OUT/report.html: "
        "one self-contained page (figures embedded, nothing fetched from the network) of provenance, per-class table, "
        "curves, operating points, calibration and subgroups.",
    )
    ev.add_argument("--model", required=True, help="fine-tuned model folder (output of recipes/finetune_vit.py)")
    ev.add_argument("--data", required=True, help="images: folder, glob or fsspec URL (PNG/JPEG/DICOM)")
    ev.add_argument("--labels", default=None, help="labels CSV (default: labels.csv beside the images), e.g. test.csv")
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples (default 1000)")
    ev.add_argument("--threshold", type=float, default=0.5, help="probability threshold for F1 (default 0.5)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--storage-options", default=None, help="JSON dict of fsspec storage options")
    ev.add_argument(
        "--no-card",
        dest="update_card",
        action="store_false",
        help="do not write the result into the model folder's README.md (by default it is added as the test split)",
    )
    ev.add_argument(
        "--thresholds-from",
        default=None,
        metavar="VAL_LABELS",
        help="operating points (multi-label models): labels CSV of validation images of OTHER patients (refused if "
        "they share a patient with the evaluated set); per class a threshold is chosen on them by --operating-point "
        "and applied unchanged to --data: metrics.json 'operating_points' (sensitivity, specificity, PPV, NPV with "
        "patient-bootstrap 95%% CIs); unless --no-card, saved into the model's config.json (hf_medvis_thresholds, "
        "then 'hf-medvis predict' lists findings) and model card",
    )
    ev.add_argument(
        "--thresholds-data",
        default=None,
        metavar="VAL_DATA",
        help="the validation images of --thresholds-from (default: --data); same label-layout flags as --labels",
    )
    ev.add_argument(
        "--calibrate",
        action="store_true",
        help="temperature scaling: fit on the validation images of --thresholds-from (required) one temperature per "
        "class (multi-label: sigmoid(logit/T)) or one for all (single-label: softmax(logits/T)) by minimising their "
        "negative log-likelihood, before any threshold is chosen; every probability of this evaluation is then "
        "temperature-scaled (AUROC unchanged); metrics.json 'temperature' (values, validation NLL and ECE before and "
        "after); unless --no-card, saved into config.json (hf_medvis_temperature), which 'hf-medvis predict' applies",
    )
    ev.add_argument(
        "--subgroups",
        nargs="+",
        default=None,
        metavar="COL",
        help="metrics per value of these columns of the labels file (e.g. 'Patient Gender' 'View Position'; a numeric "
        "one binned as 'Patient Age:0,40,60,120': [0,40), [40,60), [60,120], other values 'out of range'): "
        "metrics.json 'subgroups' (per value images, patients, positives, AUROC with patient-bootstrap 95%% CIs and, "
        "with --thresholds-from, sensitivity/specificity at the validation thresholds; a class with fewer than 5 "
        "positives or negatives there: 'too_small') and per column '_largest_gap' (best minus worst subgroup, with a "
        "bootstrap CI)",
    )
    ev.add_argument(
        "--operating-point",
        default=None,
        metavar="RULE",
        help="how --thresholds-from chooses each class's threshold: youden (default; max sensitivity + specificity - "
        "1), sensitivity=X (the highest threshold with validation sensitivity >= X) or specificity=X (the lowest with "
        "validation specificity >= X), X in (0, 1)",
    )
    ev.add_argument(
        "--masks",
        default=None,
        metavar="MASKS_DIR",
        help="segmentation models: the true masks, one PNG of class indices per image with its stem (classes.json or "
        "--mask-labels names them, as recipes/finetune_segmentation.py reads them); metrics.json holds per-class and "
        "macro Dice and IoU with patient-bootstrap 95%% CIs (patients from --labels when given)",
    )
    ev.add_argument("--masks-rle", default=None, metavar="FILE", help="segmentation: SIIM-style RLE masks instead")
    ev.add_argument(
        "--mask-labels", default=None, help="segmentation: the mask classes, e.g. background,lung (index = position)"
    )
    ev.add_argument(
        "--heatmap-examples",
        type=int,
        default=2,
        metavar="K",
        help="report.html shows per class the K most confident true positives, false positives and false negatives "
        "with their HiResCAM heatmaps (as predict --heatmap draws them; default 2, 0: none)",
    )
    add_labels_format_arguments(ev)
    ev.add_argument(
        "--label-map",
        default=None,
        help="external validation: YAML or JSON mapping the dataset's finding names (any case) to the model's classes "
        "(null: ignore the finding), or 'public' for the shipped map of the public chest X-ray datasets; a model class "
        "the dataset does not label is reported as not evaluated (docs/data_plane.md)",
    )
    ev.set_defaults(func=run_evaluate)

    pr = subparsers.add_parser(
        "predict",
        help="per-class probabilities for DICOM/PNG/JPEG files, as JSON lines",
        description='Prints one JSON object per input: {"file": ..., "probabilities": {class: p, ...}}, plus '
        '"findings": [classes with p >= their threshold] when the model has thresholds (hf-medvis evaluate '
        '--thresholds-from), and "heatmaps": {class: overlay PNG} with --heatmap.',
    )
    pr.add_argument("--model", required=True, help="fine-tuned model folder")
    pr.add_argument("files", nargs="+", help="image files or fsspec URLs")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--output", default=None, help="write the JSON lines here instead of stdout")
    pr.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="segmentation models (required for them): write DIR/<stem>_mask.png (class indices, the input's size) and "
        'DIR/<stem>_overlay.png; each JSON line is {"file", "mask", "overlay", "pixels": {class: count}}',
    )
    pr.add_argument(
        "--heatmap",
        default=None,
        metavar="OUT_DIR",
        help="also write per image and class OUT_DIR/<stem>_<class>.png, a HiResCAM map of where the model looked "
        'over the image it saw (after resize and centre crop); each JSON line gains "heatmaps": {class: path}',
    )
    pr.set_defaults(func=run_predict)


@dataclass
class LabelledImages:
    """The labelled images of one folder and labels file, as the model scores them: ``truth`` is [N, classes] 0/1
    (-1: unknown; the columns of ``not_evaluated`` are all -1 for multi-label models)."""

    paths: list[str]
    groups: list[str]  # hashed patient id per image
    truth: np.ndarray
    not_evaluated: list[str]  # model classes the file does not label (--label-map)
    labels_file: str
    rows: list[list[dict[str, str]]]  # per image its rows of the labels file (several: long layout), for --subgroups
    columns: list[str]  # the labels file's columns

    def describe(self) -> str:
        """``val.csv, 70 images, 33 patients``: the set as metrics.json, the card and config.json name it."""
        return f"{Path(self.labels_file).name}, {len(self.paths)} images, {len(set(self.groups))} patients"


def read_labelled_images(
    data: str,
    labels: str | None,
    args: argparse.Namespace,
    spec: LabelSpec,
    label_map: Mapping[str, str | None] | None,
    storage_options: dict | None,
    skipped: list[dict[str, str]],
) -> LabelledImages:
    """The images of ``data`` that ``labels`` (default: labels.csv beside them) labels, read with the label-layout
    flags of ``args`` and ``label_map``, checked against the model's classes before anything is scored. The evaluated
    set and the validation set of ``--thresholds-from`` both come through here. Undecodable files go to ``skipped``."""
    from ..data.folder import build_folder_records, find_labels_file
    from ..data.labels import (
        IMAGE_COL,
        check_file_classes,
        encode_labels,
        is_labelled,
        label_matrix,
        parse_finding_labels,
        parse_unknown_labels,
        read_labels_table,
        sample_key,
    )

    labels_file = labels or find_labels_file(data)
    if labels_file is None:
        raise ValueError(f"images without labels: no labels.csv beside {data}; pass --labels CSV")
    labels_format = labels_format_from_args(args)
    records = build_folder_records(data, labels_file, storage_options, labels_format, skipped)
    table = read_labels_table(labels_file, labels_format=labels_format)  # read once per process: cached
    keep = [i for i, v in enumerate(records["finding_labels"]) if is_labelled(v)]
    if not keep:
        raise ValueError(f"none of the images in {data} has a label in {Path(labels_file).name}")
    # The file's classes must be the model's, before anything is scored or written (metrics, plots, the card).
    chosen = list(labels_format.label_names)
    not_evaluated: list[str] = []  # model classes the file does not label (--label-map)
    if label_map is not None:  # the file's names renamed onto the model's classes, in place
        keep, not_evaluated = _apply_label_map(
            records["finding_labels"], keep, table.classes, chosen, spec, label_map, Path(labels_file).name
        )
    elif chosen and not table.classes:  # nih: --label-names picks the classes to score; others are left aside
        if not spec.multi_label:  # an image of another class has no right answer among the model's
            scored = [i for i in keep if set(parse_finding_labels(records["finding_labels"][i])) <= set(chosen)]
            if not scored:
                raise ValueError(
                    f"none of the labelled images of {Path(labels_file).name} is of --label-names' classes"
                )
            if len(scored) < len(keep):
                print(f"skipping {len(keep) - len(scored)} image(s) of classes outside --label-names", file=sys.stderr)
            keep = scored
        file_classes = chosen
    elif table.classes:  # wide: the class columns (--label-names chose them)
        file_classes = table.classes
    else:
        texts = [records["finding_labels"][i] for i in keep]
        file_classes = {n for text in texts for n in parse_finding_labels(text) + parse_unknown_labels(text)}
    if label_map is None:
        notes = check_file_classes(
            spec, file_classes, Path(labels_file).name, every_class_listed=bool(chosen or table.classes)
        )
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    blank = sum(1 for v in records["finding_labels"] if v is not None and not is_labelled(v))
    if blank:
        print(f"skipping {blank} image(s) with an empty Finding Labels (unlabelled)", file=sys.stderr)
    encoded = encode_labels([records["finding_labels"][i] for i in keep], spec)
    truth = label_matrix(encoded, spec)
    if not_evaluated and spec.multi_label:
        truth[:, [spec.label2id[name] for name in not_evaluated]] = -1  # unknown, not negative: masked everywhere
    # A labelled record's key is its table row's sample key (build_folder_records), unique within the file.
    row_of_key = {sample_key(row[IMAGE_COL]): i for i, row in enumerate(table.rows)}
    return LabelledImages(
        paths=[records["path"][i] for i in keep],
        groups=[records["group"][i] for i in keep],
        truth=truth,
        not_evaluated=not_evaluated,
        labels_file=str(labels_file),
        rows=[table.input_rows[row_of_key[records["key"][i]]] for i in keep],
        columns=list(table.columns),
    )


def run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..models.segmentation import is_segmentation_model

    if is_segmentation_model(args.model):
        return _evaluate_segmentation(args)
    if args.masks or args.masks_rle:
        raise ValueError(f"--masks / --masks-rle are for segmentation models; {args.model} is a classifier")

    from ..core.storage import describe, parse_storage_options, write_json_atomic
    from ..data.folder import SKIPPED_IMAGES_NAME, write_skipped_images
    from ..data.labels import LabelSpec
    from ..data.labels.label_map import load_label_map
    from ..data.provenance import data_origin, describe_origin
    from .bootstrap import metrics_with_ci
    from .calibration import CALIBRATION_BINS, calibration_metrics
    from .metrics import format_metrics_table, per_class_table
    from .operating_points import parse_operating_point
    from .plots import (
        save_confusion_plot,
        save_pr_plot,
        save_reliability_plot,
        save_roc_plot,
        save_subgroup_forest_plot,
    )
    from .predict import Predictor
    from .report import REPORT_NAME, class_counts, describe_model, write_report
    from .subgroups import covariate_values, format_subgroups, parse_subgroup_columns, subgroup_column_metrics

    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")
    thresholds_from = args.thresholds_from
    if thresholds_from is None and (args.thresholds_data or args.operating_point or args.calibrate):
        given = next(
            flag
            for flag, value in (
                ("--thresholds-data", args.thresholds_data),
                ("--operating-point", args.operating_point),
                ("--calibrate", args.calibrate),
            )
            if value
        )
        purpose = "fit the temperatures" if given == "--calibrate" else "choose thresholds"
        raise ValueError(f"{given} needs --thresholds-from VAL_LABELS (the validation labels to {purpose} on)")
    rule = parse_operating_point(args.operating_point or "youden") if thresholds_from else None
    subgroup_columns = parse_subgroup_columns(args.subgroups) if args.subgroups else []
    storage_options = parse_storage_options(args.storage_options) or None
    label_map = load_label_map(args.label_map) if args.label_map else None  # a bad map fails before the model loads
    predictor = Predictor(args.model)
    spec = predictor.spec
    if rule is not None and not spec.multi_label:
        if not args.calibrate or args.operating_point:
            raise ValueError(
                f"--thresholds-from: operating points are per-class thresholds of multi-label models; {args.model} is "
                f"{spec.problem_type}"
            )
        rule = None  # a single-label model: --thresholds-from's images fit its temperature, no threshold is chosen
    skipped: list[dict[str, str]] = []  # image files that cannot be decoded: left out, listed beside the metrics
    evaluated = read_labelled_images(args.data, args.labels, args, spec, label_map, storage_options, skipped)
    paths, groups, truth, not_evaluated = evaluated.paths, evaluated.groups, evaluated.truth, evaluated.not_evaluated
    labels_name = Path(evaluated.labels_file).name
    # Each column's value per image, checked (a missing column, a non-numeric binned value) before anything is scored.
    covariates = {}
    for column in subgroup_columns:
        covariates[column.column] = covariate_values(evaluated.rows, column.column, evaluated.columns, labels_name)
        for value in covariates[column.column]:
            column.group_of(value)
    validation = None
    if thresholds_from is not None:  # read and checked before anything is scored or written
        validation_data = args.thresholds_data or args.data
        validation = read_labelled_images(
            validation_data, thresholds_from, args, spec, label_map, storage_options, skipped
        )
        shared = set(validation.groups) & set(groups)
        if shared:
            raise ValueError(
                f"--thresholds-from {Path(thresholds_from).name} shares {len(shared)} patient(s) with the evaluated "
                f"set {labels_name}: thresholds must be chosen on other patients"
            )
    print(f"evaluating {len(paths)} images of {len(set(groups))} patients", file=sys.stderr)
    logits = predictor.logits(paths, batch_size=args.batch_size, storage_options=storage_options)
    validation_logits = None
    if validation is not None:
        images, patients = len(validation.paths), len(set(validation.groups))
        print(f"scoring {images} validation images of {patients} patients", file=sys.stderr)
        validation_logits = predictor.logits(
            validation.paths, batch_size=args.batch_size, storage_options=storage_options
        )
    temperature_fit = None
    if args.calibrate and validation is not None and validation_logits is not None:
        # First: the thresholds are then chosen on the calibrated validation probabilities, the ones predict gives.
        temperature_fit = _fit_temperature(predictor, validation, validation_logits, not_evaluated)
    elif predictor.temperature is not None:
        print("probabilities temperature-scaled by the model's hf_medvis_temperature", file=sys.stderr)
    probs = predictor.probabilities(logits)
    columns, scored_spec = list(range(len(spec.names))), spec
    if not_evaluated and spec.multi_label:
        # Scored without those columns (masked -1), so that no metric (F1 included) and no macro average counts them.
        columns = [c for c, name in enumerate(spec.names) if name not in not_evaluated]
        scored_spec = LabelSpec(tuple(spec.names[c] for c in columns), spec.problem_type)
    metrics = metrics_with_ci(
        truth[:, columns],
        probs[:, columns],
        groups,
        scored_spec,
        threshold=args.threshold,
        n_resamples=args.bootstrap,
        seed=args.seed,
    )
    metrics["problem_type"] = spec.problem_type
    metrics["calibration"] = calibration_metrics(truth[:, columns], probs[:, columns], scored_spec)
    if temperature_fit is not None:
        metrics["temperature"] = temperature_fit
    elif predictor.temperature is not None:
        from .calibration import TEMPERATURE_KEY

        metrics["temperature"] = {
            "values": dict(getattr(predictor.model.config, TEMPERATURE_KEY)),
            "fitted": "earlier: the model's config.json hf_medvis_temperature",
        }
    if not_evaluated:
        metrics["not_evaluated"] = not_evaluated
    operating_table = ""
    if validation is not None and validation_logits is not None and rule is not None:
        validation_probs = predictor.probabilities(validation_logits)
        operating_table = _add_operating_points(
            metrics, args, predictor, rule, validation, validation_probs, truth, probs, groups, not_evaluated
        )
    if subgroup_columns:
        thresholds = None
        if metrics.get("operating_points") is not None:  # the validation thresholds, as float32 (json_number's)
            points = metrics["operating_points"]
            thresholds = np.array(
                [points[name]["threshold"] if name in points else np.nan for name in scored_spec.names],
                dtype=np.float32,
            )
        metrics["subgroups"] = {
            column.column: subgroup_column_metrics(
                column,
                covariates[column.column],
                truth[:, columns],
                probs[:, columns],
                groups,
                scored_spec,
                thresholds=thresholds,
                n_resamples=args.bootstrap,
                seed=args.seed,
            )
            for column in subgroup_columns
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    per_class = per_class_table(metrics, spec)
    for row in per_class:
        if row["class"] in not_evaluated:
            row["evaluated"] = False
    write_json_atomic(out / "per_class.json", per_class)
    write_skipped_images(out, skipped)
    save_roc_plot(out / "roc.png", truth, probs, spec)
    save_pr_plot(out / "pr.png", truth, probs, spec)
    save_reliability_plot(out / "reliability.png", truth, probs, spec)
    if not spec.multi_label:
        save_confusion_plot(out / "confusion.png", truth, probs, spec)
    if subgroup_columns:
        save_subgroup_forest_plot(out / "subgroups.png", metrics["subgroups"], metrics.get("auroc_macro"))
    provenance = {
        **describe_model(args.model, predictor.model),
        "Data": f"{describe(args.data)} ({describe_origin(data_origin(args.data, storage_options))})",
        "Labels file": labels_name,
        "Bootstrap": f"{args.bootstrap} patient-level resamples, seed {args.seed}",
    }
    if spec.multi_label:
        provenance["F1 threshold"] = f"probability {args.threshold:g}"
    if skipped:
        provenance["Images left out"] = f"{len(skipped)} undecodable ({SKIPPED_IMAGES_NAME})"
    examples = None
    if args.heatmap_examples > 0:
        from .heatmaps import report_examples

        cut: float | list[float] = args.threshold
        if metrics.get("operating_points") is not None:  # the validation thresholds, as predict applies them
            cut = [metrics["operating_points"].get(name, {}).get("threshold", np.nan) for name in spec.names]
        examples = report_examples(
            predictor, paths, probs, truth, cut, k=args.heatmap_examples, storage_options=storage_options
        )
    write_report(
        out, metrics, spec.names, provenance=provenance, counts=class_counts(truth, spec.names), examples=examples
    )
    print(format_metrics_table(metrics, spec))
    if not_evaluated:
        print(f"not evaluated (the dataset does not label them): {', '.join(not_evaluated)}")
    print(
        f"calibration (ECE over {CALIBRATION_BINS} equal-mass bins / Brier): "
        + ", ".join(f"{name} {c['ece']:.3f} / {c['brier']:.3f}" for name, c in metrics["calibration"].items())
    )
    if temperature_fit is not None:
        print(_format_temperature(temperature_fit))
    if operating_table:
        print(operating_table)
    if subgroup_columns:
        print(format_subgroups(metrics["subgroups"], scored_spec))
    written = "metrics.json, per_class.json, roc.png, pr.png, reliability.png" + (
        "" if spec.multi_label else ", confusion.png"
    )
    written += (", subgroups.png" if subgroup_columns else "") + f", {REPORT_NAME} (open it in a browser)"
    print(f"wrote {written} to {out}")
    if args.update_card and Path(args.model).is_dir():
        from .card_results import record_test_results

        card = record_test_results(
            args.model,
            metrics,
            spec,
            images=len(paths),
            patients=len(set(groups)),
            data_description=describe_origin(data_origin(args.data, storage_options)),
        )
        print(f"added the test result to the model card {card}")
        _save_into_config(args.model, metrics, calibrated=temperature_fit is not None)
    return 0


def _fit_temperature(
    predictor: Predictor, validation: LabelledImages, validation_logits: np.ndarray, not_evaluated: list[str]
) -> dict:
    """``--calibrate``: fits the temperatures on the validation images' raw logits, sets them on ``predictor`` (every
    probability from then on is temperature-scaled) and returns ``metrics.json``'s ``temperature``."""
    from .calibration import fit_temperatures, temperature_report, temperature_vector

    spec = predictor.spec
    temperatures, without = fit_temperatures(validation.truth, validation_logits, spec, skip=not_evaluated)
    without.update({name: "not evaluated: the evaluated data does not label it" for name in not_evaluated})
    predictor.temperature = temperature_vector(temperatures, spec.names)
    report = temperature_report(validation.truth, validation_logits, spec, temperatures)
    fit: dict = {
        "values": temperatures,
        "validation": validation.describe(),
        **{f"validation_{key}": value for key, value in report.items()},
    }
    if without:
        fit["without_temperature"] = without
    return fit


def _format_temperature(fit: dict) -> str:
    """One line per temperature: T, and the validation ECE and NLL before -> after."""
    lines = [f"temperature scaling (fitted on {fit['validation']}; validation ECE and NLL before -> after):"]
    for name, value in fit["values"].items():
        ece_before, ece_after = fit["validation_ece_before"], fit["validation_ece_after"]
        nll_before, nll_after = fit["validation_nll_before"], fit["validation_nll_after"]
        ece = f"  ECE {ece_before[name]:.3f} -> {ece_after[name]:.3f}" if name in ece_before else ""
        nll = f"  NLL {nll_before[name]:.4f} -> {nll_after[name]:.4f}" if name in nll_before else ""
        lines.append(f"{name[:22]:<22} T {value:.4g}{ece}{nll}")
    lines += [
        f"{name[:22]:<22} no temperature: {reason}" for name, reason in fit.get("without_temperature", {}).items()
    ]
    return "\n".join(lines)


def _save_into_config(model_dir: str, metrics: dict, calibrated: bool) -> None:
    """The thresholds (``--thresholds-from``) and temperatures (``--calibrate``) of this evaluation into the model's
    config.json, in one atomic write. New temperatures without new thresholds drop the old thresholds: those were
    chosen on probabilities scaled otherwise."""
    from .calibration import TEMPERATURE_KEY
    from .operating_points import OPERATING_POINT_KEY, THRESHOLDS_KEY, update_model_config

    values: dict = {}
    remove: list[str] = []
    points = metrics.get("operating_points")
    if points:
        values[THRESHOLDS_KEY] = {name: point["threshold"] for name, point in points.items()}
        values[OPERATING_POINT_KEY] = metrics["operating_point"]
    if calibrated:
        temperatures = metrics["temperature"]["values"]
        if temperatures:
            values[TEMPERATURE_KEY] = temperatures
        else:
            remove.append(TEMPERATURE_KEY)
        if not points:
            remove += [THRESHOLDS_KEY, OPERATING_POINT_KEY]
    if not values and not remove:
        return
    config = update_model_config(model_dir, values, remove)
    if points:
        print(f"saved the thresholds into {config} ('hf-medvis predict' now lists findings)")
    if calibrated:
        print(f"saved the temperatures into {config} ('hf-medvis predict' now applies them)")


def _add_operating_points(
    metrics: dict,
    args: argparse.Namespace,
    predictor: Predictor,
    rule: OperatingRule,
    validation: LabelledImages,
    validation_probs: np.ndarray,
    truth: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    not_evaluated: list[str],
) -> str:
    """``--thresholds-from``: chooses each class's threshold on the validation images' probabilities by ``rule`` and
    adds ``operating_points`` (per class, on the evaluated images), ``operating_point`` (rule, validation set and, when
    temperature-scaled, which probabilities) and ``operating_points_without_threshold`` ({class: reason}) to
    ``metrics``. Returns the printed table."""
    from .operating_points import choose_thresholds, format_operating_points, operating_point_metrics

    spec = predictor.spec
    images, patients = len(validation.paths), len(set(validation.groups))
    print(f"choosing thresholds ({rule}) on {images} validation images of {patients} patients", file=sys.stderr)
    # A class the evaluated data does not label (--label-map) gets no operating point: nothing to apply it to.
    thresholds, without = choose_thresholds(validation.truth, validation_probs, spec, rule, skip=not_evaluated)
    without.update({name: "not evaluated: the evaluated data does not label it" for name in not_evaluated})
    metrics["operating_point"] = {"rule": str(rule), "validation": validation.describe()}
    if predictor.temperature is not None:  # thresholds apply to these probabilities only: say which they are
        metrics["operating_point"]["probabilities"] = (
            "temperature-scaled, the temperatures fitted first on the same validation images (--calibrate)"
            if "validation_ece_after" in metrics.get("temperature", {})
            else "temperature-scaled by the model's hf_medvis_temperature"
        )
    metrics["operating_points"] = operating_point_metrics(
        truth,
        probs,
        groups,
        spec,
        thresholds,
        rule=rule,
        validation_truth=validation.truth,
        validation_groups=validation.groups,
        n_resamples=args.bootstrap,
        seed=args.seed,
    )
    if without:
        metrics["operating_points_without_threshold"] = without
    return (
        f"operating points ({rule}, chosen on {metrics['operating_point']['validation']}; applied to the evaluated "
        "images, 95% CIs from a patient-level bootstrap):\n"
        + format_operating_points(metrics["operating_points"], without)
    )


def _apply_label_map(
    texts: list[str | None],
    keep: list[int],
    file_columns: Sequence[str],
    chosen: Sequence[str],
    spec: LabelSpec,
    label_map: Mapping[str, str | None],
    file_name: str,
) -> tuple[list[int], list[str]]:
    """``--label-map``: the texts of the images ``keep`` renamed onto the model's classes, in place (``texts`` is the
    records' ``finding_labels``). Returns the images to score and the model classes that no name of the file maps to
    (not evaluated). The file's names are its class columns (wide), ``--label-names`` (nih: the findings to score,
    the others ignored), or the findings its rows name. One note lists the names that count for no model class."""
    from collections import Counter

    from ..core.text import short_list
    from ..data.labels import LabelError, parse_finding_labels, parse_unknown_labels
    from ..data.labels.label_map import map_class_name, map_finding_labels, mapped_classes
    from ..data.labels.layouts import finding_key

    label_map = dict(label_map)
    seen = dict.fromkeys(n for i in keep for n in parse_finding_labels(texts[i]) + parse_unknown_labels(texts[i]))
    if file_columns:
        names = list(file_columns)
    elif chosen:
        names = list(chosen)
        wanted = {finding_key(name) for name in chosen}
        label_map.update({finding_key(n): None for n in seen if finding_key(n) not in wanted})
    else:
        names = list(seen)
    classes = set(spec.names)
    provided = mapped_classes(names, label_map, classes)
    if not provided:
        raise LabelError(
            f"--label-map: none of the findings of {file_name} ({short_list(names, empty='none')}) maps to a class "
            f"of the model ({', '.join(spec.names)})"
        )
    ignored: Counter = Counter({name.strip(): 0 for name in names if map_class_name(name, label_map, classes) is None})
    for i in keep:
        texts[i] = map_finding_labels(texts[i], label_map, classes, ignored)
    if ignored:
        shown = [
            f"{name}{f' -> {label_map[finding_key(name)]}' if label_map.get(finding_key(name)) else ''} ({count})"
            for name, count in sorted(ignored.items(), key=lambda item: (-item[1], item[0]))
        ]
        print(f"note: {file_name}: findings that count for none of the model's classes, ignored (images): "
              f"{short_list(shown, limit=12)}", file=sys.stderr)  # fmt: skip
    if not spec.multi_label:  # one class per image: an image of none (or several) of the model's has no right answer
        scored = [i for i in keep if len(parse_finding_labels(texts[i])) == 1 or parse_unknown_labels(texts[i])]
        if not scored:
            raise LabelError(
                f"--label-map: none of the labelled images of {file_name} is of one of the model's classes"
            )
        if len(scored) < len(keep):
            print(f"skipping {len(keep) - len(scored)} image(s) of none or several of the model's classes after "
                  "--label-map", file=sys.stderr)  # fmt: skip
        keep = scored
    return keep, [name for name in spec.names if name not in provided]


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    """``hf-medvis evaluate`` of a segmentation model: Dice and IoU per class and macro against --masks, with
    patient-bootstrap CIs, in OUT/metrics.json."""
    from ..core.storage import parse_storage_options, write_json_atomic
    from ..data.folder import write_skipped_images
    from .segment import SegmentationPredictor, evaluate_masks, read_masked_images
    from .segmentation_metrics import format_segmentation_table

    if not (args.masks or args.masks_rle):
        raise ValueError(f"{args.model} is a segmentation model: pass its true masks with --masks DIR or --masks-rle")
    storage_options = parse_storage_options(args.storage_options) or None
    predictor = SegmentationPredictor(args.model)
    skipped: list[dict[str, str]] = []
    paths, true_masks, groups = read_masked_images(
        args.data,
        predictor.class_names,
        masks_dir=args.masks,
        masks_rle=args.masks_rle,
        mask_labels=args.mask_labels,
        labels_file=args.labels,
        labels_format=labels_format_from_args(args),
        storage_options=storage_options,
        skipped=skipped,
    )
    print(f"evaluating {len(paths)} images of {len(set(groups))} patients", file=sys.stderr)
    metrics = evaluate_masks(
        predictor,
        paths,
        true_masks,
        groups,
        n_resamples=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        storage_options=storage_options,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    write_skipped_images(out, skipped)
    print(format_segmentation_table(metrics, predictor.class_names))
    print(f"wrote metrics.json to {out}")
    return 0


def _predict_segmentation(args: argparse.Namespace) -> int:
    from .predict import output_stems
    from .segment import SegmentationPredictor, write_mask_outputs

    if args.out is None:
        raise ValueError(f"{args.model} is a segmentation model: pass --out DIR for its masks and overlays")
    if args.heatmap:
        raise ValueError("--heatmap is for classifiers; a segmentation model's overlay is its mask (--out)")
    predictor = SegmentationPredictor(args.model)
    stems = output_stems(args.files)
    lines = []
    for start in range(0, len(args.files), args.batch_size):
        batch = args.files[start : start + args.batch_size]
        images = [predictor.read(file) for file in batch]  # read once: the masks and the overlays
        for offset, (file, image, mask) in enumerate(
            zip(batch, images, predictor.masks_of_images(images), strict=True)
        ):
            line = write_mask_outputs(
                file, mask, args.out, predictor.class_names, image=image, stem=stems[start + offset]
            )
            lines.append(json.dumps(line))
    _write_lines(args.output, lines)
    return 0


def _write_lines(output: str | None, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    if output:
        from ..core.storage import write_text_atomic

        write_text_atomic(output, text)
    else:
        sys.stdout.write(text)


def run_predict(args: argparse.Namespace) -> int:
    from ..models.segmentation import is_segmentation_model
    from .operating_points import json_number
    from .predict import Predictor

    if is_segmentation_model(args.model):
        return _predict_segmentation(args)
    if args.out is not None:
        raise ValueError(f"--out is for segmentation models; {args.model} is a classifier (see --heatmap, --output)")
    predictor = Predictor(args.model)
    probs = predictor.predict(args.files, batch_size=args.batch_size)
    findings = predictor.findings(probs)  # None without saved thresholds: no "findings" key
    heatmaps = None
    if args.heatmap:
        from .heatmaps import write_heatmaps

        heatmaps = write_heatmaps(predictor, args.files, args.heatmap, batch_size=args.batch_size)
    lines = []
    for i, (file, row) in enumerate(zip(args.files, probs, strict=True)):
        # Each probability as the shortest decimal of its float32 value: comparing it with a saved threshold (written
        # the same way) gives the findings below.
        line = {
            "file": file.split("?", 1)[0],
            "probabilities": {name: json_number(p) for name, p in zip(predictor.spec.names, row, strict=True)},
        }
        if findings is not None:
            line["findings"] = findings[i]
        if heatmaps is not None:
            line["heatmaps"] = heatmaps[i]
        lines.append(json.dumps(line))
    _write_lines(args.output, lines)
    return 0
