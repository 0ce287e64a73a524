"""CheXpert/MIMIC-style ("wide") labels files: one reader for split, prepare, the recipes and evaluate; uncertain and
blank values under each policy; patients from the path; masked loss and metrics end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_recipe, subprocess_env

from hf_medvis.cli import build_parser
from hf_medvis.data.arguments import MAEDataArguments
from hf_medvis.data.labels import (
    LabelError,
    encode_labels,
    infer_label_spec,
    label_matrix,
    positive_weights,
    read_labels_table,
)
from hf_medvis.data.labels.layouts import LabelFormatError, LabelsFormat, labels_format_from_args
from hf_medvis.data.splits import split_labels_csv

CHEXPERT_FINDINGS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
# Per finding: P(1), P(-1), P(0); the rest blank (CheXpert's labeller leaves most findings unmentioned).
RATES = (0.05, 0.06, 0.05)
WIDE = LabelsFormat(layout="wide", patient_regex=r"patient(\d+)")


def write_chexpert_csv(path: Path, patients: int, seed: int = 0) -> int:
    """A CheXpert-layout train.csv: several studies and views per patient, frontal and lateral, AP/PA, ages, and each
    finding 1.0 / -1.0 / 0.0 / blank at realistic rates (Pleural Effusion and Support Devices common, Pleural Other and
    Fracture rare). Returns the number of rows."""
    rng = np.random.default_rng(seed)
    prevalence = {name: 1.0 for name in CHEXPERT_FINDINGS} | {"Support Devices": 3.0, "Pleural Effusion": 2.5,
                                                              "Pleural Other": 0.2, "Fracture": 0.3}  # fmt: skip
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS])
        for patient in range(1, patients + 1):
            sex, age = rng.choice(["Male", "Female"]), int(rng.integers(18, 90))
            for study in range(1, 1 + int(rng.integers(1, 5))):
                values = []
                for name in CHEXPERT_FINDINGS:
                    p1, pu, p0 = (r * prevalence[name] for r in RATES)
                    u = rng.random()
                    values.append("1.0" if u < p1 else "-1.0" if u < p1 + pu else "0.0" if u < p1 + pu + p0 else "")
                no_finding = "1.0" if all(v in ("", "0.0") for v in values) else ""
                views = [("Frontal", rng.choice(["AP", "PA"]))] + ([("Lateral", "")] if rng.random() < 0.5 else [])
                for view, (kind, ap_pa) in enumerate(views, start=1):
                    name = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/view{view}_{kind.lower()}.jpg"
                    writer.writerow([name, sex, age, kind, ap_pa, no_finding, *values])
                    rows += 1
    return rows


def test_wide_rows_under_each_policy(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text(
        "Path,Sex,Age,No Finding,Edema,Effusion,Nodule\n"
        "p/patient00001/study1/view1_frontal.jpg,Male,70,,1.0,-1.0,\n"
        "p/patient00001/study1/view2_lateral.jpg,Male,70,1.0,0.0,0,\n"
        "p/patient00002/study1/view1_frontal.jpg,Female,0,,-1,,1\n"
    )
    expected = {
        ("ignore", "negative"): ["Edema|?Effusion", "No Finding", "Nodule|?Edema"],
        ("zeros", "negative"): ["Edema", "No Finding", "Nodule"],
        ("ones", "negative"): ["Edema|Effusion", "No Finding", "Edema|Nodule"],
        ("ignore", "ignore"): ["Edema|?Effusion|?Nodule", "?Nodule", "Nodule|?Edema|?Effusion"],
    }
    for (uncertain, blank), texts in expected.items():
        fmt = LabelsFormat(layout="wide", patient_regex=r"patient(\d+)", uncertain=uncertain, blank=blank)
        table = read_labels_table(path, labels_format=fmt)
        assert table.classes == ["Edema", "Effusion", "Nodule"]  # not Age/Sex (not 1/0/-1/blank), not No Finding
        assert [row["Finding Labels"] for row in table.rows] == texts, (uncertain, blank)
        assert [row["Patient ID"] for row in table.rows] == ["1", "1", "2"]
    table = read_labels_table(path, labels_format=LabelsFormat(layout="auto", patient_regex=r"patient(\d+)"))
    spec = infer_label_spec([r["Finding Labels"] for r in table.rows])
    matrix = label_matrix(encode_labels([r["Finding Labels"] for r in table.rows], spec), spec)
    assert spec.names == ("Edema", "Nodule")  # Effusion is never positive (only uncertain): nothing to learn
    np.testing.assert_array_equal(matrix, [[1, 0], [0, 0], [-1, 1]])  # -1: unknown, masked
    np.testing.assert_allclose(positive_weights(matrix), [1.0, 2.0])  # negatives / positives over known labels

    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Patient,Edema\na.jpg,7,1\nb.jpg,8,maybe\n")
    with pytest.raises(LabelError, match=r"bad.csv line 3, column 'Edema': 'maybe' is not 1, 0, -1, blank, YES/NO"):
        read_labels_table(bad, labels_format=LabelsFormat(layout="wide", group_col="Patient", label_names=("Edema",)))
    no_patient = tmp_path / "no_patient.csv"
    no_patient.write_text("Path,Edema\na.jpg,1\n")
    with pytest.raises(LabelError, match=r"no_patient.csv line 2: --patient-regex finds no patient in 'a.jpg'"):
        read_labels_table(no_patient, labels_format=WIDE)
    with pytest.raises(LabelError, match=r"no column 'Patient ID' \(or pass --group-column-name / --patient-regex\)"):
        read_labels_table(no_patient, required=("Patient ID",), labels_format=LabelsFormat(layout="wide"))


def _recipe_data_args(argv: list[str], config: Path | None = None) -> MAEDataArguments:
    from hf_medvis.training.args import parse_recipe_args

    (data_args,) = parse_recipe_args((MAEDataArguments,), argv, config)
    return data_args


def test_column_flags_one_spelling_with_deprecated_aliases(tmp_path, caplog):
    data_args = _recipe_data_args(["--image_column_name", "Path", "--group_column_name", "subject_id"])
    fmt = data_args.parsed_labels_format()
    assert (fmt.image_col, fmt.group_col) == ("Path", "subject_id")
    # The old recipe flags, on the command line or as config keys: the new fields, one warning each naming the new flag.
    config = tmp_path / "old.yaml"
    config.write_text("image_col: Path\ngroup_col: subject_id\n")
    for argv, path in ((["--image_col", "Path", "--group_col", "subject_id"], None), ([], config)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_medvis.data.labels.layouts"):
            data_args = _recipe_data_args(argv, path)
        assert (data_args.image_column_name, data_args.group_column_name) == ("Path", "subject_id")
        assert (data_args.image_col, data_args.group_col) == (None, None)
        assert [r.getMessage() for r in caplog.records] == [
            "--image_col is deprecated: use --image_column_name",
            "--group_col is deprecated: use --group_column_name",
        ]
    assert _recipe_data_args(["--group_col", "p", "--group_column_name", "p"]).group_column_name == "p"
    with pytest.raises(SystemExit, match=r"error: --group_col 'a' and --group_column_name 'b' disagree: give "
                       r"--group_column_name only$"):  # fmt: skip
        _recipe_data_args(["--group_col", "a", "--group_column_name", "b"])
    # `hf-medvis split` / `prepare` / `evaluate`: the same names with dashes, the old ones still read.
    parser = build_parser()
    args = parser.parse_args(["split", "x.csv", "--out", "o", "--image-column-name", "Path", "--group-col", "sid",
                              "--label-col", "Findings"])  # fmt: skip
    fmt = labels_format_from_args(args)
    assert (fmt.image_col, fmt.group_col, fmt.label_col) == ("Path", "sid", "Findings")
    args = parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--out", "o", "--image-col", "a",
                              "--image-column-name", "b"])  # fmt: skip
    with pytest.raises(LabelFormatError, match="--image-col 'a' and --image-column-name 'b' disagree"):
        labels_format_from_args(args)


def test_chexpert_layout_splits_patient_disjoint_and_stratified(tmp_path):
    labels = tmp_path / "train.csv"
    rows = write_chexpert_csv(labels, patients=60_000)
    assert rows >= 200_000
    result = split_labels_csv(labels, tmp_path / "split", labels_format=WIDE, val=0.1, test=0.2, seed=0)
    fmt_rows = {}
    for name in ("train", "val", "test"):
        table = read_labels_table(result.paths[name], labels_format=WIDE)
        fmt_rows[name] = table.rows
    patients = {name: {r["Patient ID"] for r in rows_} for name, rows_ in fmt_rows.items()}
    assert not (
        patients["train"] & patients["val"]
        or patients["train"] & patients["test"]
        or patients["val"] & patients["test"]
    )
    assert sum(len(r) for r in fmt_rows.values()) == rows
    # Per class, the positive rate over known labels is about the same in every split; -1 counts as neither.
    report = result.report["splits"]
    for finding in CHEXPERT_FINDINGS:
        rates = [
            c["positives"] / (c["positives"] + c["negatives"]) for c in (report[s]["classes"][finding] for s in report)
        ]
        assert max(rates) - min(rates) < 0.1 * max(rates) + 0.002, (finding, rates)
        known = sum(
            report[s]["classes"][finding]["positives"] + report[s]["classes"][finding]["negatives"] for s in report
        )
        uncertain = sum(
            1
            for r in fmt_rows["train"] + fmt_rows["val"] + fmt_rows["test"]
            if f"?{finding}" in r["Finding Labels"].split("|")
        )
        assert known + uncertain == rows
    # The split files keep the input's own columns (read back with the same flags, they are the same rows).
    with open(result.paths["val"]) as written, open(labels) as original:
        assert next(csv.reader(written)) == next(csv.reader(original))


def _wide_phantom_labels(phantom_dir: Path, out: Path, seed: int = 0) -> None:
    """The phantom labels as a wide file with CheXpert's quirks: uncertain and blank cells, the patient in the path."""
    rng = np.random.default_rng(seed)
    findings = ("Cardiomegaly", "Effusion", "Nodule")
    with open(phantom_dir / "labels.csv") as src, open(out, "w", newline="") as dst:
        writer = csv.writer(dst, lineterminator="\n")
        writer.writerow(["Path", "Sex", *findings])
        for row in csv.DictReader(src):
            present = row["Finding Labels"].split("|")
            cells = []
            for name in findings:
                u = rng.random()
                cells.append(
                    "-1.0"
                    if u < 0.15
                    else ""
                    if u < 0.3 and name not in present
                    else "1.0"
                    if name in present
                    else "0.0"
                )
            writer.writerow(
                [f"train/patient{int(row['Patient ID']):05d}/{row['Image Index']}", row["Patient Gender"], *cells]
            )


