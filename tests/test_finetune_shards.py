"""The fine-tuning recipe on prepared shards: labels from the shards, patient split, locally and over Azurite (az://)."""

import csv
import json
from pathlib import Path

import pytest
from conftest import load_recipe

from hf_medvis.data.prepare import prepare

SALT = "x"
RUN = (
    "--max_steps 3 --per_device_train_batch_size 8 --eval_strategy no --load_best_model_at_end false "
    "--ci_bootstrap_samples 20 --save_strategy no --logging_steps 1"
).split()


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("finetune_vit")


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft_shards") / "shards"
    prepare(
        str(phantom_dir / "images"), str(out), size=64, shard_size=10, salt=SALT, labels=str(phantom_dir / "labels.csv")
    )
    return out


def test_finetune_from_local_shards_splits_by_patient(recipe, shards, tmp_path):
    out = tmp_path / "out"
    metrics = recipe.main(
        [
            "--train_data",
            str(shards),
            "--output_dir",
            str(out),
            "--pos_weight",
            "true",
            "--validation_split_percentage",
            "30",
            *RUN,
        ]
    )
    assert metrics["global_step"] == 3
    saved = json.loads((out / "all_results.json").read_text())
    assert "eval_auroc_macro" in saved and "eval_auroc_macro_ci95_low" in saved
    report = json.loads((out / "split_report.json").read_text())
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert train["patients"] > 0 and val["patients"] > 0 and train["images"] + val["images"] == 49
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(out)
    assert list(model.config.id2label.values()) == ["Cardiomegaly", "Effusion", "Nodule"]


def test_shard_data_is_patient_disjoint_and_labels_file_restricts(shards, phantom_dir, tmp_path):
    from hf_medvis.data import ClassificationDataArguments, build_datasets

    # A labels file listing a subset of patients (as `hf-medvis split` writes) selects their samples only.
    with open(phantom_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = sorted({r["Patient ID"] for r in rows})
    train_rows = [r for r in rows if r["Patient ID"] in set(patients[:10])]
    val_rows = [r for r in rows if r["Patient ID"] not in set(patients[:10])]
    for name, part in (("train.csv", train_rows), ("val.csv", val_rows)):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    args = ClassificationDataArguments(
        train_data=str(shards),
        labels_file=str(tmp_path / "train.csv"),
        validation_data=str(shards),
        validation_labels_file=str(tmp_path / "val.csv"),
    )
    data = build_datasets(args, "classification", image_size=32)
    assert len(data.train) == len(train_rows) and len(data.eval) == len(val_rows)
    train_keys = set(data.train.with_format(None)["key"])
    assert train_keys == {Path(r["Image Index"]).stem for r in train_rows}
    example = data.train[0]
    assert tuple(example["pixel_values"].shape) == (1, 32, 32) and len(example["labels"]) == 3

    # Without labels files the same shards for training and validation share every patient: refused.
    same = ClassificationDataArguments(train_data=str(shards), validation_data=str(shards))
    with pytest.raises(Exception, match="patient"):
        build_datasets(same, "classification", image_size=32)


def test_shards_without_labels_are_a_clear_error(recipe, phantom_dir, tmp_path):
    import shutil

    raw = shutil.copytree(phantom_dir / "images", tmp_path / "raw" / "images")  # no labels.csv beside or above
    unlabelled = tmp_path / "unlabelled"
    prepare(str(raw), str(unlabelled), size=64, shard_size=50, salt=SALT)
    with pytest.raises(SystemExit, match="--train_data holds prepared shards without labels"):
        recipe.main(["--train_data", str(unlabelled), "--output_dir", str(tmp_path / "o"), *RUN])


@pytest.mark.azurite
def test_finetune_from_azure_blob_shards(recipe, azurite, phantom_dir, tmp_path, monkeypatch):
    container = azurite.create_container("finetune")
    prepare(
        str(phantom_dir / "images"),
        f"{container}/train",
        size=64,
        shard_size=10,
        salt=SALT,
        labels=str(phantom_dir / "labels.csv"),
        dst_storage_options=azurite.storage_options,
    )
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    out = tmp_path / "out"
    metrics = recipe.main(["--train_data", f"{container}/train", "--output_dir", str(out), *RUN])
    assert metrics["global_step"] == 3 and "eval_auroc_macro" in metrics
    account_key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".txt"}:
            assert account_key not in path.read_text(errors="ignore"), path
