"""A data mix: several datasets in one run, ``--train_data mix.yaml`` (both recipes).

```yaml
labels: [Cardiomegaly, Effusion, Nodule]     # the model's classes, in order
sources:
  - name: nih                                # names the source in metrics, logs and the card
    data: images/                            # paths relative to this file; fsspec URLs as they are
    labels_file: nih.csv
  - name: padchest
    data: padchest/images
    labels_file: padchest.csv
    labels_format: list                      # any labels flag, spelled with underscores
    image_col: ImageID
    group_col: PatientID
    label_col: Labels
    negative_label: normal
    label_map: {"pleural effusion": Effusion}   # else the shipped map of the public datasets' names
    weight: 2.0                              # each of its training images drawn twice as often (default 1)
```

Each source is read with its own layout into the canonical records (``folder.build_folder_records``), its finding
names mapped onto the mix's labels (``labels.label_map``); a class the source does not label is unknown for its images
(``?Name``: masked out of the loss and the metrics, as an uncertain CheXpert label is). Patient ids are namespaced by
source, and each source is split by patient on its own, so every source is in the validation set in its share.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .folder import build_folder_records, find_labels_file
from .hf_inputs import hf_dataset_kind
from .labels import (
    MULTI_LABEL,
    UNKNOWN_PREFIX,
    LabelError,
    LabelSpec,
    encode_labels,
    is_labelled,
    label_array,
    parse_finding_labels,
    parse_unknown_labels,
    read_labels_table,
)
from .labels.label_map import (
    LabelMap,
    default_label_map,
    load_label_map,
    map_finding_labels,
    mapped_classes,
    parse_label_map,
)
from .labels.layouts import LabelsFormat
from .privacy import in_holdout, patient_group
from .provenance import data_origin, describe_origin
from .splits import split_report, stratified_group_assignment
from .streaming import find_manifest
from .train_eval import ResolvedSource

logger = logging.getLogger(__name__)

MIX_SUFFIXES = (".yaml", ".yml")
SOURCE_COLUMN = "source"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # used in metric keys: eval_<name>_auroc_macro
# A source's labels flags, spelled as in the recipes (the older column spellings too) -> LabelsFormat's fields.
_FORMAT_KEYS = {
    "labels_format": "layout",
    "image_column_name": "image_col",
    "image_col": "image_col",
    "group_column_name": "group_col",
    "group_col": "group_col",
    "label_column_name": "label_col",
    "label_col": "label_col",
    **{f.name: f.name for f in fields(LabelsFormat) if f.name not in ("layout", "image_col", "group_col", "label_col")},
}
_SOURCE_KEYS = ("name", "data", "labels_file", "label_map", "weight", *_FORMAT_KEYS)


@dataclass(frozen=True)
class MixSource:
    name: str
    data: str
    labels_file: str | None
    labels_format: LabelsFormat
    label_map: LabelMap  # the source's finding names -> the mix's labels
    explicit_map: bool  # the mix file gave the map (its targets are what the source labels)
    weight: float = 1.0


@dataclass(frozen=True)
class DataMix:
    path: str
    labels: tuple[str, ...]
    sources: tuple[MixSource, ...]

    @property
    def spec(self) -> LabelSpec:
        """Multi-label always: a class one source does not label is masked for its images."""
        return LabelSpec(self.labels, MULTI_LABEL)


def is_data_mix(location: str | os.PathLike | None) -> bool:
    return location is not None and str(location).lower().endswith(MIX_SUFFIXES)


def _relative_to(base: Path, value: str) -> str:
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    return str(base / value)


def read_data_mix(path: str | os.PathLike) -> DataMix:
    """The mix file, checked: ``LabelError`` (one line naming the file, the source and the key) for anything that
    does not fit."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"data mix not found: {path}")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LabelError(f"data mix {path.name} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(document, dict) or set(document) - {"labels", "sources"}:
        raise LabelError(f"data mix {path.name}: expected the keys labels and sources (docs/data_plane.md)")
    labels = document.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise LabelError(f"data mix {path.name}: 'labels' must list the model's classes, e.g. [Effusion, Nodule]")
    labels = [label.strip() for label in labels]
    if len(set(labels)) != len(labels):
        raise LabelError(f"data mix {path.name}: 'labels' lists a class twice: {', '.join(labels)}")
    entries = document.get("sources")
    if not isinstance(entries, list) or not entries:
        raise LabelError(f"data mix {path.name}: 'sources' must list at least one source")
    sources = [_read_source(entry, i, path, labels) for i, entry in enumerate(entries)]
    names = Counter(source.name for source in sources)
    if max(names.values()) > 1:
        raise LabelError(
            f"data mix {path.name}: source names must differ: {', '.join(n for n, c in names.items() if c > 1)}"
        )
    return DataMix(str(path), tuple(labels), tuple(sources))


