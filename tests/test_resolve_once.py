"""Issue 25: each data source is resolved once per process. The data section of both recipes (arguments parsed as the
recipe parses them, then ``build_datasets``) on prepared shards reads each source's manifest.json once and parses
``--storage_options`` once; a manifest changed in the same process is read again."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import load_recipe

from hf_medvis.core import storage
from hf_medvis.data import ClassificationDataArguments, MAEDataArguments, build_datasets
from hf_medvis.data.prepare import prepare
from hf_medvis.data.shard_dataset import load_shard_table
from hf_medvis.data.shard_format import MANIFEST_NAME
from hf_medvis.data.streaming import find_manifest
from hf_medvis.models.arguments import ClassifierModelArguments, MAEModelArguments
from hf_medvis.training.args import FinetuningArguments, MonitoringArguments, PretrainingArguments, parse_recipe_args

# Non-empty options a local path accepts (fsspec's LocalFileSystem takes auto_mkdir).
OPTIONS = '{"auto_mkdir": false}'


class ReadSpy:
    """Counts what really happens in this process: opens of a manifest.json for reading (every local read, fsspec's
    included, ends in ``open``), per file, and JSON parses of the storage-options text."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, options_text: str) -> None:
        self.manifest_reads: Counter[str] = Counter()
        self.option_parses = 0
        real_open, real_loads = builtins.open, json.loads

        def counting_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and "r" in mode and Path(file).name == MANIFEST_NAME:
                self.manifest_reads[os.path.realpath(file)] += 1
            return handle

        def counting_loads(text, *args, **kwargs):
            if text == options_text:
                self.option_parses += 1
            return real_loads(text, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text opens through io.open
        monkeypatch.setattr(json, "loads", counting_loads)
        storage.forget_cached_reads()  # as in a new process: nothing read yet

    def reads_of(self, *locations: Path) -> dict[str, int]:
        return {loc.name: self.manifest_reads[os.path.realpath(loc / MANIFEST_NAME)] for loc in locations}


def manifest_of(location: Path) -> dict:
    return json.loads((location / MANIFEST_NAME).read_text())


def data_section(recipe_name: str, argv: list[str]):
    """Step 1 (arguments) and the data step of a recipe, as the recipe runs them."""
    recipe = load_recipe(recipe_name)
    if recipe_name == "pretrain_mae":
        types = (MAEModelArguments, MAEDataArguments, PretrainingArguments, MonitoringArguments)
    else:
        types = (ClassifierModelArguments, ClassificationDataArguments, FinetuningArguments, MonitoringArguments)
    _, data_args, training_args, _ = parse_recipe_args(types, argv, recipe.DEFAULT_CONFIG)
    if recipe_name == "pretrain_mae":
        return build_datasets(data_args, task="mae", image_size=32, seed=training_args.seed)
    return build_datasets(
        data_args, task="classification", image_size=32, seed=training_args.seed, label_names=training_args.classes
    )


@pytest.fixture(scope="module")
def val_shards(phantom_dir, tmp_path_factory) -> Path:
    """A second prepared location (10-sample shards) of the same phantoms: another source than ``labelled_shards``."""
    dst = tmp_path_factory.mktemp("val_shards") / "val"
    prepare(
        str(phantom_dir / "images"), str(dst), size=64, shard_size=10, salt="x", labels=str(phantom_dir / "labels.csv")
    )
    return dst


def test_mae_data_build_reads_each_manifest_once_and_parses_options_once(
    labelled_shards, val_shards, monkeypatch, tmp_path
):
    spy = ReadSpy(monkeypatch, OPTIONS)
    argv = ["--train_data", str(labelled_shards), "--validation_data", str(val_shards), "--storage_options", OPTIONS]
    data = data_section("pretrain_mae", [*argv, "--output_dir", str(tmp_path / "out")])
    counts = {"manifest reads": spy.reads_of(labelled_shards, val_shards), "option parses": spy.option_parses}
    assert counts == {"manifest reads": {"shards": 1, "val": 1}, "option parses": 1}, counts
    train, val = manifest_of(labelled_shards), manifest_of(val_shards)  # read independently, after the spy's count
    assert data.info["train_images"] == train["totals"]["written"] and data.info["train_shards"] == len(train["shards"])
    assert data.info["eval_images"] == val["totals"]["written"] and data.normalization == train.get("normalization")
    assert len(list(data.eval)) == val["totals"]["written"]  # the stream reads shards, never the manifest again
    assert spy.reads_of(labelled_shards, val_shards) == {"shards": 2, "val": 2}  # + the independent reads above


def test_finetune_data_build_reads_each_manifest_once_and_parses_options_once(
    labelled_shards, val_shards, phantom_dir, monkeypatch, tmp_path
):
    with open(phantom_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = sorted({r["Patient ID"] for r in rows})
    parts = {"train.csv": [r for r in rows if r["Patient ID"] in patients[:10]]}
    parts["val.csv"] = [r for r in rows if r["Patient ID"] not in patients[:10]]
    for name, part in parts.items():
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    spy = ReadSpy(monkeypatch, OPTIONS)
    argv = ["--train_data", str(labelled_shards), "--labels_file", str(tmp_path / "train.csv")]
    argv += ["--validation_data", str(val_shards), "--validation_labels_file", str(tmp_path / "val.csv")]
    argv += ["--storage_options", OPTIONS, "--output_dir", str(tmp_path / "out")]
    data = data_section("finetune_vit", argv)
    counts = {"manifest reads": spy.reads_of(labelled_shards, val_shards), "option parses": spy.option_parses}
    assert counts == {"manifest reads": {"shards": 1, "val": 1}, "option parses": 1}, counts
    assert len(data.train) == len(parts["train.csv"]) and len(data.eval) == len(parts["val.csv"])
    assert data.normalization == manifest_of(labelled_shards).get("normalization")


def test_a_manifest_changed_in_this_process_is_read_again(phantom_dir, monkeypatch, tmp_path):
    """Re-prepared with other parameters (the manifest replaced), then rewritten in place by another writer: each
    build sees the manifest as it is now, with one read each time."""
    location = tmp_path / "set"
    images = str(phantom_dir / "images")
    spy = ReadSpy(monkeypatch, OPTIONS)
    seen = []
    for shard_size in (5, 25):
        prepare(images, str(location), size=32, shard_size=shard_size, salt="x")
        before = spy.reads_of(location)["set"]
        data = build_datasets(MAEDataArguments(train_data=str(location), storage_options=OPTIONS), "mae", image_size=32)
        seen.append((data.info["train_shards"], spy.reads_of(location)["set"] - before))
    assert seen == [(10, 1), (2, 1)], seen
    manifest = manifest_of(location)
    manifest["normalization"] = {"mean": [0.25], "std": [0.125]}
    (location / MANIFEST_NAME).write_text(json.dumps(manifest))  # same file, new content
    data = build_datasets(MAEDataArguments(train_data=str(location), storage_options=OPTIONS), "mae", image_size=32)
    assert data.normalization == {"mean": [0.25], "std": [0.125]}


def test_a_resolved_location_is_carried_without_another_read(labelled_shards, monkeypatch):
    spy = ReadSpy(monkeypatch, OPTIONS)
    found = find_manifest(str(labelled_shards), OPTIONS)
    table = load_shard_table(str(labelled_shards), OPTIONS, shards=found)
    assert spy.reads_of(labelled_shards) == {"shards": 1}
    assert found.base == str(labelled_shards) and len(table) == manifest_of(labelled_shards)["totals"]["written"]
