"""Inputs that used to end wrongly or unhelpfully (issue 23): DICOM files named by their SOP Instance UID, names that
differ only in the extension, undecodable files in a raw training folder, and setup mistakes whose message must say
what to do."""

import csv
import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
from conftest import load_recipe, write_csv

# ---- keys that survive real file names -------------------------------------------------------------------------------

UID_ROOT = "1.2.826.0.1.3680043.8.498.4223"  # a UID prefix; the files differ in the last component only, as a series


def _uid_named_dicoms(folder):
    """pydicom's CT_small three times with consecutive SOP Instance UIDs (two named ``UID.dcm``, one ``UID`` with no
    extension) and MR_small named by its own UID without an extension. Returns {file name: (uid, patient)}."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    files = {}
    for last, extension in ((41, ".dcm"), (42, ".dcm"), (43, "")):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.{last}"
        ds.save_as(folder / f"{ds.SOPInstanceUID}{extension}")
        files[f"{ds.SOPInstanceUID}{extension}"] = (ds.SOPInstanceUID, "ct-patient")
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / mr.SOPInstanceUID)
    files[mr.SOPInstanceUID] = (mr.SOPInstanceUID, "mr-patient")
    return files


NIH_COLUMNS = ("Image Index", "Patient ID", "Finding Labels")


def test_dicoms_named_by_their_uid_keep_one_key_each_through_prepare_and_raw_folders(tmp_path):
    """A labels CSV naming the files by UID, with ``.dcm`` where the file has none and without it where the file has
    it: every file is matched to its own row and gets the whole UID as its key (with_suffix("") cut the last
    component: 0 of 3 written, their rows "without an image")."""
    import pyarrow.parquet as pq

    from hf_medvis.data.folder import build_folder_records
    from hf_medvis.data.prepare import prepare

    files = _uid_named_dicoms(tmp_path / "src")
    findings = ["Nodule", "No Finding", "Effusion", "Nodule|Effusion"]
    rows = []
    for (name, (uid, patient)), finding in zip(sorted(files.items()), findings, strict=True):
        listed = uid if name.endswith(".dcm") else f"{uid}.dcm"  # the other spelling than the file's own
        rows.append([listed, patient, finding])
    labels = write_csv(tmp_path / "labels.csv", NIH_COLUMNS, rows)
    uids = sorted(uid for uid, _ in files.values())
    expected = {uid: finding for (_, (uid, _)), finding in zip(sorted(files.items()), findings, strict=True)}

    manifest = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=32, labels=str(labels), salt="s")
    assert manifest["totals"]["written"] == 4, manifest["totals"]
    assert manifest["totals"]["quarantined"] == manifest["totals"]["labels_rows_without_image"] == 0
    shard_rows = [row for shard in manifest["shards"] for row in pq.read_table(tmp_path / "out" / shard["path"])
                  .select(["key", "finding_labels"]).to_pylist()]  # fmt: skip
    assert sorted(row["key"] for row in shard_rows) == uids
    assert {row["key"]: row["finding_labels"] for row in shard_rows} == expected

    records = build_folder_records(tmp_path / "src", labels)
    assert sorted(records["key"]) == uids
    assert dict(zip(records["key"], records["finding_labels"], strict=True)) == expected


def test_names_that_differ_only_in_the_extension(tmp_path, phantom_dir):
    """Rows ``a.png`` and ``a.dcm`` would be one sample: refused in one line naming both. Two files matching one row
    are refused too (one would be a second copy of the sample). Without labels both files are kept, with distinct
    keys; a name with several dots loses only its image extension."""
    from hf_medvis.data.folder import DataSourceError, build_folder_records
    from hf_medvis.data.labels import LabelError, read_labels_table, sample_key

    assert sample_key("study.v2.final.PNG") == "study.v2.final" and sample_key(f"{UID_ROOT}.41") == f"{UID_ROOT}.41"
    table = write_csv(tmp_path / "both.csv", NIH_COLUMNS, [["a.png", "1", "Nodule"], ["a.dcm", "1", "Effusion"]])
    with pytest.raises(LabelError, match=r"'a.png' \(line 2\) and 'a.dcm' \(line 3\) differ only in the image ext"):
        read_labels_table(table)

    png = sorted((phantom_dir / "images").glob("*.png"))[0]
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(png, folder / "a.png")
    shutil.copy(phantom_dir / "dicom" / png.with_suffix(".dcm").name, folder / "a.dcm")
    shutil.copy(png, folder / "scan.2024.01.png")
    records = build_folder_records(folder)
    assert sorted(records["key"]) == ["a.dcm", "a.png", "scan.2024.01"]
    one_row = write_csv(
        tmp_path / "one.csv", NIH_COLUMNS, [["a.png", "1", "Nodule"], ["scan.2024.01.png", "2", "Effusion"]]
    )
    with pytest.raises(DataSourceError, match="'a.dcm' and 'a.png' both match the labels row 'a.png'"):
        build_folder_records(folder, one_row)


# ---- undecodable files in a raw training folder ----------------------------------------------------------------------


def _folder_with_bad_files(tmp_path, phantom_dir):
    """The phantom images and labels, plus a truncated PNG, a text file named .png, an empty .png (all three caught
    before training) and a PNG whose pixel data is corrupt between an intact start and end (met while training)."""
    folder = tmp_path / "raw"
    shutil.copytree(phantom_dir / "images", folder / "images")
    shutil.copy(phantom_dir / "labels.csv", folder / "labels.csv")
    rows = list(csv.reader((phantom_dir / "labels.csv").read_text().splitlines()))
    victims = [r[0] for r in rows[1:5]]
    data = (folder / "images" / victims[0]).read_bytes()
    (folder / "images" / victims[0]).write_bytes(data[: len(data) // 2])  # truncated: no IEND
    (folder / "images" / victims[1]).write_text("Image Index,Finding Labels\n")  # a CSV saved as .png
    (folder / "images" / victims[2]).write_bytes(b"")
    data = bytearray((folder / "images" / victims[3]).read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(64)  # zlib stream broken; signature and IEND intact
    (folder / "images" / victims[3]).write_bytes(bytes(data))
    return folder, victims


def test_raw_folder_checks_files_before_the_first_step(tmp_path, phantom_dir, caplog):
    """Both tasks read raw folders through one path: the three bad files are left out before any step, with one
    WARNING counting them by reason and each listed with its reason; the fourth, found while decoding, is replaced by
    the next image (labels included) with a WARNING naming it, and every row still decodes."""
    from hf_medvis.data import ClassificationDataArguments, MAEDataArguments, build_datasets
    from hf_medvis.data.folder import SKIPPED_IMAGES_NAME, write_skipped_images

    folder, victims = _folder_with_bad_files(tmp_path, phantom_dir)
    for task, args in (
        ("classification", ClassificationDataArguments(train_data=str(folder / "images"))),
        ("mae", MAEDataArguments(train_data=str(folder / "images"), validation_split_percentage=30)),  # a holdout
    ):
        caplog.clear()
        data = build_datasets(args, task, image_size=32)
        reasons = {entry["path"]: entry["reason"] for entry in data.skipped_images}
        assert sorted(reasons) == sorted(victims[:3]), task
        assert reasons[victims[0]].startswith("truncated or corrupt image")
        assert reasons[victims[1]].startswith("not an image")
        assert reasons[victims[2]] == "empty file (0 bytes)"
        assert data.info["skipped_images"] == 3
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
        assert len(warnings) == 1 and "3 of" in warnings[0] and "1 empty file (0 bytes)" in warnings[0], warnings
        paths = [p for ds in (data.train, data.eval) for p in ds.with_format(None)["path"]]
        assert not any(p.endswith(tuple(victims[:3])) for p in paths)
        caplog.clear()
        for dataset in (data.train, data.eval):
            for i in range(len(dataset)):
                row = dataset[i]
                assert row["pixel_values"].shape[-2:] == (32, 32) and not row["path"].endswith(victims[3])
        named = [r.getMessage() for r in caplog.records if victims[3] in r.getMessage()]
        assert len(named) == 1 and "another image of the set in its place" in named[0], named

    write_skipped_images(tmp_path / "run", data.skipped_images)
    lines = [json.loads(line) for line in (tmp_path / "run" / SKIPPED_IMAGES_NAME).read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(victims[:3])


@pytest.mark.azurite
def test_raw_folder_on_blob_storage_is_checked_the_same_way(tmp_path, phantom_dir, azurite):
    """The check reads a few bytes per blob (ranged reads, on a pool of threads): the same files are left out with the
    same reasons as on a local disk."""
    from hf_medvis.core import storage
    from hf_medvis.data.folder import build_folder_records

    folder, victims = _folder_with_bad_files(tmp_path, phantom_dir)
    container = azurite.create_container("rawcheck")
    fs, path = storage.filesystem(f"{container}/raw", azurite.storage_options)
    fs.put(str(folder / "images"), f"{path}/images", recursive=True)
    skipped = []
    records = build_folder_records(
        f"{container}/raw/images", folder / "labels.csv", azurite.storage_options, None, skipped
    )
    reasons = {entry["path"]: entry["reason"].split(":")[0] for entry in skipped}
    assert reasons == {victims[0]: "truncated or corrupt image", victims[1]: "not an image (unrecognised format)",
                       victims[2]: "empty file (0 bytes)"}  # fmt: skip
    assert len(records["path"]) == len(list((folder / "images").iterdir())) - 3


@pytest.mark.slow
def test_finetuning_on_a_raw_folder_with_bad_files_completes_and_lists_them(tmp_path, phantom_dir):
    """The recipe end to end: no traceback, the run completes, and OUTPUT_DIR/_skipped_images.jsonl lists the files
    left out before training with their reasons."""
    folder, victims = _folder_with_bad_files(tmp_path, phantom_dir)
    out = tmp_path / "run"
    log = io.StringIO()
    with redirect_stdout(log):
        metrics = load_recipe("finetune_vit").main(
            ["--train_data", str(folder / "images"), "--output_dir", str(out), "--image_size", "32", "--patch_size",
             "8", "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
             "--save_strategy", "no", "--ci_bootstrap_samples", "20", "--validation_split_percentage", "30"]
        )  # fmt: skip
    assert metrics["global_step"] == 2
    assert "Traceback" not in log.getvalue()
    lines = [json.loads(line) for line in (out / "_skipped_images.jsonl").read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(victims[:3])


# ---- messages that say what to do ------------------------------------------------------------------------------------


def _refused(recipe_name, out, argv):
    with pytest.raises(SystemExit) as info:
        load_recipe(recipe_name).main(["--output_dir", str(out), "--max_steps", "1", *argv])  # steps: should it train
    message = str(info.value)
    assert info.value.code != 0 and "\n" not in message and "Traceback" not in message, message
    assert not out.exists()
    return message


def test_a_train_data_that_does_not_exist_is_named(tmp_path):
    for recipe in ("finetune_vit", "pretrain_mae"):
        message = _refused(recipe, tmp_path / "out", ["--train_data", str(tmp_path / "no_such_folder")])
        assert f"--train_data does not exist: {tmp_path / 'no_such_folder'}" in message, message
        assert "labels.csv" not in message


def test_single_label_wide_labels_with_uncertain_cells_say_which_option_reads_them(tmp_path, phantom_dir):
    rows = list(csv.DictReader((phantom_dir / "labels.csv").read_text().splitlines()))
    classes = ["Cardiomegaly", "Effusion", "Lung Lesion"]
    wide = []
    for i, row in enumerate(rows):
        cells = ["0"] * 3
        cells[i % 3] = "1"
        if i % 5 == 0:
            cells[(i + 1) % 3] = "-1"  # uncertain
        wide.append([row["Image Index"], row["Patient ID"], *cells])
    labels = write_csv(tmp_path / "wide.csv", ("Image Index", "Patient ID", *classes), wide)
    argv = ["--train_data", str(phantom_dir / "images"), "--labels_file", str(labels), "--labels_format", "wide",
            "--problem_type", "single_label"]  # fmt: skip
    message = _refused("finetune_vit", tmp_path / "out", argv)
    uncertain = sum(1 for i in range(len(rows)) if i % 5 == 0)
    assert f"{uncertain} image(s) have uncertain (-1) or unknown cells" in message, message
    assert "--uncertain zeros or --uncertain ones" in message and "--problem_type multi_label" in message


def test_three_channel_data_with_a_one_channel_model_says_num_channels_3(tmp_path, phantom_dir):
    from hf_medvis.data.prepare import prepare

    prepare(str(phantom_dir / "images"), str(tmp_path / "rgb"), size=32, labels=str(phantom_dir / "labels.csv"),
            salt="s", channels=3)  # fmt: skip
    for recipe, extra in (("finetune_vit", ["--image_size", "32"]), ("pretrain_mae", [])):
        argv = ["--train_data", str(tmp_path / "rgb"), "--num_channels", "1", *extra]
        message = _refused(recipe, tmp_path / "out", argv)
        assert "3 channels" in message and "--num_channels 3" in message, message
        assert "--image_mean" not in message
