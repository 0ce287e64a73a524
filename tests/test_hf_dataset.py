"""Prepared shards are a standard Hugging Face dataset: read back by `datasets` itself (folder, Parquet, az:// through
Azurite) and `huggingface_hub`'s DatasetCard, with decoded images and class-named labels equal to what was prepared."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard

from hf_medvis.data.dataset_card import load_prepared_dataset
from hf_medvis.data.labels import parse_finding_labels
from hf_medvis.data.prepare import prepare
from hf_medvis.data.shard_format import iter_shard_rows, stored_pixels

SALT = "test-salt-not-secret"


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hfds") / "shards"
    prepare(
        str(phantom_dir / "images"), str(out), size=32, shard_size=24, salt=SALT, labels=str(phantom_dir / "labels.csv")
    )
    return out


def our_rows(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {r["key"]: r for s in manifest["shards"] for r in iter_shard_rows((out / s["path"]).read_bytes())}


def check_dataset(ds: datasets.Dataset, out: Path, phantom_dir: Path) -> None:
    rows = our_rows(out)
    names = ds.features["labels"].feature.names
    with open(phantom_dir / "labels.csv") as f:
        truth = {r["Image Index"][: -len(".png")]: r["Finding Labels"] for r in csv.DictReader(f)}
    assert names == sorted({n for text in truth.values() for n in parse_finding_labels(text)}) != []
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == len(rows) == len(truth)
    for example in ds:
        key = example["key"]
        # Decoded by datasets (PIL), the image is exactly the stored pixels; labels name the labels file's findings.
        np.testing.assert_array_equal(np.asarray(example["image"]), stored_pixels(rows[key]))
        assert sorted(names[i] for i in example["labels"]) == sorted(parse_finding_labels(truth[key]))
        assert example["group"] == rows[key]["group"] and len(example["group"]) >= 16


def test_load_dataset_of_the_folder_reads_images_and_class_labels(shards, phantom_dir, tmp_path):
    ds = datasets.load_dataset(str(shards), split="train", cache_dir=str(tmp_path / "cache"))
    check_dataset(ds, shards, phantom_dir)
    # The card tells loaders which files are data; the manifest and quarantine report stay out of the way.
    card = DatasetCard.load(shards / "README.md")
    assert card.data.configs[0]["data_files"][0]["path"] == "shards/shard-*.parquet"
    assert "synthetic" in card.data.tags and "synthetic chest X-ray phantoms" in card.text
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["source"]["synthetic"] is True and manifest["preprocessing"]["class_names"] == list(
        ds.features["labels"].feature.names
    )


def test_parquet_builder_reads_the_features_from_the_shards(shards, phantom_dir):
    ds = datasets.load_dataset("parquet", data_files=str(shards / "shards" / "*.parquet"), split="train")
    check_dataset(ds, shards, phantom_dir)


def test_user_data_card_does_not_claim_synthetic(phantom_dir, tmp_path):
    images = tmp_path / "mine"
    images.mkdir()
    for png in sorted((phantom_dir / "images").glob("*.png"))[:3]:
        (images / png.name).write_bytes(png.read_bytes())
    prepare(str(images), str(tmp_path / "out"), size=32, salt=SALT)
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert "synthetic" not in card.data.tags and "user-provided images" in card.text
    ds = load_prepared_dataset(str(tmp_path / "out"))
    assert len(ds) == 3 and ds[0]["labels"] is None  # no labels file: unlabelled, not "no finding"


def test_re_prepared_folder_is_read_fresh(phantom_dir, tmp_path):
    """datasets caches a carded folder by its name and card: the card's sizes, and load_prepared_dataset's file-keyed
    Parquet loading, make a re-prepared folder read as what it now holds."""
    out = tmp_path / "shards"
    for size in (32, 40):
        prepare(str(phantom_dir / "images"), str(out), size=size, shard_size=64, salt=SALT)
        assert load_prepared_dataset(str(out))[0]["image"].size == (size, size)
        assert datasets.load_dataset(str(out), split="train")[0]["image"].size == (size, size)
        card = DatasetCard.load(out / "README.md")
        assert card.data.dataset_info["splits"][0]["num_examples"] == len(load_prepared_dataset(str(out)))


def test_az_shards_load_through_datasets(shards, phantom_dir, azurite):
    out = azurite.create_container("hfds") + "/shards"
    prepare(
        str(phantom_dir / "images"),
        out,
        size=32,
        shard_size=24,
        salt=SALT,
        labels=str(phantom_dir / "labels.csv"),
        storage_options=azurite.storage_options,
    )
    ds = load_prepared_dataset(out, azurite.storage_options)
    check_dataset(ds, shards, phantom_dir)  # same bytes as the local preparation
    direct = datasets.load_dataset(
        "parquet", data_files=f"{out}/shards/*.parquet", storage_options=azurite.storage_options, split="train"
    )
    assert direct.features == ds.features and len(direct) == len(ds)


@pytest.mark.slow
def test_push_to_hub_fails_fast_in_one_line_before_preparing(phantom_dir, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    out = tmp_path / "never"
    base = f"-m hf_medvis.cli prepare {phantom_dir / 'images'} {out} --size 32 --salt s --push-to-hub me/xrays"
    for token, expected in (
        ({"HF_TOKEN": "hf_not_a_real_token"}, "the Hugging Face Hub at http://127.0.0.1:9 is not usable"),
        ({"HF_TOKEN": "", "HF_HOME": str(tmp_path / "home")}, "needs a Hugging Face token"),
    ):
        result = subprocess.run(
            [sys.executable, *base.split()], capture_output=True, text=True, env=subprocess_env(**token)
        )
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "hf_not_a_real_token" not in result.stderr
        assert not out.exists()  # refused before any work


def test_hub_upload_is_the_dataset_not_the_resume_records(shards):
    from hf_medvis.data.hub_push import files_to_upload

    manifest = json.loads((shards / "manifest.json").read_text())
    files = files_to_upload(manifest)
    assert {"README.md", "manifest.json", "quarantine.jsonl"} <= set(files)
    assert sorted(f for f in files if f.startswith("shards/")) == sorted(
        str(p.relative_to(shards)) for p in shards.glob("shards/*.parquet")
    )
    assert all((shards / f).is_file() for f in files)


def test_format_version_1_shards_still_train(shards, tmp_path):
    """A location prepared before the datasets layout (raw little-endian ``pixels``, version 1) reads the same pixels."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_medvis.data.shard_dataset import load_shard_table, make_shard_transform
    from hf_medvis.data.shard_format import features_v1
    from hf_medvis.data.streaming import load_image_dataset

    rows = list(our_rows(shards).values())
    old = [
        {k: v for k, v in r.items() if k not in ("image", "labels")} | {"pixels": stored_pixels(r).tobytes()}
        for r in rows
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(old, schema=features_v1().arrow_schema), buf)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.parquet").write_bytes(buf.getvalue())
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest.update(
        version=1,
        shards=[
            {
                "path": "shards/shard-000000.parquet",
                "samples": len(old),
                "bytes": len(buf.getvalue()),
                "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
            }
        ],
    )
    manifest["totals"]["written"] = len(old)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    expected = {r["key"]: stored_pixels(r) for r in rows}
    streamed = {
        e["key"]: e["pixel_values"][0].numpy()
        for e in load_image_dataset(str(tmp_path), image_transform=None, shuffle=False)
    }
    table = load_shard_table(str(tmp_path)).with_transform(make_shard_transform(None))
    assert streamed.keys() == expected.keys() and len(table) == len(expected)
    for key, pixels in expected.items():
        np.testing.assert_array_equal(streamed[key], pixels)
    np.testing.assert_array_equal(table[0]["pixel_values"][0].numpy(), expected[table[0]["key"]])