@pytest.mark.slow
def test_finetune_and_evaluate_with_uncertain_ignored(phantom_dir, tmp_path):
    """--labels_format wide --uncertain ignore trains on masked labels and evaluates each class on its known labels."""
    import io
    from contextlib import redirect_stdout

    from sklearn.metrics import roc_auc_score

    from hf_medvis.data.folder import build_folder_records
    from hf_medvis.evaluation import Predictor
    from hf_medvis.evaluation.metrics import probabilities  # noqa: F401  (same probabilities as predict)

    labels = tmp_path / "wide.csv"
    _wide_phantom_labels(phantom_dir, labels)
    flags = f"--labels_format wide --patient_regex patient(\\d+) --uncertain ignore --labels_file {labels}".split()
    out = tmp_path / "vit"
    args = f"--train_data {phantom_dir / 'images'} --output_dir {out} --max_steps 6 --per_device_train_batch_size 8 "
    args += (
        "--eval_steps 3 --save_steps 3 --validation_split_percentage 30 --ci_bootstrap_samples 20 --eval_subsample 8"
    )
    with redirect_stdout(io.StringIO()):
        metrics = load_recipe("finetune_vit").main([*args.split(), *flags])
    assert np.isfinite(metrics["train_loss"]) and "eval_auroc_macro" in metrics

    result = subprocess.run(
        [sys.executable, "-m", "hf_medvis.cli", "evaluate", "--model", str(out), "--data", str(phantom_dir / "images"),
         "--labels", str(labels), "--out", str(tmp_path / "eval"), "--bootstrap", "20", "--labels-format", "wide",
         "--patient-regex", r"patient(\d+)", "--no-card"],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    fmt = LabelsFormat(layout="wide", patient_regex=r"patient(\d+)")
    records = build_folder_records(phantom_dir / "images", labels, labels_format=fmt)
    predictor = Predictor(out)
    spec = predictor.spec
    truth = label_matrix(encode_labels(records["finding_labels"], spec), spec)
    assert (truth == -1).sum() > 20  # the masked case is really exercised
    probs = predictor.predict(records["path"])
    for c, name in enumerate(spec.names):
        known = truth[:, c] >= 0
        assert evaluated[f"auroc_{name}"] == pytest.approx(roc_auc_score(truth[known, c], probs[known, c]), abs=1e-6)


def test_masked_bce_is_the_mean_over_known_labels():
    from hf_medvis.training.trainer import ClassificationTrainer

    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    labels = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]])

    class Model(torch.nn.Module):
        config = type("C", (), {"problem_type": "multi_label_classification"})()

        def forward(self, pixel_values):
            return type("O", (), {"logits": logits})()

    trainer = ClassificationTrainer.__new__(ClassificationTrainer)  # compute_loss reads only these attributes
    trainer.model, trainer.pos_weight, trainer._pos_weights = Model(), None, {}
    loss = ClassificationTrainer.compute_loss(
        trainer, trainer.model, {"pixel_values": torch.zeros(2), "labels": labels}
    )
    known = labels >= 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
    torch.testing.assert_close(loss, expected)


