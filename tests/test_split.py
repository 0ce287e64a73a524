"""`hf-medvis split`: patient-disjoint, multi-label-stratified splits and the metric-precision report."""

import csv
import json

import numpy as np
import pytest

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelError, LabelSpec, infer_label_spec
from hf_medvis.data.splits import (
    Z95,
    accuracy_standard_error,
    auroc_standard_error,
    check_patient_disjoint,
    images_for_auroc_ci,
    split_labels_csv,
    split_report,
    stratified_group_assignment,
)

FINDINGS = ("Atelectasis", "Effusion", "Nodule", "Pneumothorax")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_labels(path, patients=400, seed=1):
    """An NIH-style table without images: 1-4 images per patient, findings of very different prevalence."""
    rng = np.random.default_rng(seed)
    prevalence = {"Atelectasis": 0.25, "Effusion": 0.12, "Nodule": 0.06, "Pneumothorax": 0.03}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"])
        for patient in range(patients):
            chronic = [name for name, p in prevalence.items() if rng.random() < p]
            for follow_up in range(int(rng.integers(1, 5))):
                findings = [n for n in chronic if rng.random() < 0.8]
                writer.writerow(
                    [f"{patient:08d}_{follow_up:03d}.png", "|".join(findings) or "No Finding", follow_up, patient, "PA"]
                )
    return path


def test_hanley_mcneil_and_binomial_match_the_reference_values():
    # ../shared/REFERENCE.md: AUC 0.85 with 50/950 -> ±0.068; 250/4,750 -> ±0.030; accuracy 0.8 at n = 1,000 -> ±2.5 pts
    assert Z95 * auroc_standard_error(0.85, 50, 950) == pytest.approx(0.068, abs=0.001)
    assert Z95 * auroc_standard_error(0.85, 250, 4750) == pytest.approx(0.030, abs=0.001)
    assert Z95 * accuracy_standard_error(0.8, 1000) == pytest.approx(0.025, abs=0.0005)
    assert auroc_standard_error(0.85, 0, 100) is None
    # The sizing inverts the formula: the returned n reaches the target, one image fewer does not.
    n = images_for_auroc_ci(0.85, 0.05, 0.068)
    assert 900 <= n <= 1100
    assert Z95 * auroc_standard_error(0.85, round(n * 0.05), round(n * 0.95)) <= 0.068


