"""The public datasets' label layouts, read by the one labels reader: PadChest's list text, VinDr-CXR's one row per box
per reader, RSNA's one row per box, Google's YES/NO adjudications; split keeps every row of an image together and
writes the file's own rows; a file read with the wrong layout ends in one line naming the flag."""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_csv
from transformers import HfArgumentParser

from hf_medvis.cli import main as cli_main
from hf_medvis.data.arguments import ClassificationDataArguments
from hf_medvis.data.labels import LabelError, read_labels_table
from hf_medvis.data.labels.layouts import LabelsFormat

PADCHEST_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientSex_DICOM", "Projection", "Labels")
PADCHEST = LabelsFormat(
    layout="list", image_col="ImageID", group_col="PatientID", label_col="Labels", negative_label="normal"
)
VINDR_COLUMNS = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
VINDR_CLASSES = ("Aortic enlargement", "Cardiomegaly", "Pleural effusion", "Nodule/Mass")


def findings_of(table) -> dict[str, set[str]]:
    """Image -> its positive findings (``None`` when unlabelled), from the canonical text."""
    return {
        row["Image Index"]: None
        if not row["Finding Labels"]
        else set(row["Finding Labels"].split("|")) - {"No Finding"}
        for row in table.rows
    }


def read_rows(path: Path) -> list[tuple[str, ...]]:
    with open(path, newline="") as handle:
        return [tuple(row) for row in csv.reader(handle)][1:]


def test_padchest_list_text_with_stray_spaces_empty_rows_and_a_negative(tmp_path):
    rows = [
        ("1.png", "0", "20100101", "p1", "F", "PA", "['pleural effusion', 'nodule']"),
        ("2.png", "0", "20100101", "p1", "F", "L", "[' nodule', 'Pleural Effusion ']"),  # spaces, another case
        ("3.png", "1", "20110101", "p2", "M", "PA", "['normal']"),
        ("4.png", "1", "20110101", "p3", "M", "PA", ""),  # ~100 such rows in PadChest: unlabelled, not negative
        ("5.png", "1", "20110101", "p4", "M", "AP", '["cardiomegaly", "normal"]'),  # JSON spelling
        ("6.png", "1", "20110101", "p5", "F", "PA", "['pleural  effusion']"),  # two inner spaces
    ]
    path = write_csv(tmp_path / "padchest.csv", PADCHEST_COLUMNS, rows)
    table = read_labels_table(path, labels_format=PADCHEST)
    assert table.layout == "list"
    assert findings_of(table) == {
        "1.png": {"pleural effusion", "nodule"},
        "2.png": {"nodule", "pleural effusion"},  # one spelling per finding: the file's first
        "3.png": set(),
        "4.png": None,
        "5.png": {"cardiomegaly"},
        "6.png": {"pleural effusion"},
    }
    assert [row["Patient ID"] for row in table.rows] == ["p1", "p1", "p2", "p3", "p4", "p5"]
    auto = read_labels_table(path, labels_format=LabelsFormat(**{**PADCHEST.__dict__, "layout": "auto"}))
    assert auto.layout == "list" and findings_of(auto) == findings_of(table)

    bad = write_csv(tmp_path / "bad.csv", PADCHEST_COLUMNS, [*rows, ("7.png", "1", "", "p6", "F", "PA", "nodule")])
    with pytest.raises(LabelError, match=r"bad.csv line 8, column 'Labels': 'nodule' is not a list of finding names"):
        read_labels_table(bad, labels_format=PADCHEST)


def test_list_text_read_as_nih_ends_in_one_line_naming_the_layout_flag(tmp_path, capsys):
    """PadChest read with the default layout made every distinct list text a class (28,809 of them) and ran out of
    memory; it now stops with one line that names --labels-format list."""
    rng = random.Random(0)
    names = [f"finding {i}" for i in range(40)]
    rows = [
        (f"{i}.png", f"p{i // 3}", str(sorted(rng.sample(names, rng.randint(1, 4))))) for i in range(3000)
    ]  # thousands of distinct list texts, as in PadChest
    path = write_csv(tmp_path / "padchest.csv", ("ImageID", "PatientID", "Labels"), rows)
    argv = ["split", str(path), "--out", str(tmp_path / "out"), "--image-column-name", "ImageID"]
    argv += ["--group-column-name", "PatientID", "--label-column-name", "Labels"]
    assert cli_main(argv) != 0
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "--labels-format list" in message
    assert "distinct findings (more than 1,000" in message
    assert cli_main([*argv, "--labels-format", "list"]) == 0  # the flag it names reads the file
    split_rows = [row for name in ("train", "val", "test") for row in read_rows(tmp_path / "out" / f"{name}.csv")]
    assert Counter(split_rows) == Counter(rows)  # the file's own rows, each once


