"""load_image_dataset: shard streams (local and real Azure Blob via Azurite), raw-folder fallback, resume position."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from hf_medvis.core.tasks import MAE
from hf_medvis.data.prepare import prepare
from hf_medvis.data.streaming import ShardReadError, load_image_dataset, stream_control, worker_skip_counts
from hf_medvis.data.transforms import create_transform

SALT = "stream-test-salt"
T = create_transform(MAE, False, image_size=32)


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "shards"
    prepare(str(phantom_dir / "images"), str(out), size=40, shard_size=6, salt=SALT)
    return out


def keys_of(ds) -> list[str]:
    return [row["key"] for row in ds]


def loader_keys(ds, batch_size=4, num_workers=2, limit=None) -> list[list[str]]:
    batches = []
    for i, batch in enumerate(DataLoader(ds, batch_size=batch_size, num_workers=num_workers)):
        if limit is not None and i >= limit:
            break
        batches.append(list(batch["key"]))
    return batches


def test_stream_rows_epochs_and_workers(shards):
    ds = load_image_dataset(str(shards), image_transform=T, shuffle_buffer=8, seed=1)
    manifest = json.loads((shards / "manifest.json").read_text())
    n = manifest["totals"]["written"]
    row = next(iter(ds))
    assert row["pixel_values"].dtype == torch.uint8 and row["pixel_values"].shape == (1, 32, 32)
    assert set(row) >= {"pixel_values", "key", "group", "finding_labels"}
    epoch0 = keys_of(ds)
    assert len(epoch0) == len(set(epoch0)) == n
    ds.set_epoch(1)
    epoch1 = keys_of(ds)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # reshuffled, same samples
    batches = loader_keys(ds)
    flat = [k for b in batches for k in b]
    assert Counter(flat) == Counter(epoch0)  # two workers, each sample exactly once
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (4, 1, 32, 32)


def test_split_by_node_is_disjoint_and_complete(shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(keys_of(load_image_dataset(str(shards), image_transform=T)))
    assert not set(seen[0]) & set(seen[1]) and seen[0] and seen[1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert sorted(seen[0] + seen[1]) == sorted(keys_of(load_image_dataset(str(shards), image_transform=T)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_replays_exactly_the_rest_of_the_epoch(shards, num_workers):
    ds = load_image_dataset(str(shards), image_transform=T, shuffle_buffer=8, seed=5)
    ds.set_epoch(2)
    full = loader_keys(ds, batch_size=3, num_workers=num_workers)
    consumed = 5
    resumed = load_image_dataset(str(shards), image_transform=T, shuffle_buffer=8, seed=5)
    control = stream_control(resumed)
    control.skip = worker_skip_counts(control, epoch=2, batches=consumed, batch_size=3, num_workers=num_workers)
    control.epoch = control.skip_epoch = 2
    resumed.set_epoch(2)
    rest = loader_keys(resumed, batch_size=3, num_workers=num_workers)
    before = [k for b in full[:consumed] for k in b]
    after = [k for b in rest for k in b]
    # Every sample of the epoch exactly once across the resume. (With several workers the DataLoader restarts its
    # round-robin at worker 0, so the remaining batches may come in another order.)
    assert Counter(before + after) == Counter(k for b in full for k in b)
    assert Counter(after) == Counter(k for b in full[consumed:] for k in b)
    if num_workers == 0:
        assert rest == full[consumed:]
    control.epoch = 3  # the skip applies to the resumed epoch only
    resumed.set_epoch(3)
    assert len([k for b in loader_keys(resumed, batch_size=3, num_workers=num_workers) for k in b]) == len(
        [k for b in full for k in b]
    )


def test_raw_folder_fallback(phantom_dir):
    ds = load_image_dataset(str(phantom_dir / "images"), image_transform=T)
    import datasets

    assert isinstance(ds, datasets.Dataset) and len(ds) == len(list((phantom_dir / "images").glob("*.png")))
    row = ds[0]
    assert row["pixel_values"].dtype == torch.uint8 and row["pixel_values"].shape == (1, 32, 32)
    assert row["finding_labels"] and row["key"] == row["path"].rsplit("/", 1)[-1][:-4]


def test_unreadable_shard_errors_or_is_skipped(shards, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / manifest["shards"][1]["path"]).write_bytes(b"garbage")
    with pytest.raises(ShardReadError, match="checksum"):
        keys_of(load_image_dataset(str(broken), image_transform=T, shuffle=False))
    with caplog.at_level(logging.WARNING):
        got = keys_of(load_image_dataset(str(broken), image_transform=T, shuffle=False, skip_bad_shards=True))
    assert len(got) == manifest["totals"]["written"] - manifest["shards"][1]["samples"]
    assert "skipped (1 bad shards" in caplog.text


class _KeyModel(torch.nn.Module):
    """Records the keys it trains on; the loss is a real function of the pixels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def forward(self, pixel_values, key=None, **_):
        self.seen.extend(key)
        return {"loss": ((pixel_values.float().mean() / 255 - self.w) ** 2).sum()}


