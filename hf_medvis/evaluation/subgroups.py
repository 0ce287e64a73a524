"""Subgroup analysis (``hf-medvis evaluate --subgroups``): the metrics of the images of each value of a covariate column
of the labels file (sex, view, a binned age), with patient-bootstrap CIs within the subgroup, and per column the largest
gap between subgroups with a CI from a bootstrap of the difference.

Every number comes from ``metrics.metric_values`` and the bootstrap of ``bootstrap.py``; operating points are applied at
the thresholds chosen once on the validation patients, never re-chosen per subgroup. A class with fewer than
``MIN_EACH`` positives or negatives in a subgroup gets no number there (an AUROC of 3 positives says little), and the
reason instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.labels import LabelSpec
from .bootstrap import metrics_with_intervals, patient_members, patient_resamples, percentile_interval
from .metrics import metric_values, number_text, value_with_ci

MIN_EACH = 5  # positives and negatives a class needs in a subgroup to be scored there
OUT_OF_RANGE = "out of range"  # a binned value outside the edges: its own group, counted, never dropped
MISSING = "missing"  # an empty cell
SUBGROUP_RATES = ("sensitivity", "specificity")  # at the validation thresholds (--thresholds-from)
GAP_KEY = "_largest_gap"


@dataclass(frozen=True)
class SubgroupColumn:
    """A covariate column of the labels file: its values as they are (categorical) or, with ``edges``, numbers binned
    into [e0, e1), [e1, e2), ..., [e(k-1), ek] (the last bin includes its upper edge)."""

    column: str
    edges: tuple[float, ...] = ()

    def bin_names(self) -> list[str]:
        """The names of the bins, in order: ``[0, 40)``, ``[40, 60)``, ``[60, 120]``."""
        edges = [f"{edge:g}" for edge in self.edges]
        names = [f"[{low}, {high})" for low, high in zip(edges[:-1], edges[1:], strict=True)]
        if names:
            names[-1] = names[-1][:-1] + "]"
        return names

    def group_of(self, value: str) -> str:
        """The subgroup of one cell; ValueError (naming the column and the value) for a non-numeric value of a binned
        column."""
        if not value:
            return MISSING
        if not self.edges:
            return value
        number = _number(value)
        if not math.isfinite(number):
            raise ValueError(
                f"--subgroups {self.column}: '{value}' is not a number, so it falls in none of the bins "
                f"{', '.join(self.bin_names())} (bin numeric columns only)"
            )
        if number < self.edges[0] or number > self.edges[-1]:
            return OUT_OF_RANGE
        index = min(int(np.searchsorted(self.edges, number, side="right")) - 1, len(self.edges) - 2)
        return self.bin_names()[index]

    def order(self, names: Sequence[str]) -> list[str]:
        """The subgroups present, in reading order: the bins by their edges (categories sorted), then out of range and
        missing."""
        present = set(names)
        main = [n for n in self.bin_names() if n in present] if self.edges else sorted(present - {MISSING})
        return main + [n for n in (OUT_OF_RANGE, MISSING) if n in present and n not in main]


# A DICOM Age String (PatientAge, and NIH's first Data_Entry release): three digits and a unit, "058Y", "006M".
_DICOM_AGE = re.compile(r"^(\d{1,3})([DWMY])$", re.IGNORECASE)
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _number(value: str) -> float:
    """A cell as a number: plain ("58", "58.5") or a DICOM age string in years ("058Y" 58, "006M" 0.5); NaN if neither."""
    match = _DICOM_AGE.match(value.strip())
    if match:
        return int(match.group(1)) * _YEARS_PER_UNIT[match.group(2).upper()]
    try:
        return float(value)
    except ValueError:
        return math.nan


def parse_subgroup_columns(texts: Sequence[str]) -> list[SubgroupColumn]:
    """``--subgroups``: ``COLUMN`` (categorical) or ``COLUMN:E0,E1,...`` (numbers binned at increasing edges, e.g.
    ``Patient Age:0,40,60,120``). ValueError (one line) for bad edges or a column given twice."""
    columns: list[SubgroupColumn] = []
    for text in texts:
        name, colon, edges_text = text.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"--subgroups '{text}': name a column of the labels file, e.g. 'Patient Gender'")
        edges: tuple[float, ...] = ()
        if colon:
            try:
                edges = tuple(float(edge) for edge in edges_text.split(","))
            except ValueError:
                edges = ()
            if len(edges) < 2 or not all(map(math.isfinite, edges)) or list(edges) != sorted(set(edges)):
                raise ValueError(
                    f"--subgroups '{text}': bin edges must be two or more increasing numbers after the colon, e.g. "
                    f"'{name}:0,40,60,120'"
                )
        if any(column.column == name for column in columns):
            raise ValueError(f"--subgroups: column '{name}' is given twice")
        columns.append(SubgroupColumn(name, edges))
    return columns


def covariate_values(
    rows_per_image: Sequence[Sequence[Mapping[str, str]]], column: str, file_columns: Sequence[str], file_name: str
) -> list[str]:
    """Each image's value of ``column`` from its rows of the labels file (several in the long and list layouts: they
    must agree). ValueError (one line) for a column the file does not have, listing its columns, or an image whose
    rows disagree."""
    if column not in file_columns:
        raise ValueError(
            f"--subgroups: {file_name} has no column '{column}' (columns: {', '.join(file_columns) or 'none'})"
        )
    values = []
    for rows in rows_per_image:
        found = dict.fromkeys((row.get(column) or "").strip() for row in rows)
        if len(found) > 1:
            raise ValueError(
                f"--subgroups: {file_name} gives one image several values of '{column}' "
                f"({', '.join(repr(v) for v in found)}); an image's rows must agree"
            )
        values.append(next(iter(found), ""))
    return values


def _masked_truth(truth: np.ndarray, spec: LabelSpec) -> tuple[np.ndarray, dict[str, str]]:
    """``truth`` with the classes that have fewer than ``MIN_EACH`` positives or negatives unknown (-1): left out of
    every metric and macro average; and their counts as the reason."""
    positives, negatives = (truth > 0).sum(axis=0), (truth == 0).sum(axis=0)
    masked = truth.copy()
    too_small: dict[str, str] = {}
    for c, name in enumerate(spec.names):
        if positives[c] < MIN_EACH or negatives[c] < MIN_EACH:
            too_small[name] = f"{positives[c]} positives, {negatives[c]} negatives (needs {MIN_EACH} of each)"
            masked[:, c] = -1
    return masked, too_small


def _wanted(key: str) -> bool:
    return key.startswith("auroc_") or key.startswith(SUBGROUP_RATES)


def subgroup_column_metrics(
    column: SubgroupColumn,
    values: Sequence[str],
    truth: np.ndarray,
    probs: np.ndarray,
    patients: Sequence[Any],
    spec: LabelSpec,
    *,
    thresholds: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One column's ``{subgroup: {...}, "_largest_gap": {...}}``. A subgroup holds ``images``, ``patients``,
    ``positives`` ({class: count}), ``auroc_<class>`` and ``auroc_macro`` with ``_ci95_low`` / ``_ci95_high`` (patient
    bootstrap within the subgroup), with ``thresholds`` (per class, NaN: none) ``sensitivity_<class>`` and
    ``specificity_<class>`` at them, and ``too_small`` ({class: counts}) for the classes left without a number."""
    truth, probs = np.asarray(truth), np.asarray(probs)
    patient_ids = np.asarray([str(p) for p in patients])
    names = np.asarray([column.group_of(v) for v in values], dtype=object)
    kinds = ("auroc", "operating_point") if thresholds is not None else ("auroc",)
    threshold = np.asarray(thresholds, dtype=np.float64) if thresholds is not None else 0.5
    out: dict[str, Any] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}
    for name in column.order(list(names)):
        rows = np.flatnonzero(names == name)
        masked, too_small = _masked_truth(truth[rows], spec)
        values_ci = metrics_with_intervals(
            kinds,
            masked,
            probs[rows],
            spec,
            threshold=threshold,
            groups=list(patient_ids[rows]),
            n_resamples=n_resamples,
            seed=seed,
        )
        entry: dict[str, Any] = {
            "images": len(rows),
            "patients": len(set(patient_ids[rows])),
            "positives": {c: int(n) for c, n in zip(spec.names, (truth[rows] > 0).sum(axis=0), strict=True)},
        }
        entry.update({key: value for key, value in values_ci.items() if _wanted(key)})
        if too_small:
            entry["too_small"] = too_small
        out[name] = entry
        scored[name] = (masked, probs[rows], patient_members(patient_ids[rows]))
    out[GAP_KEY] = largest_gaps(out, scored, spec, n_resamples=n_resamples, seed=seed)
    return out