def test_split_cli_is_patient_disjoint_stratified_and_reports(tmp_path, capsys):
    labels = _write_labels(tmp_path / "labels.csv", patients=800)
    out = tmp_path / "split"
    code = cli_main(
        ["split", str(labels), "--out", str(out), "--val", "0.1", "--test", "0.2", "--seed", "3", "--target-ci", "0.02"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Hanley-McNeil" in printed and "Pneumothorax" in printed and "Validation size for a ±0.02" in printed

    source = _rows(labels)
    parts = {name: _rows(out / f"{name}.csv") for name in ("train", "val", "test")}
    # Same columns, every row exactly once, no patient on two sides.
    with open(out / "val.csv") as f:
        assert f.readline().strip() == "Image Index,Finding Labels,Follow-up #,Patient ID,View Position"
    assert sorted(r["Image Index"] for p in parts.values() for r in p) == sorted(r["Image Index"] for r in source)
    patients = {name: {r["Patient ID"] for r in rows} for name, rows in parts.items()}
    assert not (
        patients["train"] & patients["val"]
        or patients["train"] & patients["test"]
        or patients["val"] & patients["test"]
    )
    # Sizes near the fractions, and each finding's positives spread in proportion (even the 3% one).
    n = len(source)
    for name, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(len(parts[name]) / n - fraction) < 0.02
        for finding in FINDINGS:
            total = sum(finding in r["Finding Labels"] for r in source)
            share = sum(finding in r["Finding Labels"] for r in parts[name]) / total
            assert abs(share - fraction) < 0.05, (name, finding, share)

    report = json.loads((out / "split_report.json").read_text())
    val = report["splits"]["val"]
    assert val["images"] == len(parts["val"]) and val["patients"] == len(patients["val"])
    effusion = val["classes"]["Effusion"]
    assert effusion["positives"] == sum("Effusion" in r["Finding Labels"] for r in parts["val"])
    expected = Z95 * auroc_standard_error(0.85, effusion["positives"], effusion["negatives"])
    assert effusion["auroc_ci95_half_width"] == pytest.approx(expected)
    assert val["accuracy_ci95_half_width"] == pytest.approx(Z95 * (0.8 * 0.2 / val["images"]) ** 0.5)
    target = report["target"]
    assert target["val_images_for_auroc_all_classes"] == max(target["val_images_for_auroc_per_class"].values())
    assert (
        target["val_images_for_auroc_per_class"]["Pneumothorax"]
        > target["val_images_for_auroc_per_class"]["Atelectasis"]
    )


def test_split_is_deterministic_per_seed(tmp_path):
    labels = _write_labels(tmp_path / "labels.csv", patients=120)
    a = split_labels_csv(labels, tmp_path / "a", seed=5)
    b = split_labels_csv(labels, tmp_path / "b", seed=5)
    split_labels_csv(labels, tmp_path / "c", seed=6)
    assert (tmp_path / "a" / "val.csv").read_text() == (tmp_path / "b" / "val.csv").read_text()
    assert (tmp_path / "a" / "val.csv").read_text() != (tmp_path / "c" / "val.csv").read_text()
    assert a.report["splits"]["val"] == b.report["splits"]["val"]


def test_empty_class_in_validation_is_warned_in_the_report():
    groups = np.arange(20).repeat(2)
    matrix = np.zeros((40, 2))
    matrix[:10, 0] = 1
    matrix[:2, 1] = 1  # one patient has the rare class: only one split can hold it
    spec = LabelSpec(("Common", "Rare"), "multi_label_classification")
    assignment = stratified_group_assignment(groups, matrix, [0.5, 0.5], seed=0)
    report = split_report(assignment, groups, matrix, spec, split_names=("train", "val"))
    holder = "train" if report["splits"]["train"]["classes"]["Rare"]["positives"] else "val"
    if holder == "train":
        assert any("'Rare' has no positives in val" in w for w in report["warnings"])
        assert report["splits"]["val"]["classes"]["Rare"]["auroc_se"] is None
    else:
        assert report["warnings"] == []


@pytest.mark.parametrize(
    "header, message",
    [
        (["Image Index", "Finding Labels"], "labels.csv has no column 'Patient ID'"),
        (["Image Index", "Patient ID"], "labels.csv has no column 'Finding Labels'"),
    ],
)
def test_labels_without_group_or_label_column_are_refused(tmp_path, capsys, header, message):
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerow(["a.png", "1"])
    assert cli_main(["split", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_excel_csv_mixed_patient_spellings_and_empty_labels(tmp_path, caplog):
    """What a spreadsheet does to a labels file: a byte-order mark, CRLF line ends, '7' written '7.0' or '007'. And
    an empty Finding Labels cell: unlabelled, never a negative."""
    lines = ["Image Index,Finding Labels,Patient ID"]
    for patient in range(1, 31):
        for image in range(2):
            label = "Effusion" if (patient + image) % 3 == 0 else ("Nodule" if patient % 4 == 0 else "No Finding")
            lines.append(f"{patient:05d}_{image:03d}.png,{label},{patient}")
    lines += ["00007_100.png,Effusion,7.0", "00007_101.png,No Finding,007", "00031_000.png,,31", "00032_000.png,,32"]
    path = tmp_path / "labels.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    assert cli_main(["split", str(path), "--out", str(tmp_path / "o"), "--val", "0.2", "--test", "0.2"]) == 0
    assert "'Patient ID' written in several ways for 1 patient(s) (e.g. '007', '7', '7.0')" in caplog.text
    assert "2 image(s) with an empty 'Finding Labels' are unlabelled" in caplog.text
    split_of = {}
    for name in ("train", "val", "test"):
        raw = (tmp_path / "o" / f"{name}.csv").read_bytes()
        assert raw.startswith(b"Image Index,") and b"\r" not in raw  # no BOM, no CRLF carried over
        split_of.update(
            {row["Image Index"]: (name, row["Patient ID"]) for row in _rows(tmp_path / "o" / f"{name}.csv")}
        )
    assert len(split_of) == len(lines) - 1
    patient7 = {split_of[n] for n in ("00007_000.png", "00007_001.png", "00007_100.png", "00007_101.png")}
    assert len(patient7) == 1 and next(iter(patient7))[1] == "7"  # one patient, one split, one spelling
    report = json.loads((tmp_path / "o" / "split_report.json").read_text())
    assert sum(s["unlabelled_images"] for s in report["splits"].values()) == 2
    for split in report["splits"].values():
        labelled = split["images"] - split["unlabelled_images"]
        assert all(c["positives"] + c["negatives"] == labelled for c in split["classes"].values())


def test_an_image_listed_twice_is_refused_naming_the_rows(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    path.write_text("Image Index,Finding Labels,Patient ID\na.png,Effusion,1\nb.png,No Finding,2\na.png,No Finding,3\n")
    assert cli_main(["split", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "labels.csv: the same 'Image Index' is listed more than once: a.png (lines 2 and 4)" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("Image Index,Finding Labels,Patient ID\ncaf\u00e9.png,Effusion,1\n".encode("latin-1"))
    assert cli_main(["split", str(latin1), "--out", str(tmp_path / "o")]) == 2
    assert "latin1.csv is not UTF-8 text" in capsys.readouterr().err


def test_bad_label_sets_are_refused():
    with pytest.raises(LabelError, match="Pneumonia not found in the labels"):
        infer_label_spec(["Effusion", "Nodule|Effusion"], label_names=["Effusion", "Pneumonia"])
    with pytest.raises(LabelError, match="at least 2 classes"):
        infer_label_spec(["Effusion", "Effusion"], problem_type="single_label")
    with pytest.raises(LabelError, match="no positive findings"):
        infer_label_spec(["No Finding", "No Finding"])
    with pytest.raises(LabelError, match="carry several labels"):
        infer_label_spec(["A", "A|B"], problem_type="single_label")
    spec = infer_label_spec(["Nodule", "Effusion|Nodule", "No Finding"])
    assert spec.names == ("Effusion", "Nodule") and spec.multi_label
    assert infer_label_spec(["Normal", "Pneumonia"]).problem_type == "single_label_classification"


def test_validation_sharing_patients_is_refused():
    check_patient_disjoint(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="shares 1 patient"):
        check_patient_disjoint(["a", "b"], ["b", "c"])


def test_recipes_read_the_same_labels_file_the_same_way(phantom_dir, tmp_path):
    """The recipes' folder loader reads an Excel-saved copy of the phantom labels like the original: same labels, same
    patients, and an emptied label cell is unlabelled (left out), not a negative."""
    from hf_medvis.data.folder import build_folder_records
    from hf_medvis.data.labels import is_labelled

    original = (phantom_dir / "labels.csv").read_text().splitlines()
    header, rows = original[0].split(","), [line.split(",") for line in original[1:]]
    patient, label = header.index("Patient ID"), header.index("Finding Labels")
    for row in rows:
        row[patient] = f"{int(row[patient])}.0"  # what a spreadsheet writes for an integer id
    rows[0][label] = ""
    excel = tmp_path / "labels.csv"
    excel.write_bytes(("\ufeff" + "\r\n".join(",".join(r) for r in [header, *rows]) + "\r\n").encode())
    images = str(phantom_dir / "images")
    plain, spreadsheet = build_folder_records(images, phantom_dir / "labels.csv"), build_folder_records(images, excel)
    assert spreadsheet["group"] == plain["group"] and spreadsheet["key"] == plain["key"]
    changed = [
        i for i, (a, b) in enumerate(zip(plain["finding_labels"], spreadsheet["finding_labels"], strict=True)) if a != b
    ]
    assert len(changed) == 1 and not is_labelled(spreadsheet["finding_labels"][changed[0]])
