"""Patient-level, label-stratified train / validation / test splits, and how precise a split's metrics can be.

Image-level splits leak patients (follow-ups of one patient look alike) and inflate scores, so every split here keeps a
patient's images together. Stratification is multi-label aware: iterative stratification (Sechidis et al., 2011) applied
to patients, rarest label first, so each label's positives spread across splits as evenly as the groups allow.
scikit-learn's StratifiedGroupKFold handles one label per sample and equal-sized folds only, which fits neither
multi-label findings nor a 70/10/20 split, hence the small algorithm below.

The report gives the expected standard error of AUROC per class (Hanley & McNeil, 1982) and of accuracy (binomial) for
the split's sizes, and optionally the validation size that reaches a target 95% CI half-width.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.storage import open_local_atomic, write_json_atomic
from .labels import (
    LABEL_COL,
    PATIENT_COL,
    LabelSpec,
    infer_label_spec,
    is_labelled,
    label_array,
    read_labels_table,
)
from .labels.layouts import LabelsFormat

Z95 = 1.959963984540054
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


class SplitError(ValueError):
    """Input that cannot be split (missing columns, too few patients) or a split that leaks patients."""


def stratified_group_assignment(
    groups: Sequence[Any], matrix: np.ndarray, fractions: Sequence[float], seed: int = 0
) -> np.ndarray:
    """Split index per row; rows of one group share a split. ``matrix`` is [N, C] 0/1, ``fractions`` sum to 1."""
    fractions = np.asarray(fractions, dtype=float)
    if np.any(fractions < 0) or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6):
        raise SplitError(f"split fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    group_ids, row_group = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = len(group_ids)
    counts = np.zeros((n_groups, matrix.shape[1]), dtype=np.int32)
    np.add.at(counts, row_group, matrix == 1)  # positives per group (-1, an unknown label, is not one)
    sizes = np.bincount(row_group, minlength=n_groups).astype(float)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)  # random tie-breaking, fixed by the seed
    demand_size = fractions * sizes.sum()
    left = counts.sum(axis=0)  # positives per label not placed yet
    demand_label = fractions[:, None] * left[None, :]
    assignment = np.full(n_groups, -1)
    remaining = np.ones(n_groups, dtype=bool)
    usable = [s for s in range(len(fractions)) if fractions[s] > 0]

    def place(group: int, label: int | None) -> None:
        keys = [
            (demand_label[s, label] if label is not None else 0.0, demand_size[s], rng.random())
            for s in range(len(fractions))
        ]
        split = max(usable, key=lambda s: keys[s])
        assignment[group] = split
        remaining[group] = False
        demand_label[split] -= counts[group]
        demand_size[split] -= sizes[group]
        left[:] -= counts[group]

    while np.any(left > 0):
        label = int(np.argmin(np.where(left > 0, left, np.iinfo(left.dtype).max)))  # the rarest label still unplaced
        # Its unplaced groups, in the seeded order (placing one group changes no other group's eligibility).
        for group in order[remaining[order] & (counts[order, label] > 0)]:
            place(int(group), label)
    for group in order[remaining[order]]:
        place(int(group), None)
    return assignment[row_group]


def stratified_subsample(matrix: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed, label-stratified subsample of ``size`` rows (for frequent mid-training evaluation)."""
    n = matrix.shape[0]
    if size >= n:
        return np.arange(n)
    split = stratified_group_assignment(np.arange(n), matrix, [size / n, 1 - size / n], seed)
    return np.flatnonzero(split == 0)


# ---- precision of metrics --------------------------------------------------------------------------------------------