def _vindr_file(tmp_path: Path, images: int, seed: int = 0) -> tuple[Path, dict[str, list[set[str]]]]:
    """VinDr-CXR's train.csv: three of 17 radiologists per image, one row per box (several boxes of one finding),
    'No finding' rows without a box. Returns the file and, per image, what each of its readers named."""
    rng = random.Random(seed)
    rows, truth = [], {}
    for i in range(images):
        image = f"{i:032x}"
        readers = rng.sample([f"R{r}" for r in range(1, 18)], 3)
        truth[image] = []
        for reader in readers:
            named = {name for name in VINDR_CLASSES if rng.random() < 0.4}
            truth[image].append(named)
            if not named:
                rows.append((image, "No finding", "14", reader, "", "", "", ""))
            for name in sorted(named):
                for _box in range(rng.randint(1, 3)):
                    x, y = rng.randint(0, 2000), rng.randint(0, 2000)
                    rows.append((image, name, str(VINDR_CLASSES.index(name)), reader, x, y, x + 90, y + 90))
    rng.shuffle(rows)  # the file is not sorted by image
    return write_csv(tmp_path / "train.csv", VINDR_COLUMNS, rows), truth


def test_vindr_three_readers_with_boxes_majority_and_any(tmp_path):
    path, truth = _vindr_file(tmp_path, images=60)
    base = {"image_col": "image_id", "group_col": "image_id", "label_col": "class_name", "reader_col": "rad_id"}
    for policy, needed in (("majority", 2), ("any", 1)):
        table = read_labels_table(path, labels_format=LabelsFormat(layout="long", readers=policy, **base))
        expected = {
            image: {name for name in VINDR_CLASSES if sum(name in named for named in readers) >= needed}
            for image, readers in truth.items()
        }
        assert findings_of(table) == expected, policy
        assert len(table.rows) == 60
    without_readers = read_labels_table(path, labels_format=LabelsFormat(layout="long", **{**base, "reader_col": None}))
    assert findings_of(without_readers) == {image: set().union(*readers) for image, readers in truth.items()}
    auto = read_labels_table(path, labels_format=LabelsFormat(layout="auto", **base))
    assert auto.layout == "long"


def test_split_keeps_every_row_of_an_image_and_every_image_of_a_patient_together(tmp_path):
    path, _truth = _vindr_file(tmp_path, images=90, seed=1)
    # A patient column added: two images per patient, so both rules are exercised.
    rows = read_rows(path)
    patients = {image: f"P{n // 2}" for n, image in enumerate(sorted({row[0] for row in rows}))}
    path = write_csv(tmp_path / "vindr.csv", (*VINDR_COLUMNS, "patient"), [(*row, patients[row[0]]) for row in rows])
    flags = ["--labels-format", "long", "--image-column-name", "image_id", "--group-column-name", "patient"]
    flags += ["--label-column-name", "class_name", "--reader-col", "rad_id", "--negative-label", "no FINDING"]
    assert cli_main(["split", str(path), "--out", str(tmp_path / "out"), *flags]) == 0
    written = {name: read_rows(tmp_path / "out" / f"{name}.csv") for name in ("train", "val", "test")}
    assert Counter(row for part in written.values() for row in part) == Counter(read_rows(path))
    split_of_image: dict[str, str] = {}
    split_of_patient: dict[str, str] = {}
    for name, part in written.items():
        for row in part:
            assert split_of_image.setdefault(row[0], name) == name
            assert split_of_patient.setdefault(row[-1], name) == name
    assert set(split_of_image.values()) == {"train", "val", "test"}
    fmt = LabelsFormat(
        layout="long", image_col="image_id", group_col="patient", label_col="class_name", reader_col="rad_id"
    )
    whole = findings_of(read_labels_table(path, labels_format=fmt))
    for name in written:  # each split file reads back with the same flags to the same labels
        assert findings_of(read_labels_table(tmp_path / "out" / f"{name}.csv", labels_format=fmt)).items() <= (
            whole.items()
        )


