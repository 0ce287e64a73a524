"""Label maps: a dataset's finding names -> a model's class names, applied to canonical ``Finding Labels`` texts
(external validation: ``hf-medvis evaluate --label-map``), and the shipped map of the public chest X-ray datasets
(``public_names.json``).

A map is a YAML or JSON mapping ``{dataset name: model class}``; names are compared case-insensitively, surrounding
spaces aside; a null (or empty) target ignores the finding. Several names may map to one class, a name to one class.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .findings import SEPARATOR, LabelError
from .layouts import NO_FINDING, UNKNOWN_PREFIX, finding_key

PUBLIC = "public"  # `--label-map public`: the shipped map
# The shipped map and its sources (datasets, reasons, notes): read-only.
PUBLIC_FINDING_NAMES: dict[str, Any] = json.loads(
    resources.files(__package__).joinpath("public_names.json").read_text(encoding="utf-8")
)
CANONICAL_FINDINGS: tuple[str, ...] = tuple(PUBLIC_FINDING_NAMES["canonical"])

LabelMap = dict[str, str | None]  # lower-cased, stripped name -> class (None: ignored)


def default_label_map() -> LabelMap:
    """The public datasets' finding names -> the canonical classes (``public_names.json``'s ``map``), keys lower case."""
    return {finding_key(key): value for key, value in PUBLIC_FINDING_NAMES["map"].items()}


class _Pairs(list):
    """A mapping as read: its (key, value) pairs in order, so that a key written twice is seen, not overwritten."""


class _PairsLoader(yaml.SafeLoader):
    """YAML's safe loader, with mappings read as ``_Pairs``."""


def _pairs(loader: _PairsLoader, node: yaml.MappingNode) -> _Pairs:
    loader.flatten_mapping(node)
    return _Pairs((loader.construct_object(k, deep=True), loader.construct_object(v, deep=True)) for k, v in node.value)


_PairsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _pairs)


def read_label_map(path: str | os.PathLike) -> LabelMap:
    """A YAML or JSON label map (``.json``: JSON; anything else: YAML, of which JSON is a subset) -> ``{lower-cased
    name: class or None}``. A file shaped like ``public_names.json`` (the map under a ``map`` key) is read too.
    ``LabelError``, one line naming the file and the entry, for a file that is not a mapping of names to one class
    name (or null), and for two spellings of one name that map to different classes."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise LabelError(f"label map not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LabelError(f"label map {name} is not UTF-8 text") from None
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(text, object_pairs_hook=_Pairs)
        else:
            document = yaml.load(text, Loader=_PairsLoader)  # a SafeLoader: no arbitrary objects
    except (ValueError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        raise LabelError(f"label map {name} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                         f"{detail}") from None  # fmt: skip
    if not isinstance(document, _Pairs):
        raise LabelError(f"label map {name}: expected a mapping of finding names to class names, got "
                         f"{_describe(document)}")  # fmt: skip
    pairs: list[tuple[Any, Any]] = document
    inner = next((v for k, v in pairs if k == "map"), None)
    if isinstance(inner, _Pairs):  # public_names.json's shape: the map under "map", documentation beside it
        pairs = inner
    return parse_label_map(pairs, f"label map {name}")


def parse_label_map(pairs: Iterable[tuple[Any, Any]], where: str) -> LabelMap:
    """``(finding name, class or None)`` pairs, as a file or a data-mix entry gives them, -> a label map; ``where``
    begins the one-line ``LabelError`` for a bad entry ("label map NAME")."""
    label_map: LabelMap = {}
    spelling: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not key.strip():
            raise LabelError(f"{where}: the key {key!r} is not a finding name (write names as text, quoted "
                             "where YAML would read a number, a yes/no or null)")  # fmt: skip
        target = _target_of(value, key, where)
        norm = finding_key(key)
        if norm in label_map and label_map[norm] != target and spelling[norm] == key:
            raise LabelError(f"{where}: '{key}' is listed twice, -> {label_map[norm] or 'null'} and -> "
                             f"{target or 'null'}")  # fmt: skip
        if norm in label_map and label_map[norm] != target:
            raise LabelError(f"{where}: '{spelling[norm]}' -> {label_map[norm] or 'null'} and '{key}' -> "
                             f"{target or 'null'} name one finding (names are compared case-insensitively) with "
                             "different classes")  # fmt: skip
        label_map[norm] = target
        spelling.setdefault(norm, key)
    return label_map


def load_label_map(value: str) -> LabelMap:
    """``--label-map``: the literal ``public`` (the shipped map), else a file for ``read_label_map``."""
    return default_label_map() if value == PUBLIC else read_label_map(value)


def _target_of(value: Any, key: str, where: str) -> str | None:
    """A map's value -> its class, or None (ignored: null, empty text, empty list); ``LabelError`` for the rest."""
    if value is None or (type(value) is list and not value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    raise LabelError(f"{where}: '{key}' maps to {_describe(value)}; a name maps to one class name (text), "
                     "or to null to ignore it")  # fmt: skip


def _describe(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "a mapping"
    if value is None:
        return "nothing (an empty file or value)"
    if isinstance(value, list):
        return f"a list ({', '.join(map(str, value[:3]))}{', ...' if len(value) > 3 else ''})"
    return f"{type(value).__name__} {value!r}"


def map_class_name(name: str, label_map: Mapping[str, str | None], classes: Collection[str]) -> str | None:
    """The model class a dataset's finding name counts for: its target in ``label_map`` if that is one of ``classes``;
    a name the map does not list counts for itself if it is one of ``classes``; None otherwise (ignored)."""
    norm = finding_key(name)
    if norm in label_map:
        target = label_map[norm]
        return target if target in classes else None
    name = name.strip()
    return name if name in classes else None


def map_finding_labels(
    text: str | None,
    label_map: Mapping[str, str | None],
    classes: Collection[str],
    ignored: Counter | None = None,
) -> str | None:
    """One canonical ``Finding Labels`` text with its names renamed through ``label_map`` onto ``classes``
    (``map_class_name``): each positive and each ``?unknown`` is renamed or, when it counts for no class, dropped (and
    counted in ``ignored`` under its name as written); a positive wins over an unknown of the same class. ``No Finding``
    and an empty text (unlabelled) stay as they are; a labelled text left with nothing reads ``No Finding``: the image
    was labelled, its findings are just none of the classes."""
    if text is None or not text.strip():
        return text
    positives: dict[str, None] = {}  # ordered sets
    unknown: dict[str, None] = {}
    for part in text.split(SEPARATOR):
        part = part.strip()
        if not part or part == NO_FINDING:
            continue
        is_unknown = part.startswith(UNKNOWN_PREFIX)
        name = part[len(UNKNOWN_PREFIX) :] if is_unknown else part
        target = map_class_name(name, label_map, classes)
        if target is None:
            if ignored is not None:
                ignored[name.strip()] += 1
        else:
            (unknown if is_unknown else positives)[target] = None
    parts = [*positives, *(UNKNOWN_PREFIX + name for name in unknown if name not in positives)]
    return SEPARATOR.join(parts) or NO_FINDING


def mapped_classes(names: Iterable[str], label_map: Mapping[str, str | None], classes: Collection[str]) -> set[str]:
    """The classes that a labels file with finding names ``names`` labels, through ``label_map``."""
    return {target for name in names if (target := map_class_name(name, label_map, classes)) is not None}
