"""A prepared location holds exactly one dataset: re-preparing replaces the old set completely, another source's set is
refused unless --overwrite, a second writer is refused (flock locally, a blob lease on Azure), a killed run's temp files
and lock block nothing; a full or read-only destination is one line, and the re-run after a full disk equals a clean
run. `datasets.load_dataset` of the location always reads what the manifest says."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import mounted
from PIL import Image

from hf_medvis.cli import main as cli_main
from hf_medvis.data import location_lock as lock_module
from hf_medvis.data.location_lock import LOCK_NAME, LocationBusyError, location_lock
from hf_medvis.data.prepare import prepare
from hf_medvis.data.prepare_location import LocationInUseError
from hf_medvis.data.shard_format import iter_shard_rows

SALT = "test-salt-not-secret"


@pytest.fixture(scope="module")
def images(phantom_dir, tmp_path_factory) -> Path:
    """The phantom PNGs without their labels file (a source of its own)."""
    out = tmp_path_factory.mktemp("loc") / "images"
    out.mkdir()
    for png in sorted((phantom_dir / "images").glob("*.png"))[:24]:
        shutil.copy(png, out / png.name)
    return out


def manifest_keys(manifest: dict, read) -> list[str]:
    return sorted(r["key"] for s in manifest["shards"] for r in iter_shard_rows(read(s["path"]), columns=["key"]))


def local_set(out: Path) -> tuple[dict, list[str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, manifest_keys(manifest, lambda path: (out / path).read_bytes())


def assert_location_is_the_manifest(out: Path, tmp_path: Path) -> dict:
    """The Parquet files on disk are the manifest's, no temp file or lock is left, and `datasets` reads exactly the
    manifest's rows."""
    manifest, keys = local_set(out)
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == sorted(
        Path(s["path"]).name for s in manifest["shards"]
    )
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name == LOCK_NAME]
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / f"cache-{len(keys)}-{time.time()}"))
    assert len(ds) == manifest["totals"]["written"] and sorted(ds["key"]) == keys
    return manifest


def test_re_preparing_with_other_parameters_replaces_the_set(images, tmp_path):
    """Fewer, larger shards after many small ones: the old extra shards and a killed run's temp files are gone; the
    manifest is never beside shards it does not list."""
    out = tmp_path / "set"
    prepare(str(images), str(out), size=32, shard_size=4, salt=SALT)
    assert len(list((out / "shards").glob("*.parquet"))) == 6
    # What a run killed mid-write leaves: temp files of write_bytes_atomic.
    (out / "shards" / ".shard-000005.parquet.tmp-99999-deadbeef").write_bytes(b"half")
    (out / ".manifest.json.tmp-99999-0badf00d").write_bytes(b"{")
    manifest = prepare(str(images), str(out), size=32, shard_size=10, salt=SALT)
    assert manifest["totals"]["shards"] == 3 and manifest["totals"]["written"] == 24
    assert_location_is_the_manifest(out, tmp_path)
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == [f"shard-00000{i}.json" for i in range(3)]
    # Back to the first parameters: the same bytes as a clean run of them (nothing of the second run mixed in).
    again = prepare(str(images), str(out), size=32, shard_size=4, salt=SALT)
    clean = prepare(str(images), str(tmp_path / "clean"), size=32, shard_size=4, salt=SALT)
    assert again["shards"] == clean["shards"]
    assert_location_is_the_manifest(out, tmp_path)
    # The same source spelled another way (relative, trailing slash) is the same dataset: resumed, not refused.
    with contextlib.chdir(images.parent):
        same = prepare(f"{images.name}/", str(out), size=32, shard_size=4, salt=SALT)
    assert same["totals"]["shards_resumed"] == same["totals"]["shards"]