def auroc_standard_error(auroc: float, positives: int, negatives: int) -> float | None:
    """Hanley & McNeil (1982): SE of an AUROC estimated from ``positives`` / ``negatives`` cases; None if either is 0."""
    if positives <= 0 or negatives <= 0:
        return None
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def accuracy_standard_error(accuracy: float, n: int) -> float | None:
    """Binomial SE sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n > 0 else None


def images_for_auroc_ci(auroc: float, prevalence: float, half_width: float) -> int | None:
    """Smallest number of images (at this prevalence) whose AUROC 95% CI half-width is <= ``half_width``."""
    if not 0 < prevalence < 1:
        return None

    def width(n: int) -> float:
        se = auroc_standard_error(auroc, max(1, round(n * prevalence)), max(1, round(n * (1 - prevalence))))
        return Z95 * (se or math.inf)

    low, high = 2, 2
    while width(high) > half_width:
        high *= 2
        if high > 10**9:
            return None
    while low < high:  # the half-width shrinks as n grows
        mid = (low + high) // 2
        low, high = (mid + 1, high) if width(mid) > half_width else (low, mid)
    return high


def images_for_accuracy_ci(accuracy: float, half_width: float) -> int:
    return math.ceil(accuracy * (1 - accuracy) * (Z95 / half_width) ** 2)


def split_report(
    assignment: np.ndarray,
    groups: Sequence[Any],
    matrix: np.ndarray,
    spec: LabelSpec,
    *,
    assumed_auroc: float = 0.85,
    assumed_accuracy: float = 0.8,
    target_ci: float | None = None,
    split_names: Sequence[str] = SPLIT_NAMES,
    labelled: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per split: images, patients, per class positives/negatives and the expected AUROC SE / 95% CI half-width;
    accuracy SE / CI; with ``target_ci``, the validation size that reaches it. ``warnings`` lists empty classes.
    ``labelled`` (default: every row) marks the rows that count in the label statistics."""
    groups = np.asarray([str(g) for g in groups])
    labelled = np.ones(len(groups), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    report: dict[str, Any] = {
        "assumptions": {"auroc": assumed_auroc, "accuracy": assumed_accuracy, "ci": "95%, normal approximation"},
        "problem_type": spec.problem_type,
        "labels": list(spec.names),
        "splits": {},
        "warnings": [],
    }
    for index, name in enumerate(split_names):
        in_split = assignment == index
        if not in_split.any():
            continue
        rows = in_split & labelled
        n = int(rows.sum())
        acc_se = accuracy_standard_error(assumed_accuracy, n)
        classes = {}
        for c, label in enumerate(spec.names):
            pos = int((matrix[rows, c] == 1).sum())
            neg = int((matrix[rows, c] == 0).sum())  # unknown labels (-1) count as neither
            se = auroc_standard_error(assumed_auroc, pos, neg)
            classes[label] = {
                "positives": pos,
                "negatives": neg,
                "auroc_se": se,
                "auroc_ci95_half_width": Z95 * se if se is not None else None,
            }
            if name != "train" and pos == 0:
                report["warnings"].append(f"class '{label}' has no positives in {name}: its AUROC is undefined there")
        report["splits"][name] = {
            "images": int(in_split.sum()),
            "unlabelled_images": int((in_split & ~labelled).sum()),
            "patients": int(len(set(groups[in_split]))),
            "accuracy_se": acc_se,
            "accuracy_ci95_half_width": Z95 * acc_se if acc_se is not None else None,
            "classes": classes,
        }
    if target_ci is not None:
        known = matrix[labelled] >= 0
        prevalence = (matrix[labelled] == 1).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
        per_class = {
            label: images_for_auroc_ci(assumed_auroc, float(prevalence[c]), target_ci)
            for c, label in enumerate(spec.names)
        }
        images_per_patient = len(groups) / max(len(set(groups)), 1)
        needed = [v for v in per_class.values() if v is not None]
        worst = max(needed) if needed else None
        report["target"] = {
            "ci95_half_width": target_ci,
            "val_images_for_auroc_per_class": per_class,
            "val_images_for_auroc_all_classes": worst,
            "val_patients_for_auroc_all_classes": math.ceil(worst / images_per_patient) if worst else None,
            "val_images_for_accuracy": images_for_accuracy_ci(assumed_accuracy, target_ci),
        }
    return report


def format_split_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    a = report["assumptions"]
    lines = [
        f"Expected 95% CI half-widths at AUROC {a['auroc']:g} (Hanley-McNeil) and accuracy {a['accuracy']:g} "
        "(binomial)",
        "",
    ]
    header = f"{'split':<6} {'class':<22} {'pos':>6} {'neg':>7} {'AUROC SE':>9} {'±95% CI':>8}"
    for name, split in report["splits"].items():
        ci = split["accuracy_ci95_half_width"]
        unlabelled = f" ({split['unlabelled_images']} unlabelled)" if split.get("unlabelled_images") else ""
        lines.append(
            f"{name}: {split['images']} images{unlabelled}, {split['patients']} patients; accuracy "
            + (f"±{ci:.3f}" if ci is not None else "n/a")
        )
    lines += ["", header, "-" * len(header)]
    for name, split in report["splits"].items():
        for label, c in split["classes"].items():
            se = f"{c['auroc_se']:.4f}" if c["auroc_se"] is not None else "n/a"
            ci = f"{c['auroc_ci95_half_width']:.3f}" if c["auroc_ci95_half_width"] is not None else "n/a"
            lines.append(f"{name:<6} {label[:22]:<22} {c['positives']:>6} {c['negatives']:>7} {se:>9} {ci:>8}")
    if "target" in report:
        t = report["target"]
        lines += ["", f"Validation size for a ±{t['ci95_half_width']:g} 95% CI:"]
        for label, n in t["val_images_for_auroc_per_class"].items():
            lines.append(f"  AUROC {label}: {n if n is not None else 'n/a'} images")
        lines.append(
            f"  AUROC, every class: {t['val_images_for_auroc_all_classes']} images "
            f"(~{t['val_patients_for_auroc_all_classes']} patients)"
        )
        lines.append(f"  accuracy: {t['val_images_for_accuracy']} images")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


# ---- CSV splitting ---------------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    paths: dict[str, Path]
    report: dict[str, Any]


def split_labels_csv(
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels_format: LabelsFormat | None = None,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    problem_type: str = "auto",
    assumed_auroc: float = 0.85,
    assumed_accuracy: float = 0.8,
    target_ci: float | None = None,
) -> SplitResult:
    """Writes ``train.csv``, ``val.csv``, ``test.csv`` (the input's columns and rows, as ``read_labels_table`` reads
    them: UTF-8 without a byte-order mark, values stripped, patient ids normalised; every row of an image in the split
    of that image) and ``split_report.json``.

    Rows with an empty label cell are unlabelled: they go with their patient into one split (an MAE pretraining on
    train.csv still sees them) but count neither as positives nor as negatives in the report."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise SplitError(f"--val and --test must be in [0, 1) with val + test < 1, got {val} and {test}")
    fmt = labels_format or LabelsFormat()
    group_col, label_col = PATIENT_COL, LABEL_COL  # the canonical columns of every layout
    table = read_labels_table(labels_csv, required=(group_col, label_col), labels_format=fmt)
    columns, rows = table.columns, table.rows
    if not rows:
        raise SplitError(f"{table.path.name} has no rows")
    missing = [str(i + 2) for i, row in enumerate(rows) if not row[group_col]]
    if missing:
        raise SplitError(
            f"{len(missing)} row(s) of {table.path.name} have no patient (rows {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): every image needs its patient"
        )
    labelled = np.array([is_labelled(row[label_col]) for row in rows])
    if not labelled.any():
        raise SplitError(f"every label of {table.path.name} is empty: nothing to stratify on")
    texts = [row[label_col] for row, ok in zip(rows, labelled, strict=True) if ok]
    spec = infer_label_spec(texts, label_names, problem_type)
    matrix = np.zeros((len(rows), len(spec.names)), dtype=np.int8)
    matrix[labelled] = label_array(texts, spec)
    groups = [row[group_col] for row in rows]
    n_groups = len(set(groups))
    needed = 1 + (val > 0) + (test > 0)
    if n_groups < needed:
        raise SplitError(f"{n_groups} patient(s) cannot fill {needed} patient-disjoint splits")
    assignment = stratified_group_assignment(groups, matrix, [1 - val - test, val, test], seed)
    report = split_report(
        assignment,
        groups,
        matrix,
        spec,
        assumed_auroc=assumed_auroc,
        assumed_accuracy=assumed_accuracy,
        target_ci=target_ci,
        labelled=labelled,
    )
    report["source"] = {
        "file": table.path.name,
        "labels_format": table.layout,
        "group_col": fmt.patient_regex and f"regex {fmt.patient_regex}" or fmt.group_column(),
        "label_col": ", ".join(table.classes) if table.classes else fmt.label_col,
        "uncertain": fmt.uncertain if table.classes else None,
        "fractions": {"train": 1 - val - test, "val": val, "test": test},
        "seed": seed,
    }
    report["labels_file_warnings"] = list(table.warnings)  # logged when the file was read
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, name in enumerate(SPLIT_NAMES):
        paths[name] = out / f"{name}.csv"
        with open_local_atomic(paths[name], "w", encoding="utf-8", newline="") as handle:  # streamed: no copy in memory
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            for image_rows, split in zip(table.input_rows, assignment, strict=True):
                if split == index:  # every row of the image (long layout, merged duplicates), as the file has them
                    writer.writerows(image_rows)
    paths["report"] = out / "split_report.json"
    write_json_atomic(paths["report"], report)
    return SplitResult(paths, report)


def check_patient_disjoint(train_groups: Sequence[str], eval_groups: Sequence[str], what: str = "validation") -> None:
    """A validation set that shares patients with training measures memory, not generalisation: refuse it."""
    shared = set(train_groups) & set(eval_groups)
    if shared:
        raise SplitError(
            f"the {what} set shares {len(shared)} patient(s) with the training set; split by patient "
            "(`hf-medvis split LABELS_CSV --out DIR`) so that no patient is on both sides"
        )