def test_rsna_one_row_per_box_merged(tmp_path):
    rows = [
        ("a1", "264.0", "152.0", "213.0", "379.0", "1"),
        ("a1", "562.0", "152.0", "256.0", "453.0", "1"),
        ("b2", "", "", "", "", "0"),
        ("c3", "100.0", "300.0", "80.0", "120.0", "1"),
        ("d4", "", "", "", "", "0"),
    ]
    path = write_csv(tmp_path / "stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target"), rows)
    fmt = {"image_col": "patientId", "group_col": "patientId"}
    with pytest.raises(
        LabelError, match=r"'patientId' is listed more than once: a1 \(lines 2 and 3\).*--duplicates merge"
    ):
        read_labels_table(path, labels_format=LabelsFormat(layout="wide", **fmt))
    table = read_labels_table(path, labels_format=LabelsFormat(layout="wide", duplicates="merge", **fmt))
    assert table.classes == ["Target"]  # the box columns hold numbers, not labels
    assert findings_of(table) == {"a1": {"Target"}, "b2": set(), "c3": {"Target"}, "d4": set()}
    assert [len(image_rows) for image_rows in table.input_rows] == [2, 1, 1, 1]


def test_google_nih_yes_no_cells(tmp_path):
    header = ("Image Index", "Patient ID", "Patient age", "Patient gender", "Fracture", "Pneumothorax",
              "Airspace opacity", "Nodule or mass")  # fmt: skip
    rows = [
        ("00000001_000.png", "1", "58", "M", "NO", "YES", "NO", "no"),
        ("00000002_000.png", "2", "81", "F", "YES", "NO", "Yes", "NO"),
        ("00000003_000.png", "3", "44", "F", "NO", "NO", "NO", "NO"),
    ]
    table = read_labels_table(write_csv(tmp_path / "google.csv", header, rows), labels_format=LabelsFormat("auto"))
    assert table.layout == "wide" and table.classes == [
        "Fracture",
        "Pneumothorax",
        "Airspace opacity",
        "Nodule or mass",
    ]
    assert findings_of(table) == {
        "00000001_000.png": {"Pneumothorax"},
        "00000002_000.png": {"Fracture", "Airspace opacity"},
        "00000003_000.png": set(),
    }


def test_nih_names_compared_case_insensitively_and_duplicates_merged(tmp_path):
    rows = [
        ("a.png", "1", "Effusion|nodule "),
        ("a.png", "1", "effusion"),
        ("b.png", "2", "no finding"),
        ("c.png", "2", "Nodule| Effusion"),
    ]
    path = write_csv(tmp_path / "labels.csv", ("Image Index", "Patient ID", "Finding Labels"), rows)
    with pytest.raises(LabelError, match="listed more than once"):
        read_labels_table(path)
    table = read_labels_table(path, labels_format=LabelsFormat(duplicates="merge"))
    assert findings_of(table) == {"a.png": {"Effusion", "nodule"}, "b.png": set(), "c.png": {"nodule", "Effusion"}}


def test_recipe_flags_read_a_padchest_layout_like_the_nih_file(phantom_dir, tmp_path):
    """The recipes' --labels_format list --negative_label ... --label_column_name read the phantoms' labels, rewritten
    in PadChest's layout, to the same labels per image as the NIH file."""
    from hf_medvis.data.folder import build_folder_records

    with open(phantom_dir / "labels.csv", newline="") as handle:
        nih = list(csv.DictReader(handle))
    rows = [
        (
            row["Image Index"],
            row["Patient ID"],
            str([f" {name.lower()}" for name in row["Finding Labels"].split("|")]).replace("no finding", "Normal"),
        )
        for row in nih
    ]
    path = write_csv(tmp_path / "padchest.csv", ("ImageID", "PatientID", "Labels"), rows)
    argv = ["--labels_file", str(path), "--labels_format", "list", "--image_column_name", "ImageID"]
    argv += ["--group_column_name", "PatientID", "--label_column_name", "Labels", "--negative_label", "normal"]
    (data_args,) = HfArgumentParser(ClassificationDataArguments).parse_args_into_dataclasses(argv)
    images = phantom_dir / "images"
    padchest = build_folder_records(images, path, labels_format=data_args.parsed_labels_format())
    reference = build_folder_records(images, phantom_dir / "labels.csv")
    assert padchest["path"] == reference["path"] and padchest["group"] == reference["group"]
    for ours, theirs in zip(padchest["finding_labels"], reference["finding_labels"], strict=True):
        assert {n.lower() for n in ours.split("|")} == {n.lower() for n in theirs.split("|")}
