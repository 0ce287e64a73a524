"""``hf-medvis evaluate --model DIR`` writes its held-out result into DIR's model card: Hub metadata (``model-index``,
split ``test``, with the patient-bootstrap CI) and a text section. Re-running replaces that result; the validation
figures the recipe wrote stay, named as validation; with ``--subgroups`` it holds a "Subgroups" table, and the
temperatures of ``--calibrate`` (or config.json's) beside the calibration. With ``--thresholds-from``, an "Operating
points" section follows it (its own markers: replaced only by a new choice of thresholds, so it keeps describing the
thresholds config.json holds).
Nothing identifying goes in: counts, metrics and the validation labels file's name only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from ..core.storage import write_text_atomic
from ..data.labels import LabelSpec
from .metrics import OPERATING_POINT_RATES, format_metrics_table

TEST_SPLIT = "test"
BEGIN, END = "<!-- hf-medvis evaluate: begin -->", "<!-- hf-medvis evaluate: end -->"
OPERATING_BEGIN = "<!-- hf-medvis operating points: begin -->"
OPERATING_END = "<!-- hf-medvis operating points: end -->"
LIMITATIONS = "## Intended use and limitations"
HEADLINES = (("auroc_macro", "roc_auc"), ("accuracy", "accuracy"), ("ap_macro", "average_precision"))


def _eval_results(metrics: dict[str, Any], dataset_name: str, dataset_type: str, classes: int) -> list[EvalResult]:
    results = []

    def add(metric_type: str, value: float, name: str) -> None:
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=TEST_SPLIT,
                metric_type=metric_type,
                metric_value=round(float(value), 4),
                metric_name=name,
            )
        )

    not_evaluated = metrics.get("not_evaluated") or []
    for key, metric_type in HEADLINES:
        if metrics.get(key) is None:
            continue
        ci = ""
        if metrics.get(f"{key}_ci95_low") is not None:
            ci = f" (95% CI {metrics[f'{key}_ci95_low']:.3f}-{metrics[f'{key}_ci95_high']:.3f}, patient bootstrap)"
        if not_evaluated and key.endswith("_macro"):  # the data labels some classes only: say over which
            ci = f" over {classes - len(not_evaluated)} of {classes} classes{ci}"
        add(metric_type, metrics[key], f"{key}{ci}")
    # Sensitivity and specificity of each class at its operating point (--thresholds-from): "recall" is the Hub's
    # name for sensitivity; the rule and threshold go into the name, as the CI does.
    for name, point in (metrics.get("operating_points") or {}).items():
        for rate, metric_type in (("sensitivity", "recall"), ("specificity", "specificity")):
            if point.get(rate) is None:
                continue
            ci = f", 95% CI {point[f'{rate}_ci95_low']:.3f}-{point[f'{rate}_ci95_high']:.3f}"
            add(metric_type, point[rate], f"{rate}_{name} (threshold {point['threshold']:.4g}, {point['rule']}{ci})")
    return results


def _not_evaluated_lines(metrics: dict[str, Any]) -> list[str]:
    """The classes the test data does not label (``evaluate --label-map``): no number for them, none in the macros."""
    names = metrics.get("not_evaluated") or []
    if not names:
        return []
    return [
        "",
        f"Not evaluated (the test data does not label them): {', '.join(names)}. The macro averages are over the other "
        "classes.",
    ]


def _calibration_lines(metrics: dict[str, Any]) -> list[str]:
    """Per class, how far the probabilities are from observed rates (``calibration.py``): ECE and Brier score."""
    calibration = metrics.get("calibration") or {}
    if not calibration:
        return []
    bins = max(entry["bins"] for entry in calibration.values())
    rows = [f"| {name} | {c['ece']:.3f} | {c['brier']:.3f} |" for name, c in calibration.items()]
    return ["", f"| class | ECE ({bins} equal-mass bins) | Brier |", "|---|---|---|", *rows]


def _temperature_lines(metrics: dict[str, Any]) -> list[str]:
    """The temperatures the probabilities were scaled by (``--calibrate``, or config.json's), and what fitting did to
    the validation ECE."""
    temperature = metrics.get("temperature") or {}
    values = temperature.get("values") or {}
    if not values:
        return []
    listed = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
    if "validation" not in temperature:
        return ["", f"Probabilities are temperature-scaled by config.json's `hf_medvis_temperature` (T: {listed})."]
    before, after = temperature.get("validation_ece_before", {}), temperature.get("validation_ece_after", {})
    ece = ", ".join(f"{name} {before[name]:.3f} -> {after[name]:.3f}" for name in before if name in after)
    return [
        "",
        f"Probabilities are temperature-scaled (logits / T, saved in config.json as `hf_medvis_temperature`; T: "
        f"{listed}), T fitted by minimising the negative log-likelihood of validation patients "
        f"({temperature['validation']}), none of whom is in the test set"
        + (f"; validation ECE before -> after: {ece}." if ece else "."),
    ]


def _ci_text(entry: dict[str, Any], key: str) -> str:
    if entry.get(key) is None:
        return "n/a"
    text = f"{entry[key]:.3f}"
    if entry.get(f"{key}_ci95_low") is not None:
        text += f" ({entry[f'{key}_ci95_low']:.3f}-{entry[f'{key}_ci95_high']:.3f})"
    return text


def _subgroup_lines(metrics: dict[str, Any]) -> list[str]:
    """The "Subgroups" table (``--subgroups``): per column and value images, patients, macro AUROC with its 95% CI;
    then per column the largest gap in macro AUROC."""
    from .subgroups import GAP_KEY, MIN_EACH, format_gap

    subgroups = metrics.get("subgroups") or {}
    if not subgroups:
        return []
    rows, gaps = [], []
    for column, groups in subgroups.items():
        for value, entry in groups.items():
            if value != GAP_KEY:
                small = f"; too few cases for {', '.join(entry['too_small'])}" if entry.get("too_small") else ""
                rows.append(
                    f"| {column} | {value} | {entry['images']} | {entry['patients']} | "
                    f"{_ci_text(entry, 'auroc_macro')}{small} |"
                )
        gap = (groups.get(GAP_KEY) or {}).get("auroc_macro")
        gaps.append(f"Largest gap by {column}, {format_gap('macro AUROC', gap)}." if gap else "")
    return [
        "",
        "### Subgroups",
        "",
        f"95% CIs from a patient-level bootstrap within each subgroup; a class with fewer than {MIN_EACH} positives or "
        "negatives in a subgroup is left out of its macro AUROC.",
        "",
        "| column | value | images | patients | macro AUROC (95% CI) |",
        "|---|---|---|---|---|",
        *rows,
        *([""] + [gap for gap in gaps if gap] if any(gaps) else []),
    ]


def _rate_cell(point: dict[str, Any], rate: str) -> str:
    if point.get(rate) is None:
        return f"n/a ({(point.get('undefined') or {}).get(rate, 'undefined')})"
    return _ci_text(point, rate)


def _operating_points_section(metrics: dict[str, Any]) -> str:
    """The "Operating points" section (``evaluate --thresholds-from``): per class its threshold and, on the test
    images, sensitivity, specificity, PPV, NPV with 95% CIs; the rule and the validation set that chose them. Empty
    without operating points."""
    points = metrics.get("operating_points") or {}
    if not points:
        return ""
    chosen = metrics.get("operating_point") or {}
    rows = [
        f"| {name} | {point['threshold']} | "
        + " | ".join(_rate_cell(point, rate) for rate in OPERATING_POINT_RATES)
        + " |"
        for name, point in points.items()
    ]
    without = metrics.get("operating_points_without_threshold") or {}
    return "\n".join(
        [
            OPERATING_BEGIN,
            "## Operating points",
            "",
            f"Per-class thresholds chosen by the rule `{chosen.get('rule', '?')}` on validation patients "
            f"({chosen.get('validation', '?')}), none of whom is in the test set, then applied unchanged to the test "
            "images; 95% CIs from a patient-level bootstrap. They are saved in config.json (`hf_medvis_thresholds`): "
            "`hf-medvis predict` lists the findings at or above them. A probability >= the threshold is a positive call."
            + (f" Probabilities: {chosen['probabilities']}." if chosen.get("probabilities") else ""),
            "",
            "| class | threshold | sensitivity | specificity | PPV | NPV |",
            "|---|---|---|---|---|---|",
            *rows,
            *(
                [""] + [f"No operating point for {name}: {reason}." for name, reason in without.items()]
                if without
                else []
            ),
            OPERATING_END,
        ]
    )


def record_test_results(
    model_dir: str | Path,
    metrics: dict[str, Any],
    spec: LabelSpec,
    *,
    images: int,
    patients: int,
    data_description: str,
    dataset_id: str | None = None,
) -> Path:
    """Adds (or replaces) the test result in ``model_dir``'s README.md, and the operating points when ``metrics`` has
    them; returns its path."""
    path = Path(model_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\nlibrary_name: transformers\n---\n")
    name = f"held-out test patients ({data_description})"
    kept = [r for r in (card.data.eval_results or []) if r.dataset_split != TEST_SPLIT]
    card.data.eval_results = kept + _eval_results(metrics, name, dataset_id or "private", len(spec.names))
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = Path(model_dir).resolve().name
    section = "\n".join(
        [
            BEGIN,
            "## Test results (`hf-medvis evaluate`)",
            "",
            f"{images} images of {patients} held-out patients ({data_description}), never used for training or for "
            "choosing the checkpoint; 95% CIs from a patient-level bootstrap.",
            "",
            "```",
            format_metrics_table(metrics, spec),
            "```",
            *_not_evaluated_lines(metrics),
            *_calibration_lines(metrics),
            *_temperature_lines(metrics),
            *_subgroup_lines(metrics),
            END,
        ]
    )
    text = card.text
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    elif LIMITATIONS in text:
        text = text.replace(LIMITATIONS, f"{section}\n\n{LIMITATIONS}", 1)
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    operating = _operating_points_section(metrics)
    if operating and OPERATING_BEGIN in text and OPERATING_END in text:
        text = text[: text.index(OPERATING_BEGIN)] + operating + text[text.index(OPERATING_END) + len(OPERATING_END) :]
    elif operating:  # right after the test results it was measured with
        text = text.replace(END, f"{END}\n\n{operating}", 1)
    content = f"---\n{card.data.to_yaml()}\n---\n{text}"
    write_text_atomic(path, content)
    return path
