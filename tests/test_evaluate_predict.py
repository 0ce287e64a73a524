"""`hf-medvis evaluate` (patient-bootstrap CIs, plots) and `hf-medvis predict` (JSON lines, DICOM and PNG)."""

import csv
import json

import numpy as np
import pytest

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelSpec
from hf_medvis.evaluation import bootstrap_confidence_intervals, classification_metrics

MULTI = LabelSpec(("Cardiomegaly", "Effusion", "Nodule"), "multi_label_classification")


def _save_classifier(folder, spec, pooling="cls"):
    """An untrained tiny classifier saved as the recipe saves one (weights, id2label, processor)."""
    import torch

    from hf_medvis.models.build import build_image_processor
    from hf_medvis.models.transfer import build_classifier

    torch.manual_seed(0)
    model, _ = build_classifier(None, spec, preset="tiny", image_size=32, patch_size=8, pooling=pooling)
    model.save_pretrained(folder)
    build_image_processor(32, [0.5] * 3, [0.25] * 3).save_pretrained(folder)
    return folder


def test_bootstrap_resamples_patients_not_images():
    """Duplicating every image of a patient adds no information: a patient bootstrap keeps the CI as wide, where an
    image-level bootstrap would shrink it by about sqrt(5)."""
    rng = np.random.default_rng(0)
    n = 60
    labels = np.zeros((n, 1))
    labels[: n // 2] = 1
    probs = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, size=(n, 1)), 0, 1)
    spec = LabelSpec(("Effusion",), "multi_label_classification")
    single = bootstrap_confidence_intervals(labels, probs, np.arange(n), spec, n_resamples=300, seed=1)
    repeated = bootstrap_confidence_intervals(
        np.repeat(labels, 5, axis=0),
        np.repeat(probs, 5, axis=0),
        np.repeat(np.arange(n), 5),
        spec,
        n_resamples=300,
        seed=1,
    )
    by_image = bootstrap_confidence_intervals(
        np.repeat(labels, 5, axis=0), np.repeat(probs, 5, axis=0), np.arange(5 * n), spec, n_resamples=300, seed=1
    )
    width = {
        name: ci["auroc_macro"][1] - ci["auroc_macro"][0]
        for name, ci in (("single", single), ("repeated", repeated), ("by_image", by_image))
    }
    assert width["repeated"] == pytest.approx(width["single"], rel=0.25)
    assert width["by_image"] < 0.7 * width["repeated"]
    point = classification_metrics(labels, probs, spec)["auroc_macro"]
    assert single["auroc_macro"][0] <= point <= single["auroc_macro"][1]


