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
    return recipe.main(
        [
            "--train_data",
            train,
            "--validation_data",
            validation,
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "no",
            "--save_steps",
            "2",
            "--num_reconstruction_images",
            "2",
            *extra,
        ]
    )


def test_pretrain_from_local_shards(recipe, phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    prepare(
        str(phantom_dir / "images"),
        str(shards),
        size=72,
        shard_size=10,
        salt=SALT,
        labels=str(phantom_dir / "labels.csv"),
    )
    metrics = _run(recipe, tmp_path / "out", str(shards), str(shards))
    assert metrics["global_step"] == 3 and "eval_loss" in metrics
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "stream_state.json").read_text())
    assert saved  # the stream position travels with the checkpoint
    assert (tmp_path / "out" / "reconstructions.png").is_file()


def test_shard_stream_needs_max_steps(recipe, phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    prepare(str(phantom_dir / "images"), str(shards), size=72, shard_size=50, salt=SALT)
    with pytest.raises(SystemExit, match="--max_steps must be set"):
        recipe.main(
            [
                "--train_data",
                str(shards),
                "--output_dir",
                str(tmp_path / "o"),
                "--max_steps",
                "-1",
                "--num_train_epochs",
                "1",
            ]
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.azurite
def test_pretrain_from_azure_blob_shards(recipe, azurite, phantom_dir, tmp_path, monkeypatch):
    container = azurite.create_container("pretrain")
    prepare(
        str(phantom_dir / "images"),
        f"{container}/train",
        size=72,
        shard_size=10,
        salt=SALT,
        dst_storage_options=azurite.storage_options,
    )
    # Credentials from the environment (the usual way on a cluster), never echoed into outputs.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    out = tmp_path / "out"
    metrics = _run(recipe, out, f"{container}/train", f"{container}/train")
    assert metrics["global_step"] == 3
    account_key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".txt"}:
            assert account_key not in path.read_text(errors="ignore"), path


@pytest.mark.azurite
def test_refused_credentials_and_bad_container_names_are_one_line(
    recipe, azurite, phantom_dir, tmp_path, monkeypatch, capsys
):
    """A wrong account key, a key cut short when copied, a container name Azure refuses: one line naming the location and
    what to check, no SDK page, no secret; nothing written."""
    from hf_medvis.cli import main as cli_main

    container = azurite.create_container("refused")
    prepare(
        str(phantom_dir / "images"),
        f"{container}/train",
        size=32,
        shard_size=50,
        salt=SALT,
        dst_storage_options=azurite.storage_options,
    )
    good_key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    wrong_key = "A" * 8 + good_key[8:]  # valid base64, another key
    cases = [
        (
            azurite.connection_string.replace(good_key, wrong_key),
            f"{container}/train",
            "access denied by Azure Storage (AuthorizationFailure)",
        ),
        (
            azurite.connection_string.replace(good_key, good_key[:-3]),
            f"{container}/train",
            "the storage account key is not valid base64",
        ),
        (azurite.connection_string, "az://ab/train", "'ab' is not a valid Azure container name"),
    ]
    for connection_string, location, expected in cases:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string)
        with pytest.raises(SystemExit) as info:
            _run(recipe, tmp_path / "out", location, location)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
        assert good_key not in message and wrong_key not in message
        assert cli_main(["prepare", str(phantom_dir / "images"), f"{location}-copy", "--salt", SALT]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