def _read_source(entry: Any, index: int, path: Path, labels: list[str]) -> MixSource:
    where = f"data mix {path.name}, source {index + 1}"
    if not isinstance(entry, dict):
        raise LabelError(f"{where}: expected a mapping with name and data")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise LabelError(f"{where}: 'name' must be letters, digits, '_' or '-' (it names the source's metrics)")
    where = f"data mix {path.name}, source '{name}'"
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
        raise LabelError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_SOURCE_KEYS)})")
    if not isinstance(entry.get("data"), str):
        raise LabelError(f"{where}: 'data' must name the images (a folder, glob or fsspec URL)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise LabelError(f"{where}: 'weight' must be a number > 0, got {weight!r}")
    options: dict[str, Any] = {}
    for key, field_name in _FORMAT_KEYS.items():
        if key in entry:
            value = entry[key]
            options[field_name] = tuple(value) if field_name == "label_names" else value
    try:
        labels_format = LabelsFormat(**options)
    except (TypeError, ValueError) as err:
        raise LabelError(f"{where}: {err}") from None
    raw_map = entry.get("label_map")
    if raw_map is None:
        label_map, explicit = default_label_map(), False
    elif isinstance(raw_map, dict):
        label_map, explicit = parse_label_map(raw_map.items(), f"label map of {where}"), True
    elif isinstance(raw_map, str):
        value = raw_map if raw_map == "public" else _relative_to(path.parent, raw_map)
        label_map, explicit = load_label_map(value), raw_map != "public"
    else:
        raise LabelError(f"{where}: 'label_map' must be a mapping, a file or 'public'")
    strays = sorted({t for t in label_map.values() if t is not None and t not in labels} if explicit else set())
    if strays:
        raise LabelError(
            f"{where}: label_map maps onto {', '.join(strays)}, not among the mix's labels ({', '.join(labels)})"
        )
    labels_file = entry.get("labels_file")
    return MixSource(
        name=name,
        data=_relative_to(path.parent, entry["data"]),
        labels_file=_relative_to(path.parent, labels_file) if labels_file else None,
        labels_format=labels_format,
        label_map=label_map,
        explicit_map=explicit,
        weight=float(weight),
    )


def _source_records(
    source: MixSource, records: dict[str, list[Any]], classes: tuple[str, ...], columns: list[str]
) -> tuple[dict[str, list[Any]], list[str]]:
    """The labelled records of one source with their texts on the mix's labels; the classes it does not label are
    unknown (``?Name``) for each of its images. ``columns``: a wide file's class columns (labelled on every image,
    positive or not). Returns the records and the classes the source does not label."""
    texts = records["finding_labels"]
    keep = [i for i, text in enumerate(texts) if is_labelled(text)]
    names = {n for i in keep for n in parse_finding_labels(texts[i]) + parse_unknown_labels(texts[i])} | set(columns)
    ignored: Counter = Counter()
    mapped = [map_finding_labels(texts[i], source.label_map, classes, ignored) for i in keep]
    provided = mapped_classes(names, source.label_map, classes)
    if source.explicit_map:  # the map says which classes the source grades, present in this subset or not
        provided |= {target for target in source.label_map.values() if target in classes}
    missing = [c for c in classes if c not in provided]
    suffix = "|".join(UNKNOWN_PREFIX + c for c in missing)
    texts_out = [(text if not suffix else f"{text}|{suffix}" if text != "No Finding" else suffix) for text in mapped]
    if ignored:
        logger.info("mix source '%s': findings that are none of the labels, ignored: %s", source.name,
                    ", ".join(f"{n} ({c})" for n, c in ignored.most_common(8)))  # fmt: skip
    out = {k: [v[i] for i in keep] for k, v in records.items()}
    out["finding_labels"] = texts_out
    return out, missing


def refuse_run_level_inputs(validation_data: str | None, labels_file: str | None) -> None:
    """A mix names each source's labels and splits each source by patient: the run-level inputs it replaces are
    refused in one line."""
    if validation_data is not None:
        raise LabelError(
            "--validation_data with a data mix: each source is split by patient (--validation_split_percentage); "
            "score another dataset with `hf-medvis evaluate --label-map`"
        )
    if labels_file is not None:
        raise LabelError("--labels_file with a data mix: give each source its labels_file in the mix file")


def mix_records(
    mix: DataMix,
    storage_options: dict | None,
    skipped: list[dict[str, str]] | None = None,
    labelled: bool = True,
) -> tuple[list[dict[str, list[Any]]], dict[str, Any]]:
    """One records table per source (``path``, ``key``, ``group`` namespaced by source, ``finding_labels`` on the mix's
    labels, ``source``; with ``labelled``, only labelled images and ``labels`` encoded), and per source what it holds."""
    per_source, info = [], {}
    for source in mix.sources:
        if find_manifest(source.data, storage_options) or hf_dataset_kind(source.data):
            raise LabelError(
                f"mix source '{source.name}': {source.data} holds prepared shards or a Hugging Face dataset; a mix "
                "source is an image folder, glob or URL with its labels file (shards and datasets cannot be mixed yet)"
            )
        records = build_folder_records(source.data, source.labels_file, storage_options, source.labels_format, skipped)
        missing: list[str] = []
        if labelled:
            if not any(is_labelled(text) for text in records["finding_labels"]):
                raise LabelError(f"mix source '{source.name}': none of its images has a label (labels_file?)")
            labels_path = source.labels_file or find_labels_file(source.data)
            columns = read_labels_table(labels_path, labels_format=source.labels_format).classes if labels_path else []
            records, missing = _source_records(source, records, mix.labels, columns)
            records["labels"] = encode_labels(records["finding_labels"], mix.spec)
        records["group"] = [f"{source.name}/{group}" for group in records["group"]]
        records[SOURCE_COLUMN] = [source.name] * len(records["group"])
        per_source.append(records)
        info[source.name] = {"images": len(records["group"]), "patients": len(set(records["group"]))}
        if missing:
            info[source.name]["not_labelled"] = missing
        logger.info("mix source '%s': %d images of %d patients%s", source.name, info[source.name]["images"],
                    info[source.name]["patients"], f"; not labelled (masked): {', '.join(missing)}" if missing else "")  # fmt: skip
    return per_source, info


def split_mix(
    per_source: list[dict[str, list[Any]]], spec: LabelSpec | None, validation_fraction: float, seed: int
) -> tuple[list[dict[str, list[Any]]], list[dict[str, list[Any]]], dict[str, Any]]:
    """Each source split by patient on its own: stratified on its labels (classification, with a split report per
    source) or by the patient hash (``spec`` None: pretraining)."""
    trains, evals, reports = [], [], {}
    for records in per_source:
        if spec is None:
            held = np.array(
                [in_holdout(patient_group(g), validation_fraction * 100) for g in records["group"]], dtype=bool
            )
        else:
            matrix = label_array(records["finding_labels"], spec)
            fractions = [1 - validation_fraction, validation_fraction]
            assignment = stratified_group_assignment(records["group"], matrix, fractions, seed)
            held = assignment == 1
            name = records[SOURCE_COLUMN][0] if records[SOURCE_COLUMN] else "?"
            reports[name] = split_report(assignment, records["group"], matrix, spec, split_names=("train", "val"))
        trains.append({k: [v[i] for i in np.flatnonzero(~held)] for k, v in records.items()})
        evals.append({k: [v[i] for i in np.flatnonzero(held)] for k, v in records.items()})
    return trains, evals, reports


def weighted_concat(parts: list[dict[str, list[Any]]], weights: list[float], seed: int) -> dict[str, list[Any]]:
    """The sources' training records in one table, each source's images repeated by its weight: 2.0 twice, 0.5 a fixed
    half (drawn with ``seed``), so its share of every epoch follows the weight."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Any]] = {column: [] for column in parts[0]} if parts else {}
    for records, weight in zip(parts, weights, strict=True):
        n = len(records["group"])
        whole, fraction = int(weight), weight - int(weight)
        indices = [*range(n)] * whole + sorted(rng.choice(n, size=round(n * fraction), replace=False).tolist())
        for column, values in records.items():
            if column != "key":
                out[column].extend(values[i] for i in indices)
        copies: Counter = Counter()
        for i in indices:  # a repeat gets its own key, so its own augmentation draw (SeededAugmentation follows keys)
            out["key"].append(records["key"][i] if not copies[i] else f"{records['key'][i]}~{copies[i]}")
            copies[i] += 1
    return out


def assemble_mix(
    mix: DataMix,
    trains: list[dict[str, list[Any]]],
    evals: list[dict[str, list[Any]]] | None,
    sources: dict[str, dict[str, Any]],
    seed: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[dict[str, list[Any]], dict[str, list[Any]] | None, dict[str, Any]]:
    """The split sources as one training table (weighted) and one validation table (``None`` when empty), each cut to
    its ``max_*_samples``, and the run's data info: counts overall and, in ``sources``, per source."""
    for parts, side in ((trains, "train"), (evals or [], "eval")):
        for records, entry in zip(parts, sources.values(), strict=True):
            entry.update({f"{side}_images": len(records["group"]), f"{side}_patients": len(set(records["group"]))})
    train = _first(weighted_concat(trains, [source.weight for source in mix.sources], seed), max_train_samples)
    info: dict[str, Any] = {
        "train_images": len(train["group"]),
        "train_patients": len(set(train["group"])),
        "sources": sources,
    }
    evaluation = _first(concat(evals), max_eval_samples) if evals else None
    if evaluation is None or not evaluation["group"]:
        return train, None, info
    info.update(eval_images=len(evaluation["group"]), eval_patients=len(set(evaluation["group"])))
    return train, evaluation, info


def _first(records: dict[str, list[Any]], n: int | None) -> dict[str, list[Any]]:
    return records if n is None else {k: v[:n] for k, v in records.items()}


def resolve_mix_source(mix: DataMix, storage_options: dict | None) -> ResolvedSource:
    """The mix as the recipes' one source: its sources' names and origins (safe for cards and logs)."""
    origins = [data_origin(source.data, storage_options) for source in mix.sources]
    names = "; ".join(f"{s.name} ({describe_origin(o)})" for s, o in zip(mix.sources, origins, strict=True))
    return ResolvedSource(
        mix.path,
        None,
        f"data mix of {len(mix.sources)} sources: {names}",
        synthetic=all(bool(origin and origin.get("synthetic")) for origin in origins),
    )


def source_names(dataset: Any) -> list[str] | None:
    """Each image's source in a data mix's evaluation set (``None`` for any other dataset): per-source metrics."""
    if dataset is None or SOURCE_COLUMN not in (dataset.column_names or ()):
        return None
    return list(dataset.with_format(None)[SOURCE_COLUMN])


def concat(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    return weighted_concat(parts, [1.0] * len(parts), seed=0)