def largest_gaps(
    entries: Mapping[str, Mapping[str, Any]],
    scored: Mapping[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]],
    spec: LabelSpec,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """For macro and each class's AUROC scored in two or more subgroups: the best and worst subgroup, their difference
    and its percentile CI from a bootstrap that resamples patients within each of the two independently (each pair's
    draws from ``seed``, as ``bootstrap.py``). ``scored``: per subgroup its masked truth, probabilities and patients'
    rows."""
    metrics = ["auroc_macro", *(f"auroc_{name}" for name in spec.names)]
    pairs: dict[str, tuple[str, str]] = {}
    for metric in metrics:
        found = {name: entry[metric] for name, entry in entries.items() if metric in entry}
        if len(found) >= 2:
            pairs[metric] = (max(found, key=found.__getitem__), min(found, key=found.__getitem__))
    differences: dict[tuple[str, str], dict[str, list[float]]] = {}
    for pair in dict.fromkeys(pairs.values()):
        (truth_a, probs_a, members_a), (truth_b, probs_b, members_b) = scored[pair[0]], scored[pair[1]]
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {}
        for rows_a, rows_b in zip(
            patient_resamples(members_a, n_resamples, rng), patient_resamples(members_b, n_resamples, rng), strict=True
        ):
            a = metric_values("auroc", truth_a[rows_a], probs_a[rows_a], spec)
            b = metric_values("auroc", truth_b[rows_b], probs_b[rows_b], spec)
            for key in a.keys() & b.keys():  # defined in both resamples
                samples.setdefault(key, []).append(a[key] - b[key])
        differences[pair] = samples
    out: dict[str, dict[str, Any]] = {}
    for metric, (best, worst) in pairs.items():
        interval = percentile_interval(differences[(best, worst)].get(metric, []), n_resamples, confidence)
        out[metric] = {
            "groups": [best, worst],
            "gap": float(entries[best][metric] - entries[worst][metric]),
            "ci95_low": interval[0] if interval else None,
            "ci95_high": interval[1] if interval else None,
        }
    return out