def test_bootstrap_auroc_equals_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from hf_medvis.evaluation.bootstrap import _auroc_by_ranks

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) + 0.3 * y, 1)  # rounded: many ties
    assert _auroc_by_ranks(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert _auroc_by_ranks(np.ones(5), score[:5]) is None


def test_metrics_for_both_problem_types():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    perfect = classification_metrics(labels, labels * 0.8 + 0.1, LabelSpec(("A", "B"), "multi_label_classification"))
    assert perfect["auroc_macro"] == perfect["ap_macro"] == perfect["f1_macro"] == 1.0
    onehot = np.eye(3)[[0, 1, 2, 0]]
    probs = np.eye(3)[[0, 1, 1, 0]] * 0.7 + 0.1
    metrics = classification_metrics(onehot, probs, LabelSpec(("A", "B", "C"), "single_label_classification"))
    assert metrics["accuracy"] == 0.75 and "auroc_macro" in metrics and "ap_macro" not in metrics


def test_evaluate_writes_metrics_with_patient_cis_and_plots(tmp_path, phantom_dir, capsys):
    from hf_medvis.data.splits import split_labels_csv

    model = _save_classifier(tmp_path / "model", MULTI)
    split_labels_csv(phantom_dir / "labels.csv", tmp_path / "split", val=0.2, test=0.3)
    test_rows = list(csv.DictReader((tmp_path / "split" / "test.csv").read_text().splitlines()))
    code = cli_main(
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(phantom_dir / "images"),
            "--labels",
            str(tmp_path / "split" / "test.csv"),
            "--out",
            str(tmp_path / "eval"),
            "--bootstrap",
            "100",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == len(test_rows)  # only the images listed in --labels
    assert metrics["patients"] == len({r["Patient ID"] for r in test_rows})
    assert metrics["problem_type"] == "multi_label_classification"
    for key in ("auroc_macro", "ap_macro", "f1_macro", "auroc_Cardiomegaly"):
        assert key in metrics, key
    assert metrics["auroc_macro_ci95_low"] <= metrics["auroc_macro"] <= metrics["auroc_macro_ci95_high"]
    table = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    assert [row["class"] for row in table] == list(MULTI.names) and "auroc_ci95" in table[0] and "ap" in table[0]
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 5000
    assert not (tmp_path / "eval" / "confusion.png").exists()
    assert "patient-level bootstrap" in capsys.readouterr().out


def test_evaluate_multiclass_draws_a_confusion_matrix(tmp_path, phantom_dir):
    spec = LabelSpec(("Cardiomegaly", "Normal"), "single_label_classification")
    model = _save_classifier(tmp_path / "model", spec, pooling="mean")
    rows = list(csv.DictReader((phantom_dir / "labels.csv").read_text().splitlines()))
    for row in rows:
        row["Finding Labels"] = "Cardiomegaly" if "Cardiomegaly" in row["Finding Labels"] else "Normal"
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert (
        cli_main(
            [
                "evaluate",
                "--model",
                str(model),
                "--data",
                str(phantom_dir / "images"),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--out",
                str(tmp_path / "eval"),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "accuracy_ci95_low" in metrics and metrics["images"] == len(rows)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 3000


def test_predict_prints_json_lines_for_dicom_and_png(tmp_path, phantom_dir, capsys):
    model = _save_classifier(tmp_path / "model", MULTI)
    png = sorted((phantom_dir / "images").glob("*.png"))[:2]
    dcm = [phantom_dir / "dicom" / p.with_suffix(".dcm").name for p in png]
    assert cli_main(["predict", "--model", str(model), *map(str, png + dcm)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in png + dcm]
    for line in lines:
        assert list(line["probabilities"]) == list(MULTI.names)
        assert all(0 <= p <= 1 for p in line["probabilities"].values())
    # The DICOM files hold the same images (MONOCHROME1 inverted back, windowed): the model sees the same pixels, to
    # within one grey level of rounding, and ten times closer on average than two different phantoms are.
    from hf_medvis.evaluation import Predictor

    predictor = Predictor(model)
    seen = {str(p): predictor.preprocess(str(p)).int() for p in png + dcm}
    between_images = (seen[str(png[0])] - seen[str(png[1])]).abs().float().mean()
    for a, b in zip(png, dcm, strict=True):
        assert (seen[str(a)] - seen[str(b)]).abs().max() <= 1
        assert (seen[str(a)] - seen[str(b)]).abs().float().mean() < 0.1 * between_images
    for a, b in zip(lines[:2], lines[2:], strict=True):
        for name in MULTI.names:
            assert a["probabilities"][name] == pytest.approx(b["probabilities"][name], abs=1e-3)


def test_evaluate_and_predict_refuse_a_folder_that_is_not_a_classifier(tmp_path, phantom_dir, capsys):
    from hf_medvis.models.build import build_mae_model

    build_mae_model(None, preset="tiny", image_size=32).save_pretrained(tmp_path / "mae")
    png = str(sorted((phantom_dir / "images").glob("*.png"))[0])
    assert cli_main(["predict", "--model", str(tmp_path / "mae"), png]) == 2
    assert "not a fine-tuned ViT classifier" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["evaluate", "--model", str(tmp_path / "empty"), "--data", png, "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
