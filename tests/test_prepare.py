"""hf-medvis prepare: shards, manifest, quarantine, resumability, privacy, bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from hf_medvis.cli import main as cli_main
from hf_medvis.data.decode import read_image
from hf_medvis.data.location_lock import location_lock
from hf_medvis.data.prepare import DUPLICATE_ROW, prepare
from hf_medvis.data.prepare_rows import resize_to_square
from hf_medvis.data.quarantine import locate_quarantined, read_quarantine
from hf_medvis.data.shard_format import iter_shard_rows, stored_pixels

SALT = "test-salt-not-secret"


@pytest.fixture(scope="module")
def prepared(phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(str(phantom_dir), str(out), size=48, shard_size=16, salt=SALT)
    return out


def all_rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for s in manifest["shards"] for row in iter_shard_rows((out / s["path"]).read_bytes())]


def test_manifest_counts_checksums_and_pixels(prepared, phantom_dir):
    import hashlib

    manifest = json.loads((prepared / "manifest.json").read_text())
    n_inputs = len(list((phantom_dir / "images").glob("*.png"))) + len(list((phantom_dir / "dicom").glob("*.dcm")))
    t = manifest["totals"]
    # Each phantom is there twice (dicom/X.dcm, images/X.png) for one labels row: one sample, written once, from the
    # file listed first; the other copy is quarantined with its reason.
    assert t["inputs_seen"] == n_inputs == t["written"] + t["quarantined"] and t["written"] == n_inputs // 2
    assert {q["reason"] for q in read_quarantine(str(prepared))} == {DUPLICATE_ROW}
    assert len({row["key"] for row in all_rows(prepared)}) == t["written"]  # keys unique
    assert sum(s["samples"] for s in manifest["shards"]) == t["written"]
    for shard in manifest["shards"]:
        assert hashlib.sha256((prepared / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    rows = all_rows(prepared)
    row = next(r for r in rows if r["key"] == "00000003_000" and r["orig_height"] == 64)
    assert row["height"] == row["width"] == 48
    expected = np.round(resize_to_square(read_image(phantom_dir / "images" / "00000003_000.png"), 48) * 255)
    got = stored_pixels(row)
    # The stored PGM is what any image library reads: PIL gives the same pixels as our header-skipping reader.
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), got)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 3  # PNG or DICOM source of the same image


def test_groups_are_salted_patient_hashes(prepared, phantom_dir, tmp_path):
    rows = all_rows(prepared)
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["key"].split("_")[0], set()).add(r["group"])
    assert all(len(groups) == 1 for groups in by_patient.values())  # one patient -> one group
    assert len({g for gs in by_patient.values() for g in gs}) == len(by_patient)
    other = tmp_path / "other"
    prepare(str(phantom_dir / "images"), str(other), size=32, shard_size=100, salt="another-salt")
    assert not {r["group"] for r in all_rows(other)} & {r["group"] for r in rows}
    assert {r["finding_labels"] for r in rows} >= {"No Finding"} and {r["view_position"] for r in rows} <= {"PA", "AP"}


def test_one_patient_hash_for_shards_and_raw_folders(prepared, phantom_dir):
    """Shards (the operator's salt) and raw folders (no salt: grouping in the process) hash a patient id one way."""
    import hashlib

    from hf_medvis.data.folder import build_folder_records

    def expected(patient: str, salt: str) -> str:
        return hashlib.sha256(f"patient\x00{salt}\x00{patient}".encode()).hexdigest()[:20]

    with open(phantom_dir / "labels.csv", newline="") as handle:
        patients = {row["Image Index"]: row["Patient ID"] for row in csv.DictReader(handle)}
    for row in all_rows(prepared):
        assert row["group"] == expected(patients[row["key"] + ".png"], SALT)
    records = build_folder_records(str(phantom_dir / "images"))
    for path, group in zip(records["path"], records["group"], strict=True):
        assert group == expected(patients[Path(path).name], "")


def test_no_identifying_dicom_data_anywhere(prepared, phantom_dir):
    import pydicom

    secrets = set()
    for dcm in (phantom_dir / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        secrets |= {
            str(ds.PatientName),
            ds.PatientID,
            ds.PatientBirthDate,
            ds.StudyDate,
            ds.AccessionNumber,
            ds.InstitutionName,
        }
    blobs = [p.read_bytes() for p in prepared.rglob("*") if p.is_file()]
    for secret in secrets:
        for blob in blobs:
            assert secret.encode() not in blob, secret
    assert SALT.encode() not in b"".join(blobs)


def test_rerun_resumes_and_is_idempotent(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")}
    (out / "shards" / "shard-000001.parquet").unlink()
    (out / "shards" / "shard-000001.json").unlink()
    (out / "shards" / "shard-000002.parquet").write_bytes(b"half a shard")  # a leftover without its record
    (out / "shards" / "shard-000002.json").unlink()
    manifest = prepare(_src(prepared), str(out), size=48, shard_size=16, salt=SALT)
    assert manifest["totals"]["shards_resumed"] == manifest["totals"]["shards"] - 2
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")} == before
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    original = json.loads((prepared / "manifest.json").read_text())
    assert manifest["shards"] == original["shards"]


def _src(prepared: Path) -> str:
    return _src.source  # set by the fixture below


@pytest.fixture(autouse=True)
def _remember_source(phantom_dir):
    _src.source = str(phantom_dir)


def test_workers_give_identical_shards(phantom_dir, prepared, tmp_path, monkeypatch):
    """Two workers share each shard (slices of 5 inputs, reassembled in order), started after this process has used
    torch's threads (a forked pool could deadlock here): the same bytes as one process."""
    import hf_medvis.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "SLICE_SIZE", 5)
    manifest = prepare(str(phantom_dir), str(tmp_path / "w2"), size=48, shard_size=16, salt=SALT, workers=2)
    assert manifest["shards"] == json.loads((prepared / "manifest.json").read_text())["shards"]


@pytest.mark.parametrize("shape", [(1024, 1024), (700, 1023), (1023, 700), (37, 53), (20, 300)])
@pytest.mark.parametrize("size", [256, 33])
def test_resize_is_torchvision_resize_and_centre_crop_bit_for_bit(shape, size):
    from torchvision.transforms.v2 import functional as F

    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = F.center_crop(F.resize(torch.from_numpy(image)[None], size, antialias=True), [size, size])[0]
    np.testing.assert_array_equal(resize_to_square(image, size), expected.clamp(0, 1).numpy())


def test_16_bit_shards(phantom_dir, tmp_path):
    prepare(str(phantom_dir / "dicom"), str(tmp_path / "b16"), size=32, bits=16, shard_size=100, salt=SALT)
    row = all_rows(tmp_path / "b16")[0]
    pixels = stored_pixels(row)
    assert (
        row["bits"] == 16 and pixels.shape == (32, 32) and pixels.dtype.itemsize == 2 and len(np.unique(pixels)) > 256
    )
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), pixels)


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_are_quarantined_and_counts_add_up(tmp_path, capsys):
    import os

    src = tmp_path / "raw"
    src.mkdir()
    good = _png((np.arange(40 * 40) % 200).astype(np.uint8).reshape(40, 40))
    nan_tiff = io.BytesIO()
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(nan_tiff, format="TIFF")
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    files = {
        "good1.png": good,
        "good2.dcm": good,  # wrong extension, valid PNG content
        "empty.png": b"",
        "trunc.png": good[:50],
        "text.png": b"not an image at all\n" * 5,
        "nopix.dcm": Path(get_testdata_file("rtplan.dcm")).read_bytes(),
        "mr.dcm": Path(get_testdata_file("MR_small.dcm")).read_bytes(),
        "unlisted.png": good,
        "IM0001": ct,  # DICOM files often have no extension ...
        "1.2.840.113619.2.55.3.604688119.969": ct,  # ... or a UID for a name
        "DOE^JOHN_MRN1234567_19610412.dcm": ct,  # a name that identifies the patient
        "nan.tif": nan_tiff.getvalue(),
        "notes.txt": b"scanner export notes\n",  # not an image: skipped, counted
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "dangling.png").symlink_to(tmp_path / "moved-away.png")
    with open(os.path.join(os.fsencode(src), b"caf\xe9.png"), "wb") as f:  # a file name that is not UTF-8
        f.write(good)
    names = [n for n in files if n not in ("unlisted.png", "notes.txt")] + ["dangling.png", "ghost.png"]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "Image Index,Finding Labels,Patient ID,Mystery Column\n"
        + "".join(f"{n},No Finding,{i},x\n" for i, n in enumerate(names))
    )
    out = tmp_path / "out"
    code = cli_main(
        ["prepare", str(src), str(out), "--size", "32", "--labels", str(labels), "--salt", SALT, "--workers", "2"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["files_seen"] == len(files) + 2 == t["written"] + t["quarantined"] + t["skipped"]
    assert t["skipped"] == 1 and list(manifest["skipped"].values()) == [1]
    assert t["written"] == 6 and t["labels_rows_without_image"] == 1
    quarantine = read_quarantine(str(out))
    assert [q["image_index"] for q in quarantine if "image_index" in q] == ["ghost.png"]
    # Nothing under DST names a source file; the operator maps the hashes back with the salt and the source.
    blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for secret in (
        b"DOE^JOHN",
        b"MRN1234567",
        b"19610412",
        b"dangling",
        b"nan.tif",
        # the non-UTF-8 name in any spelling it could leak as (raw, escaped, replaced, re-encoded); not a bare b"caf",
        # which compressed image bytes contain by chance
        b"caf\xe9",
        b"caf\\udce9",
        b"caf\\u00e9",
        b"caf\xc3\xa9",
        b"caf\xef\xbf\xbd",
        b"trunc.png",
        b"notes.txt",
    ):
        assert secret not in blobs, secret
    located = {}
    for path, reason in locate_quarantined(str(src), str(out), salt=SALT):
        located[os.fsencode(path).rsplit(b"/", 1)[-1].decode(errors="replace")] = reason
    assert located.keys() == {
        "empty.png",
        "trunc.png",
        "text.png",
        "nopix.dcm",
        "unlisted.png",
        "dangling.png",
        "nan.tif",
        "caf\ufffd.png",
        "notes.txt",
    }
    assert "empty" in located["empty.png"] and "no pixel data" in located["nopix.dcm"]
    assert "labels file" in located["unlisted.png"] and "caf\ufffd.png" in located  # no row: not UTF-8 in the CSV
    assert located["dangling.png"] == "broken symbolic link (its target does not exist)"
    assert "non-finite pixel values" in located["nan.tif"] and located["notes.txt"].startswith("not an image")
    assert any("Mystery Column" in w for w in manifest["warnings"]) and any(
        "View Position" in w for w in manifest["warnings"]
    )
    assert "quarantined 8" in printed and "skipped 1 files" in printed and f"hf-medvis quarantine {out}" in printed
    assert cli_main(["quarantine", str(out), "--src", str(src), "--salt", "not-the-salt"]) == 2
    assert "not the one" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_die_with_the_prepare_that_started_them(tmp_path):
    """SIGKILL of `hf-medvis prepare --workers 2` (an evicted node, an OOM kill) takes its workers with it."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    src = tmp_path / "raw"
    src.mkdir()
    image = _png((np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256))
    for i in range(3000):
        (src / f"{i:05d}.png").write_bytes(image)
    cmd = [
        str(Path(sys.executable).parent / "hf-medvis"),
        "prepare",
        str(src),
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--shard-size",
        "50",
        "--salt",
        SALT,
    ]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(job.pid)
    deadline = time.time() + 60
    while len(parent.children()) < 2:
        assert job.poll() is None and time.time() < deadline, "prepare ended before its workers started"
        time.sleep(0.05)
    workers = parent.children()
    time.sleep(0.5)  # mid-shard
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    # A zombie has exited: it only waits for init to reap it (slow under load where PID 1 is not a real init).
    alive = [p for p in alive if _running(p)]
    assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    assert not (tmp_path / "out" / "manifest.json").exists()  # an interrupted prepare never looks finished
    with location_lock(str(tmp_path / "out")):  # the kernel released the killed run's writer lock: nothing waits on it
        pass


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_bad_labels_file_and_missing_salt_are_clear_errors(tmp_path, phantom_dir, monkeypatch, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Filename,Finding Labels\nx.png,No Finding\n")
    assert (
        cli_main(["prepare", str(phantom_dir / "images"), str(tmp_path / "o"), "--labels", str(bad), "--salt", "s"])
        == 2
    )
    assert "no column 'Image Index'" in capsys.readouterr().err
    monkeypatch.delenv("HF_MEDVIS_SALT", raising=False)
    assert cli_main(["prepare", str(phantom_dir / "images"), str(tmp_path / "o2")]) == 2
    assert "HF_MEDVIS_SALT" in capsys.readouterr().err
    monkeypatch.setenv("HF_MEDVIS_SALT", "from-env")
    assert cli_main(["prepare", str(phantom_dir / "images"), str(tmp_path / "o3"), "--size", "32"]) == 0


def test_windows_on_non_ct_images_is_refused_before_any_work(phantom_dir, tmp_path, capsys):
    mr = tmp_path / "mr"
    mr.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), mr / "a.dcm")
    for src, found in ((phantom_dir / "images", "PNG"), (mr, "1 DICOM MR")):
        out = tmp_path / f"out-{src.name}"
        assert cli_main(["prepare", str(src), str(out), "--windows", "lung", "--salt", SALT]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--windows needs CT DICOM images" in err and found in err, err
        assert not out.exists()


def test_nothing_prepared_from_a_non_empty_source_exits_non_zero_with_the_reasons(tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)  # a PNG signature, then nothing of a PNG
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"y" * 80)
    (src / "c.png").write_bytes(b"")
    out = tmp_path / "out"
    assert cli_main(["prepare", str(src), str(out), "--salt", SALT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 3 images" in err
    assert "2 x truncated or corrupt image; 1 x empty file (0 bytes)" in err, err
    assert f"hf-medvis quarantine {out} --src {src}" in err
    # The report is there for that command, naming each file by its hash and reason.
    assert cli_main(["quarantine", str(out), "--src", str(src), "--salt", SALT]) == 0
    assert sorted(line.rsplit("/", 1)[-1] for line in capsys.readouterr().out.splitlines()) == [
        "a.png",
        "b.png",
        "c.png",
    ]


def test_decoder_libraries_stay_quiet_about_files_that_are_quarantined(tmp_path, caplog, capsys):
    """pydicom logs each failed decoder plugin at ERROR with a traceback, and each lenient fix at WARNING (plus a
    UserWarning); prepare quarantines the file with the reason, which says it once."""
    import logging
    import warnings

    from hf_medvis.data.quarantine import locate_quarantined

    bad = [
        "JPEG-lossy.dcm",  # libjpeg and Pillow both fail: two ERROR records with tracebacks
        "JPEG2000-embedded-sequence-delimiter.dcm",  # openjpeg fails, Pillow refuses a decompression bomb
        "MR_truncated.dcm",
        "badVR.dcm",
        "meta_missing_tsyntax.dcm",
        "rtplan.dcm",
    ]
    decoded = ["MR_small_padded.dcm", "SC_rgb_jpeg.dcm", "CT_small.dcm"]  # lenient fixes: warnings, not failures
    src = tmp_path / "dicom"
    src.mkdir()
    for name in bad + decoded:
        shutil.copy(get_testdata_file(name), src / name)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert cli_main(["prepare", str(src), str(tmp_path / "out"), "--size", "32", "--salt", SALT]) == 0
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [(r.name, r.getMessage()[:80]) for r in noisy]
    assert not [w for w in warned if "pydicom" in w.filename], [str(w.message)[:80] for w in warned]
    assert "Traceback" not in capsys.readouterr().err
    located = {
        Path(path).name: reason for path, reason in locate_quarantined(str(src), str(tmp_path / "out"), salt=SALT)
    }
    assert sorted(located) == sorted(bad) and all(located.values())
    assert "JPEG" in located["JPEG-lossy.dcm"] and "pixel data" in located["MR_truncated.dcm"]
