"""Hugging Face datasets as fine-tuning inputs (issue 13, item 2): a save_to_disk folder with multi-label ClassLabels
and a patient column, and an imagefolder with metadata.csv (single-label text labels), read by the recipe with
transformers' --image_column_name / --label_column_name."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import load_recipe

from hf_medvis.data.hf_inputs import hf_dataset_kind, load_hf_table

TINY = (
    "--model_preset tiny --image_size 32 --patch_size 8 --max_steps 4 --per_device_train_batch_size 8 --eval_steps 2 "
    "--save_steps 2 --validation_split_percentage 30 --ci_bootstrap_samples 20 --eval_subsample 8"
)


def _phantom_rows(phantom_dir: Path) -> list[dict]:
    with open(phantom_dir / "labels.csv") as f:
        return list(csv.DictReader(f))


def test_save_to_disk_multilabel_with_patients(phantom_dir, tmp_path):
    rows = _phantom_rows(phantom_dir)
    names = ["Cardiomegaly", "Effusion", "Nodule"]
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(phantom_dir / "images" / r["Image Index"]) for r in rows],
            "findings": [[names.index(n) for n in r["Finding Labels"].split("|") if n in names] for r in rows],
            "patient": [r["Patient ID"] for r in rows],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "findings": datasets.List(datasets.ClassLabel(names=names)),
                "patient": datasets.Value("string"),
            }
        ),
    )
    folder = tmp_path / "cxr"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
    assert hf_dataset_kind(str(folder)) == "disk" and hf_dataset_kind("someone/cxr-dataset") == "hub"
    table, records, image_col = load_hf_table(str(folder), label_column="findings", group_column="patient")
    assert records["finding_labels"] == [r["Finding Labels"] for r in rows]  # "No Finding" for an empty list
    assert records["group"] == [r["Patient ID"] for r in rows]

    out = tmp_path / "vit"
    args = f"--train_data {folder} --label_column_name findings --group_column_name patient --output_dir {out} {TINY}"
    with redirect_stdout(io.StringIO()):
        metrics = load_recipe("finetune_vit").main(args.split())
    config = json.loads((out / "config.json").read_text())
    assert list(config["id2label"].values()) == names and config["problem_type"] == "multi_label_classification"
    assert "eval_auroc_macro" in metrics
    report = json.loads((out / "split_report.json").read_text())
    assert report["splits"]["train"]["patients"] + report["splits"]["val"]["patients"] == len(
        {r["Patient ID"] for r in rows}
    )


def test_imagefolder_with_metadata_single_label(tmp_path):
    from hf_medvis.data.phantoms_pathology import write_pathology_phantoms

    tiles = write_pathology_phantoms(tmp_path / "tiles", patients=10, image_size=32)
    with open(tiles / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tiles / "images" / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "tissue"])
        writer.writerows([r["Image Index"], "tumor" if r["Finding Labels"] == "Tumor" else "normal"] for r in rows)
    folder = str(tiles / "images")
    assert hf_dataset_kind(folder) == "imagefolder"
    out = tmp_path / "vit"
    args = f"--train_data {folder} --label_column_name tissue --problem_type auto --output_dir {out} {TINY}"
    log = io.StringIO()
    with redirect_stdout(log):  # the recipe logs to stdout
        metrics = load_recipe("finetune_vit").main(args.split())
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["normal", "tumor"]
    assert config["problem_type"] == "single_label_classification" and np.isfinite(metrics["eval_accuracy"])
    assert "every image counts as its own patient" in log.getvalue()  # no patient column: said, not hidden
    with pytest.raises(ValueError, match="no label column 'diagnosis'"):
        load_hf_table(folder, label_column="diagnosis")