def _collate(rows):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]), "key": [r["key"] for r in rows]}


@pytest.mark.slow
def test_trainer_resume_continues_the_interrupted_epoch(shards, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_medvis.training.callbacks import StreamStateCallback

    n = json.loads((shards / "manifest.json").read_text())["totals"]["written"]
    bs, steps_per_epoch = 4, -(-n // 4)

    def run(max_steps, resume=None):
        ds = load_image_dataset(str(shards), image_transform=T, shuffle_buffer=8, seed=3)
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=bs,
            save_steps=steps_per_epoch + 2,
            dataloader_num_workers=2,
            remove_unused_columns=False,
            report_to=[],
            use_cpu=True,
            logging_steps=1000,
            save_only_model=False,
            learning_rate=1e-3,
            disable_tqdm=True,
        )
        model = _KeyModel()
        trainer = Trainer(
            model=model, args=args, train_dataset=ds, data_collator=_collate, callbacks=[StreamStateCallback(ds)]
        )
        trainer.train(resume_from_checkpoint=resume)
        return model.seen

    total = 2 * steps_per_epoch + 3
    straight = run(total)
    shutil.rmtree(tmp_path / "out")
    run(steps_per_epoch + 2)  # "interrupted" right after the checkpoint in epoch 1
    resumed = run(total, resume=str(tmp_path / "out" / f"checkpoint-{steps_per_epoch + 2}"))
    assert (tmp_path / "out" / f"checkpoint-{steps_per_epoch + 2}" / "stream_state.json").exists()
    assert len(resumed) > 0 and Counter(resumed) == Counter(straight[-len(resumed) :])


# ---- real Azure Blob Storage (Azurite) ----


@pytest.fixture(scope="module")
def az_shards(azurite, phantom_dir):
    """Raw PNGs uploaded to az://raw, prepared from there into az://prepared (credentials from storage_options)."""
    import fsspec

    raw, out = azurite.create_container("raw"), azurite.create_container("prepared")
    fs = fsspec.filesystem("az", **azurite.storage_options)
    fs.put(str(phantom_dir / "images"), "raw/images", recursive=True)
    fs.put(str(phantom_dir / "labels.csv"), "raw/labels.csv")
    manifest = prepare(
        f"{raw}/images",
        f"{out}/set",
        size=40,
        shard_size=5,
        salt=SALT,
        labels=str(phantom_dir / "labels.csv"),
        storage_options=azurite.storage_options,
        workers=2,
    )
    return f"{out}/set", manifest


@pytest.mark.azurite
def test_prepare_and_stream_over_azure_blob(az_shards, azurite, monkeypatch, caplog, shards):
    url, manifest = az_shards
    assert manifest["totals"]["quarantined"] == 0 and manifest["totals"]["written"] > 0
    with caplog.at_level(logging.DEBUG):
        ds = load_image_dataset(url, image_transform=T, storage_options=azurite.storage_options)
        batches = loader_keys(ds, batch_size=4, num_workers=2)
    assert sorted(k for b in batches for k in b) == sorted(keys_of(load_image_dataset(str(shards), image_transform=T)))
    # Credentials from the environment when no storage_options are given; never in logs.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    with caplog.at_level(logging.DEBUG):
        batch = next(iter(DataLoader(load_image_dataset(url, image_transform=T), batch_size=8)))
    assert batch["pixel_values"].shape == (8, 1, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert "AccountKey" not in caplog.text and "Eby8vdM02" not in caplog.text
    raw = load_image_dataset("az://raw/images", image_transform=T, storage_options=azurite.storage_options)
    assert raw[0]["pixel_values"].shape == (1, 32, 32)  # raw folder on blob storage, bytes read through adlfs


@pytest.mark.azurite
def test_stream_survives_azurite_restart(az_shards, azurite):
    url, manifest = az_shards
    ds = load_image_dataset(url, image_transform=T, storage_options=azurite.storage_options, shuffle=False)
    it = iter(ds)
    got = [next(it)["key"]]  # the first shard is in memory; the next one is read after the outage starts
    azurite.stop()
    restarter = threading.Timer(2.0, azurite.start)
    restarter.start()
    started = time.monotonic()
    try:
        got += [row["key"] for row in it]
    finally:
        restarter.join()
    assert time.monotonic() - started >= 1.5  # the reads really waited for the service
    assert len(got) == len(set(got)) == manifest["totals"]["written"]
