"""The pretraining recipe on prepared shards: local, and over real Azure Blob Storage (Azurite) with az:// URLs."""

import json

import pytest
from conftest import load_recipe

from hf_medvis.data.prepare import prepare

SALT = "test-salt-pretrain"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("pretrain_mae")


def _run(recipe, out, train, validation, extra=()):
    return recipe.main([
        "--train_data", train, "--validation_data", validation, "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2",
        "--num_reconstruction_images", "2", *extra,
    ])


def test_pretrain_from_local_shards(recipe, phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    prepare(str(phantom_dir / "images"), str(shards), size=72, shard_size=10, salt=SALT,
            labels=str(phantom_dir / "labels.csv"))
    metrics = _run(recipe, tmp_path / "out", str(shards), str(shards))
    assert metrics["global_step"] == 3 and "eval_loss" in metrics
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "stream_state.json").read_text())
    assert saved  # the stream position travels with the checkpoint
    assert (tmp_path / "out" / "reconstructions.png").is_file()


def test_shard_stream_needs_max_steps(recipe, phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    prepare(str(phantom_dir / "images"), str(shards), size=72, shard_size=50, salt=SALT)
    with pytest.raises(SystemExit, match="--max_steps must be set"):
        recipe.main(["--train_data", str(shards), "--output_dir", str(tmp_path / "o"), "--max_steps", "-1",
                     "--num_train_epochs", "1"])
    assert not (tmp_path / "o").exists()


@pytest.mark.azurite
def test_pretrain_from_azure_blob_shards(recipe, azurite, phantom_dir, tmp_path, monkeypatch):
    container = azurite.create_container("pretrain")
    prepare(str(phantom_dir / "images"), f"{container}/train", size=72, shard_size=10, salt=SALT,
            dst_storage_options=azurite.storage_options)
    # Credentials from the environment (the usual way on a cluster), never echoed into outputs.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    out = tmp_path / "out"
    metrics = _run(recipe, out, f"{container}/train", f"{container}/train")
    assert metrics["global_step"] == 3
    account_key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".txt"}:
            assert account_key not in path.read_text(errors="ignore"), path
