"""`hf-medvis evaluate --thresholds-from` (per-class thresholds chosen on validation patients, sensitivity /
specificity / PPV / NPV with patient-bootstrap CIs, saved into the model folder) and `hf-medvis predict`'s findings."""

import csv
import json

import numpy as np
import pytest
from test_evaluate_predict import MULTI, _save_classifier

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelSpec

RATES = ("sensitivity", "specificity", "ppv", "npv")


def _split_by_patient(phantom_dir, folder):
    """labels.csv split by patient: the first half of the sorted patients validation, the rest test."""
    with open(phantom_dir / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    patients = sorted({row["Patient ID"] for row in rows})
    validation_patients = set(patients[: len(patients) // 2])
    parts = {
        "val.csv": [r for r in rows if r["Patient ID"] in validation_patients],
        "test.csv": [r for r in rows if r["Patient ID"] not in validation_patients],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
    return folder / "val.csv", folder / "test.csv", parts["val.csv"], parts["test.csv"]


def _truth(rows, name):
    return np.array([name in r["Finding Labels"].split("|") for r in rows], dtype=int)


def _evaluate(model, phantom_dir, labels, out, *extra):
    return cli_main(
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(phantom_dir / "images"),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            *map(str, extra),
        ]
    )


def _probabilities(model, phantom_dir, rows):
    from hf_medvis.evaluation import Predictor

    return Predictor(model).predict([str(phantom_dir / "images" / r["Image Index"]) for r in rows])


def test_youden_thresholds_and_rates_equal_scikit_learn_and_no_card_leaves_the_folder(tmp_path, phantom_dir, capsys):
    """The youden threshold is scikit-learn's roc_curve argmax of J on the validation probabilities (ties: the highest
    threshold); sensitivity, specificity, PPV and NPV on the evaluated rows are confusion_matrix's at it; each has a
    patient-bootstrap CI around it. --no-card leaves config.json byte for byte."""
    from sklearn.metrics import confusion_matrix, roc_curve

    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, val_rows, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    config_before = (model / "config.json").read_bytes()
    code = _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", "--thresholds-from", val_csv, "--no-card")
    assert code == 0
    assert (model / "config.json").read_bytes() == config_before and not (model / "README.md").exists()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    points = metrics["operating_points"]
    assert points, metrics.get("operating_points_without_threshold")
    assert metrics["operating_point"] == {
        "rule": "youden",
        "validation": f"val.csv, {len(val_rows)} images, {len({r['Patient ID'] for r in val_rows})} patients",
    }
    val_probs = _probabilities(model, phantom_dir, val_rows)
    test_probs = _probabilities(model, phantom_dir, test_rows)
    printed = capsys.readouterr().out
    for c, name in enumerate(MULTI.names):
        y_val = _truth(val_rows, name)
        if not 0 < y_val.sum() < len(y_val):  # no positives or no negatives: no threshold, the reason given
            assert name not in points and "validation set" in metrics["operating_points_without_threshold"][name]
            continue
        fpr, tpr, thresholds = roc_curve(y_val, val_probs[:, c], drop_intermediate=False)
        finite = np.isfinite(thresholds)
        expected = thresholds[finite][np.argmax((tpr - fpr)[finite])]  # first maximum: the highest threshold
        point = points[name]
        assert np.float32(point["threshold"]) == expected, name
        assert point["rule"] == "youden" and point["validation_images"] == len(val_rows)
        assert point["validation_patients"] == len({r["Patient ID"] for r in val_rows})
        y_test = _truth(test_rows, name)
        tn, fp, fn, tp = confusion_matrix(y_test, test_probs[:, c] >= point["threshold"], labels=[0, 1]).ravel()
        reference = {
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None,
        }
        for rate in RATES:
            if reference[rate] is None:  # a zero denominator: None with its reason, never 0
                assert point[rate] is None and point["undefined"][rate], (name, rate)
                continue
            assert point[rate] == pytest.approx(reference[rate], abs=1e-12), (name, rate)
            low, high = point[f"{rate}_ci95_low"], point[f"{rate}_ci95_high"]
            assert low is not None and low <= point[rate] <= high, (name, rate)
        assert any(line.startswith(name) and "threshold" in line for line in printed.splitlines()), name
    assert "95% CIs from a patient-level bootstrap" in printed


def test_sensitivity_rule_takes_the_highest_threshold_reaching_the_target(tmp_path, phantom_dir):
    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, val_rows, _ = _split_by_patient(phantom_dir, tmp_path / "split")
    extra = ("--thresholds-from", val_csv, "--operating-point", "sensitivity=0.9", "--no-card")
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", *extra) == 0
    points = json.loads((tmp_path / "eval" / "metrics.json").read_text())["operating_points"]
    assert points
    val_probs = _probabilities(model, phantom_dir, val_rows)
    for name, point in points.items():
        c = MULTI.names.index(name)
        y, scores = _truth(val_rows, name), val_probs[:, c]
        threshold = np.float32(point["threshold"])
        assert point["rule"] == "sensitivity=0.9" and threshold in scores  # a candidate: one of the scores

        def sensitivity(t, y=y, scores=scores):
            return float(np.mean(scores[y == 1] >= t))

        assert sensitivity(threshold) >= 0.9, name
        higher = scores[scores > threshold]
        if len(higher):  # the next-higher candidate misses the target: the chosen one is the highest reaching it
            assert sensitivity(higher.min()) < 0.9, name


def test_thresholds_saved_in_config_and_card_and_predict_lists_findings(tmp_path, phantom_dir, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoConfig, AutoModelForImageClassification

    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, val_rows, _ = _split_by_patient(phantom_dir, tmp_path / "split")
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", "--thresholds-from", val_csv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    thresholds = {name: point["threshold"] for name, point in metrics["operating_points"].items()}
    assert thresholds
    saved = json.loads((model / "config.json").read_text())
    assert saved["hf_medvis_thresholds"] == thresholds
    assert saved["hf_medvis_operating_point"]["rule"] == "youden"
    assert saved["hf_medvis_operating_point"]["validation"].startswith(f"val.csv, {len(val_rows)} images, ")
    assert AutoConfig.from_pretrained(model).hf_medvis_thresholds == thresholds
    assert AutoModelForImageClassification.from_pretrained(model).config.hf_medvis_thresholds == thresholds
    card = ModelCard.load(model / "README.md")
    assert "## Operating points" in card.text and "| class | threshold | sensitivity | specificity | PPV | NPV |" in (
        card.text
    )
    for name, threshold in thresholds.items():
        assert f"| {name} | {threshold} | " in card.text
    assert "`youden`" in card.text and "val.csv" in card.text
    assert any(r.dataset_split == "test" for r in card.data.eval_results)
    # model-index: each class's sensitivity ("recall" on the Hub) and specificity at its threshold, as metrics.json has
    indexed = {r.metric_name.split(" ")[0]: r.metric_value for r in card.data.eval_results}
    for name, point in metrics["operating_points"].items():
        for rate in ("sensitivity", "specificity"):
            if point[rate] is not None:
                assert indexed[f"{rate}_{name}"] == pytest.approx(point[rate], abs=1e-4), (rate, name)
    assert {r.metric_type for r in card.data.eval_results} >= {"recall", "specificity"}
    capsys.readouterr()

    # predict on validation images too: their scores are the candidate thresholds, equal to one of them
    files = [str(phantom_dir / "images" / r["Image Index"]) for r in val_rows[:6]]
    files += [str(p) for p in sorted((phantom_dir / "images").glob("*.png"))[-6:]]
    assert cli_main(["predict", "--model", str(model), *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(files)
    for line in lines:
        probabilities = line["probabilities"]
        assert list(probabilities) == list(MULTI.names)
        expected = [c for c in MULTI.names if c in thresholds and probabilities[c] >= thresholds[c]]
        assert line["findings"] == expected, line
    # Evaluating again without --thresholds-from leaves the thresholds and their card section as they are.
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval2") == 0
    assert json.loads((model / "config.json").read_text())["hf_medvis_thresholds"] == thresholds
    assert ModelCard.load(model / "README.md").text.count("## Operating points") == 1


def test_predict_without_thresholds_has_no_findings(tmp_path, phantom_dir, capsys):
    model = _save_classifier(tmp_path / "model", MULTI)
    png = sorted((phantom_dir / "images").glob("*.png"))[:2]
    assert cli_main(["predict", "--model", str(model), *map(str, png)]) == 0
    assert all("findings" not in json.loads(line) for line in capsys.readouterr().out.splitlines())


def _one_error_line(capsys):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_refusals_are_one_line(tmp_path, phantom_dir, capsys):
    """Validation patients shared with the evaluated set, a single-label model, a bad rule: exit 2, one line, nothing
    written (no output folder, config.json as it was)."""
    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, _, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    config_before = (model / "config.json").read_bytes()
    out = tmp_path / "eval"
    # The whole labels.csv as validation: it holds every test patient.
    everything = phantom_dir / "labels.csv"
    assert _evaluate(model, phantom_dir, test_csv, out, "--thresholds-from", everything) == 2
    line = _one_error_line(capsys)
    shared = len({r["Patient ID"] for r in test_rows})
    assert f"shares {shared} patient(s)" in line and "other patients" in line, line
    for rule in ("sensitivity=1.5", "specificity=0", "sensitivity", "best"):
        assert (
            _evaluate(model, phantom_dir, test_csv, out, "--thresholds-from", val_csv, "--operating-point", rule) == 2
        )
        assert "--operating-point" in _one_error_line(capsys)
    assert _evaluate(model, phantom_dir, test_csv, out, "--operating-point", "youden") == 2
    assert "needs --thresholds-from" in _one_error_line(capsys)
    assert not out.exists() and (model / "config.json").read_bytes() == config_before

    single = _save_classifier(tmp_path / "single", LabelSpec(("Cardiomegaly", "Normal"), "single_label_classification"))
    assert _evaluate(single, phantom_dir, test_csv, out, "--thresholds-from", val_csv) == 2
    assert "operating points are per-class thresholds of multi-label models" in _one_error_line(capsys)
    assert not out.exists()


def test_undefined_rates_and_classes_without_threshold_are_said_so_never_zero():
    """A class without positives in the validation set gets no threshold (the reason instead); at a threshold above
    every evaluated score PPV has no denominator: None and why, never 0."""
    from hf_medvis.evaluation.metrics import metric_values
    from hf_medvis.evaluation.operating_points import (
        OperatingRule,
        choose_thresholds,
        operating_point_metrics,
        parse_operating_point,
    )

    spec = LabelSpec(("A", "B", "C"), "multi_label_classification")
    validation_truth = np.array([[1, 0, 1], [0, 0, 1], [1, 0, -1], [0, 0, 0]])
    validation_probs = np.array([[0.9, 0.2, 0.8], [0.1, 0.3, 0.7], [0.8, 0.4, 0.5], [0.2, 0.5, 0.1]], np.float32)
    thresholds, without = choose_thresholds(validation_truth, validation_probs, spec, OperatingRule("youden"))
    assert thresholds == {"A": np.float32(0.8), "C": np.float32(0.7)}
    assert without == {"B": "no positive image in the validation set"}
    assert choose_thresholds(validation_truth, validation_probs, spec, parse_operating_point("specificity=0.9"))[0][
        "C"
    ] == np.float32(0.7)

    truth = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1]])  # C: positives only
    probs = np.array([[0.5, 0.1, 0.2], [0.4, 0.9, 0.1], [0.3, 0.2, 0.3]], np.float32)
    groups = ["p1", "p2", "p3"]
    values = metric_values("operating_point", truth, probs, spec, np.array([0.8, np.nan, 0.7]))
    assert values == {"sensitivity_A": 0.0, "specificity_A": 1.0, "npv_A": 2 / 3, "sensitivity_C": 0.0, "npv_C": 0.0}
    points = operating_point_metrics(
        truth,
        probs,
        groups,
        spec,
        thresholds,
        rule=OperatingRule("youden"),
        validation_truth=validation_truth,
        validation_groups=["v1", "v2", "v3", "v4"],
        n_resamples=20,
    )
    assert set(points) == {"A", "C"}
    assert points["A"]["ppv"] is None and "no positive call" in points["A"]["undefined"]["ppv"]
    assert points["C"]["specificity"] is None and points["C"]["npv"] == 0.0  # a defined 0 stays 0
    assert points["C"]["validation_images"] == 3 and points["C"]["validation_patients"] == 3
    with pytest.raises(ValueError, match="multi-label"):
        metric_values("operating_point", truth, probs, LabelSpec(spec.names, "single_label_classification"), 0.5)


def test_a_class_the_evaluated_data_does_not_label_gets_no_operating_point(tmp_path, phantom_dir):
    """--label-map leaving Nodule unlabelled (null): not evaluated, so no threshold is chosen or saved for it."""
    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, _, _ = _split_by_patient(phantom_dir, tmp_path / "split")
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Nodule: null\n")
    extra = ("--thresholds-from", val_csv, "--label-map", label_map)
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", *extra) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["not_evaluated"] == ["Nodule"] and "Nodule" not in metrics["operating_points"]
    assert metrics["operating_points_without_threshold"]["Nodule"].startswith("not evaluated")
    assert "Nodule" not in json.loads((model / "config.json").read_text())["hf_medvis_thresholds"]