def test_prepare_reads_a_wide_file_with_the_same_meaning(phantom_dir, tmp_path):
    from hf_medvis.data.dataset_card import load_prepared_dataset
    from hf_medvis.data.prepare import prepare

    labels = tmp_path / "wide.csv"
    _wide_phantom_labels(phantom_dir, labels)
    fmt = LabelsFormat(layout="wide", patient_regex=r"patient(\d+)")
    manifest = prepare(
        str(phantom_dir / "images"), str(tmp_path / "shards"), size=32, salt="s", labels=str(labels), labels_format=fmt
    )
    assert manifest["totals"]["quarantined"] == 0
    assert "labels file columns ignored (unknown): Sex" in manifest["warnings"]  # not Path or the class columns
    ds = load_prepared_dataset(str(tmp_path / "shards"))
    assert ds.features["labels"].feature.names == ["Cardiomegaly", "Effusion", "Nodule"]
    table = read_labels_table(labels, labels_format=fmt)
    by_key = {r["Path"].removesuffix(".png"): r for r in table.rows}
    assert len(ds) == len(by_key)
    for example in ds:
        row = by_key[example["key"]]  # the key is the labels file's image path (without extension): unique per image
        assert example["finding_labels"] == row["Finding Labels"]
        names = ds.features["labels"].feature.names
        assert [names[i] for i in example["labels"]] == [n for n in row["Finding Labels"].split("|") if n in names]
