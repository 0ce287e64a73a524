import csv
import hashlib
from collections import Counter, defaultdict

import numpy as np
import pydicom
import pytest
from PIL import Image

from hf_medvis.cli import main as cli_main
from hf_medvis.data import read_image
from hf_medvis.data.phantoms import FINDINGS, NIH_COLUMNS, NO_FINDING, plan_phantoms, write_phantom_dataset


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", patients=6, seed=7, image_size=48)
    b = write_phantom_dataset(tmp_path / "b", patients=6, seed=7, image_size=48)
    c = write_phantom_dataset(tmp_path / "c", patients=6, seed=8, image_size=48)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_labels_follow_nih_layout_and_patients_have_follow_ups(phantom_dir):
    with open(phantom_dir / "labels.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert tuple(header) == NIH_COLUMNS
    by_patient = defaultdict(list)
    labels = Counter()
    for row in rows:
        record = dict(zip(header, row, strict=True))
        by_patient[record["Patient ID"]].append(int(record["Follow-up #"]))
        findings = record["Finding Labels"].split("|")
        assert findings == [NO_FINDING] or set(findings) <= set(FINDINGS)
        labels.update(findings)
        assert (phantom_dir / "images" / record["Image Index"]).is_file()
        assert (phantom_dir / "dicom" / record["Image Index"].replace(".png", ".dcm")).is_file()
    assert len(by_patient) == 16
    assert any(len(v) > 1 for v in by_patient.values()), "follow-ups are needed to test patient leakage"
    assert all(sorted(v) == list(range(len(v))) for v in by_patient.values())
    # The larger default plan must contain every finding, co-occurring findings and normals.
    plan = plan_phantoms(200, seed=0)
    counts = Counter(name for image in plan for name in image.findings)
    assert all(counts[name] >= 30 for name in FINDINGS)
    assert any(len(image.findings) >= 2 for image in plan)
    assert sum(not image.findings for image in plan) >= 50


def test_dicom_files_decode_to_the_png_display_image(phantom_dir):
    photometrics = Counter()
    for png in sorted((phantom_dir / "images").glob("*.png"))[:12]:
        dcm = phantom_dir / "dicom" / png.name.replace(".png", ".dcm")
        ds = pydicom.dcmread(dcm)
        photometrics[ds.PhotometricInterpretation] += 1
        assert ds.BitsAllocated == 16 and "RescaleSlope" in ds and "WindowCenter" in ds
        from_dicom = np.round(read_image(dcm) * 255)
        from_png = np.asarray(Image.open(png), dtype=np.float64)
        assert np.abs(from_dicom - from_png).max() <= 1.0
    assert set(photometrics) == {"MONOCHROME1", "MONOCHROME2"}


def test_cardiomegaly_is_visible_as_a_wider_heart():
    from hf_medvis.data.phantoms import render_phantom

    plan = plan_phantoms(80, seed=1)

    # Mean brightness of the lower-middle band (heart region) is higher when the heart is enlarged.
    def heart_band(image):
        return render_phantom(image, 64)[36:48, 14:50].mean()

    big = [heart_band(i) for i in plan if "Cardiomegaly" in i.findings][:15]
    normal = [heart_band(i) for i in plan if not i.findings][:15]
    assert np.mean(big) > np.mean(normal) + 0.01


def test_demo_data_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo-data", str(out), "--patients", "3", "--image-size", "32"]) == 0
    assert "images" in capsys.readouterr().out
    assert (out / "labels.csv").is_file()
    # A second run refuses to overwrite, with one line naming the folder.
    assert cli_main(["demo-data", str(out), "--patients", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0]
    assert not list(tmp_path.glob(".demo.tmp-*")), "no temporary folder left behind"


def test_bad_phantom_arguments(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        plan_phantoms(0)
    with pytest.raises(ValueError, match="image_size"):
        write_phantom_dataset(tmp_path / "x", patients=2, image_size=8)
    assert not (tmp_path / "x").exists()