def _cell(entry: Mapping[str, Any], key: str, with_ci: bool) -> str:
    return value_with_ci(entry, key) if with_ci else number_text(entry.get(key))


def format_gap(metric: str, gap: Mapping[str, Any]) -> str:
    """``auroc_macro: F - M = 0.052 (95% CI -0.081 to 0.190)``."""
    ci = f" (95% CI {gap['ci95_low']:.3f} to {gap['ci95_high']:.3f})" if gap.get("ci95_low") is not None else ""
    return f"{metric}: {gap['groups'][0]} - {gap['groups'][1]} = {gap['gap']:.3f}{ci}"


def format_subgroups(subgroups: Mapping[str, Mapping[str, Any]], spec: LabelSpec) -> str:
    """Per column a compact table: per subgroup images, patients, macro AUROC with its CI and each class's AUROC
    ("too few" where it has fewer than ``MIN_EACH`` positives or negatives); then the largest gap in macro AUROC."""
    lines = []
    for column, groups in subgroups.items():
        lines.append(f"subgroups by {column} (95% CIs from a patient-level bootstrap within each subgroup):")
        width = max([5, *(len(name) for name in groups if name != GAP_KEY)])
        header = f"{'value':<{width}} {'images':>6} {'patients':>8}  {'macro AUROC':<22}"
        lines.append(header + " ".join(f"{name[:12]:<12}" for name in spec.names).rstrip())
        for name, entry in groups.items():
            if name == GAP_KEY:
                continue
            too_small = entry.get("too_small") or {}
            cells = ["too few" if c in too_small else _cell(entry, f"auroc_{c}", with_ci=False) for c in spec.names]
            lines.append(
                f"{name:<{width}} {entry['images']:>6} {entry['patients']:>8}  "
                f"{_cell(entry, 'auroc_macro', with_ci=True):<22}" + " ".join(f"{c:<12}" for c in cells).rstrip()
            )
        gap = groups.get(GAP_KEY, {}).get("auroc_macro")
        lines.append(
            "largest gap, " + format_gap("auroc_macro", gap)
            if gap
            else "largest gap: none (fewer than two subgroups scored)"
        )
    return "\n".join(lines)