def test_another_source_or_salt_is_refused_unless_overwrite(images, phantom_dir, tmp_path, capsys):
    out = tmp_path / "set"
    prepare(str(images), str(out), size=32, shard_size=10, salt=SALT)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = str(phantom_dir / "dicom")
    base = ["prepare", other, str(out), "--size", "32", "--shard-size", "4"]
    assert cli_main([*base, "--salt", SALT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a dataset prepared from another source" in err and "--overwrite" in err
    assert cli_main(["prepare", str(images), str(out), "--size", "32", "--salt", "another-salt"]) == 2
    assert "prepared with another salt" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # refused: nothing touched
    assert cli_main([*base, "--salt", SALT, "--overwrite"]) == 0
    manifest = assert_location_is_the_manifest(out, tmp_path)
    assert manifest["totals"]["written"] == len(list((phantom_dir / "dicom").glob("*.dcm")))
    # Shards of unknown origin (no manifest, no record saying whose they are) are not adopted either.
    stray = tmp_path / "stray"
    (stray / "shards").mkdir(parents=True)
    shutil.copy(out / "shards" / "shard-000000.parquet", stray / "shards" / "shard-000000.parquet")
    with pytest.raises(LocationInUseError, match="shards of unknown origin"):
        prepare(str(images), str(stray), size=32, salt=SALT)


@pytest.mark.azurite
def test_az_location_with_another_dataset(images, phantom_dir, azurite, tmp_path, capsys, monkeypatch):
    """The issue's case: an az:// path holding another dataset's shards. Refused; with --overwrite the Parquet files
    there are exactly the manifest's (a Parquet reader over the folder sees the manifest's rows)."""
    from hf_medvis.core.storage import read_bytes
    from hf_medvis.data.dataset_card import load_prepared_dataset

    options = azurite.storage_options
    out = azurite.create_container("location") + "/set"
    prepare(str(phantom_dir / "images"), out, size=32, shard_size=5, salt=SALT, dst_storage_options=options)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    command = ["prepare", str(images), out, "--size", "32", "--shard-size", "10", "--salt", SALT]
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} holds a dataset prepared from another source" in err
    assert cli_main([*command, "--overwrite"]) == 0
    manifest = json.loads(read_bytes(f"{out}/manifest.json", options))
    keys = manifest_keys(manifest, lambda path: read_bytes(f"{out}/{path}", options))
    direct = datasets.load_dataset(
        "parquet",
        data_files=f"{out}/shards/*.parquet",
        storage_options=options,
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(direct) == manifest["totals"]["written"] == 24 and sorted(direct["key"]) == keys
    assert sorted(load_prepared_dataset(out, options)["key"]) == keys
    # Re-prepared with fewer shards: the extra ones go (the blob listing is the manifest's).
    prepare(str(images), out, size=32, shard_size=24, salt=SALT, dst_storage_options=options)
    fs = __import__("fsspec").filesystem("az", **options)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("location/set/shards", detail=False)] == [
        "shard-000000.json",
        "shard-000000.parquet",
    ]
    assert not fs.exists(f"location/set/{LOCK_NAME}")


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_writer_blocks_nothing(images, tmp_path, capsys):
    import sys

    out = tmp_path / "set"
    out.mkdir()
    # Another prepare holding the location (in this process: flock locks conflict between two opens of the file).
    with location_lock(str(out), purpose="hf-medvis prepare") as held:
        code = cli_main(["prepare", str(images), str(out), "--size", "48", "--salt", SALT])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"is being written by hf-medvis prepare run {held.info['run_id']}" in err and "wait for it" in err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the refused run wrote nothing
    # A writer killed while holding the lock: the kernel releases it, the next run goes ahead at once.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hf_medvis.data.location_lock import location_lock\n"
            f"with location_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LocationBusyError):
            prepare(str(images), str(out), size=32, salt=SALT)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    prepare(str(images), str(out), size=32, salt=SALT)
    assert_location_is_the_manifest(out, tmp_path)


@pytest.mark.azurite
@pytest.mark.slow
def test_blob_lease_is_renewed_and_a_dead_holders_lease_expires(images, azurite, monkeypatch):
    """On Blob storage the lock is a lease: a live holder renews it past its duration; a killed one stops renewing
    and the next run takes the location over once the lease has expired (15 s here, the shortest Azure allows)."""
    from azure.storage.blob import BlobClient

    options = azurite.storage_options
    container = azurite.create_container("leases")
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", 15)
    dead = BlobClient.from_connection_string(azurite.connection_string, "leases", f"dead/{LOCK_NAME}")
    dead.upload_blob(
        json.dumps(
            {"purpose": "hf-medvis prepare", "run_id": "killed1", "host": "gone", "pid": 1, "started": "then"}
        ).encode()
    )
    dead.acquire_lease(lease_duration=15)  # its holder was killed: nobody renews it
    with location_lock(f"{container}/live", options, "hf-medvis prepare") as live:
        with pytest.raises(LocationBusyError, match="run killed1 on host gone .* expires within 15 s"):
            prepare(str(images), f"{container}/dead", size=32, salt=SALT, dst_storage_options=options)
        time.sleep(17)  # past both leases' duration: the live one was renewed, the dead one expired
        with pytest.raises(LocationBusyError, match=f"run {live.info['run_id']}"):
            prepare(str(images), f"{container}/live", size=32, salt=SALT, dst_storage_options=options)
        manifest = prepare(str(images), f"{container}/dead", size=32, salt=SALT, dst_storage_options=options)
        assert manifest["totals"]["written"] == 24 and live.lost is None
    prepare(str(images), f"{container}/live", size=32, salt=SALT, dst_storage_options=options)


def noise_pngs(folder: Path, n: int = 40, side: int = 64) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_full_disk_is_one_line_and_the_rerun_equals_a_clean_run(tmp_path, capsys):
    src = noise_pngs(tmp_path / "noise")  # incompressible: 40 shards-worth of ~4 kB images
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=tmp_path / "small") as disk:
        out = disk / "out"
        command = ["prepare", str(src), str(out), "--size", "64", "--shard-size", "8", "--salt", SALT]
        assert cli_main([*command[:4], "32", *command[5:]]) == 0  # a smaller set first: its manifest must go
        capsys.readouterr()
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 120_000))  # room for about two of five shards
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"no space left on the device of {out}: writing shards/shard-" in err and "free" in err
        assert "re-run the same command" in err
        # Nothing half-written: no manifest, card or temp file; every shard there is complete, with its record.
        assert not (out / "manifest.json").exists() and not (out / "README.md").exists()
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name == LOCK_NAME]
        parquets = sorted((out / "shards").glob("*.parquet"))
        assert parquets and all(pq.read_metadata(p).num_rows == 8 for p in parquets)
        filler.unlink()
        assert cli_main(command) == 0
        resumed = json.loads((out / "manifest.json").read_text())
        clean = prepare(str(src), str(tmp_path / "clean"), size=64, shard_size=8, salt=SALT)
        completed = int(re.search(r"this run completed (\d+) shard", err).group(1))
        assert resumed["shards"] == clean["shards"] and resumed["totals"]["shards_resumed"] == completed >= 1
        assert_location_is_the_manifest(out, tmp_path)


def test_read_only_destination_is_one_line(images, tmp_path, capsys):
    (tmp_path / "ro-src").mkdir()
    with mounted("--bind", "-o", "ro", str(tmp_path / "ro-src"), target=tmp_path / "ro") as readonly:
        for out in (readonly, readonly / "new"):
            assert cli_main(["prepare", str(images), str(out), "--size", "32", "--salt", SALT]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{out} is on a read-only filesystem" in err, err


def test_the_source_identity_reveals_no_source_path(images, tmp_path):
    out = tmp_path / "set"
    prepare(str(images), str(out), size=32, salt=SALT)
    blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert str(images).encode() not in blobs and str(images.parent).encode() not in blobs
