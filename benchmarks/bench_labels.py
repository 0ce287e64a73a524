"""Labels-file scale: ``hf-medvis split`` on a PadChest-sized list-layout file (160,861 rows, PadChest's columns, list
text with stray spaces and empty cells, 194 findings), and the same file read with the wrong layout (the default
``nih``), which must end in one line naming ``--labels-format list`` instead of growing with rows x distinct texts.

Each run is a fresh ``hf-medvis split`` process: wall time and its peak resident memory (``ru_maxrss``). The rows
written to train/val/test are checked against the input (each once).

    python benchmarks/bench_labels.py                 # 160,861 rows
    python benchmarks/bench_labels.py --quick         # 20,000 rows (CI smoke)
    python benchmarks/bench_labels.py --max-peak-mb 1024   # exit 1 above the issue's target (a quiet host)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PADCHEST_ROWS = 160_861
PADCHEST_PATIENTS = 69_882
COLUMNS = (
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureTime", "RelativeXRayExposure_DICOM",
    "ReportID", "Report", "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
    "LocalizationsCUIS",
)  # fmt: skip
SPLIT_FLAGS = ["--image-column-name", "ImageID", "--group-column-name", "PatientID", "--label-column-name", "Labels"]


def write_padchest_like(path: Path, rows: int, seed: int = 0) -> int:
    """A file with PadChest's columns and label quirks; returns the number of distinct label texts."""
    rng = random.Random(seed)
    findings = ["pleural effusion", "nodule", "cardiomegaly", "pneumonia", "atelectasis", "COPD signs"]
    findings += [f"finding {i}" for i in range(194 - len(findings))]
    weights = [1.0 / (rank + 1) for rank in range(len(findings))]  # a long tail, as PadChest's
    words = [
        "normal",
        "cardiac",
        "silhouette",
        "no",
        "pleural",
        "effusion",
        "lungs",
        "clear",
        "mild",
        "degenerative",
        "changes",
        "of",
        "the",
        "spine",
    ]
    texts = set()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i in range(rows):
            u = rng.random()
            if u < 0.0007:
                labels = ""  # PadChest has ~100 empty cells
            elif u < 0.35:
                labels = "['normal']"
            else:
                chosen = list(dict.fromkeys(rng.choices(findings, weights, k=rng.randint(1, 5))))
                labels = str([(" " + n if rng.random() < 0.05 else n) for n in chosen])  # stray spaces
            texts.add(labels)
            patient = f"{i * PADCHEST_PATIENTS // rows:030d}"  # PadChest: 69,882 patients
            writer.writerow([
                f"{i:020d}_{rng.getrandbits(32):08x}.png", str(i % 50), f"2015{1 + i % 12:02d}{1 + i % 28:02d}",
                f"{i // 2:025d}", patient, "1950", rng.choice("MF"), "PA",
                rng.choice(["PA", "L", "AP_horizontal"]), "Manual review of DICOM fields", "No", "CR",
                "PhilipsMedicalSystems", "MONOCHROME2", "0", "[1, 1]", "0.139", "12", "2047", "4095", "2500", "2048",
                "320", "4", "12.5", "None", str(i), " ".join(rng.choices(words, k=40)), "Physician", labels,
                "[]", "[['normal']]", "['C1306645']", "[]",
            ])  # fmt: skip
    return len(texts)


def run_split(labels: Path, out: Path, extra: list[str]) -> dict:
    """One ``hf-medvis split`` process: its exit code, wall seconds, peak RSS (MB) and the last line it printed."""
    before = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_medvis.cli", "split", str(labels), "--out", str(out), *SPLIT_FLAGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - before
    stdout, stderr = process.stdout.read(), process.stderr.read()
    last = (stderr.strip() or stdout.strip()).splitlines()[-1:] or [""]
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 2),
        "peak_mb": round(usage.ru_maxrss / 1024, 1),
        "last_line": last[0],
    }


def rows_of(path: Path) -> int:
    with open(path, newline="") as handle:
        return sum(1 for _ in csv.reader(handle)) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=PADCHEST_ROWS)
    parser.add_argument("--quick", action="store_true", help="20,000 rows")
    parser.add_argument("--max-peak-mb", type=float, default=None, help="exit 1 when the list split peaks above this")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rows = 20_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "padchest.csv"
        distinct = write_padchest_like(labels, rows)
        size_mb = labels.stat().st_size / 2**20
        listed = run_split(labels, Path(tmp) / "list", ["--labels-format", "list", "--negative-label", "normal"])
        written = sum(rows_of(Path(tmp) / "list" / f"{name}.csv") for name in ("train", "val", "test"))
        if listed["rc"] != 0 or written != rows:
            print(f"list split failed (rc {listed['rc']}, {written} of {rows} rows written): {listed['last_line']}")
            return 1
        misread = run_split(labels, Path(tmp) / "nih", [])
        if misread["rc"] == 0 or "--labels-format list" not in misread["last_line"]:
            print(f"the nih misread did not end in the layout hint: {misread['last_line']}")
            return 1
    print(f"file: {rows:,} rows, {len(COLUMNS)} columns, {size_mb:.0f} MB, {distinct:,} distinct label texts")
    print("run                          exit  wall s  peak MB")
    print(f"split --labels-format list   {listed['rc']:>4}  {listed['wall_s']:>6}  {listed['peak_mb']:>7}")
    print(f"split (nih: wrong layout)    {misread['rc']:>4}  {misread['wall_s']:>6}  {misread['peak_mb']:>7}")
    print(f"  -> {misread['last_line']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "list": listed, "misread": misread}, indent=2))
    if args.max_peak_mb is not None and listed["peak_mb"] > args.max_peak_mb:
        print(f"peak {listed['peak_mb']} MB is above --max-peak-mb {args.max_peak_mb}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
