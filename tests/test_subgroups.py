"""`hf-medvis evaluate --subgroups`: per-subgroup AUROC (and sensitivity / specificity at the validation thresholds)
equal to scikit-learn's on the subgroup's rows, too-small classes without a number, the largest gap with a bootstrap
CI, refusals in one line, and the same numbers from a CheXpert-style wide labels file."""

import csv
import json

import numpy as np
import pytest
from test_evaluate_predict import MULTI, _save_classifier
from test_operating_points import _one_error_line, _split_by_patient

from hf_medvis.cli import main as cli_main

AGE_BINS = "Patient Age:0,40,60,120"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """80 phantom patients (199 images, 32 px PNGs): enough positives per class for subgroups of a test half."""
    from hf_medvis.data.phantoms import write_phantom_dataset

    base = tmp_path_factory.mktemp("subgroups")
    folder = write_phantom_dataset(base / "set", patients=80, seed=3, image_size=32, dicom=False)
    model = _save_classifier(base / "model", MULTI)
    val_csv, test_csv, val_rows, test_rows = _split_by_patient(folder, base / "split")
    return folder, model, val_csv, test_csv, val_rows, test_rows


def _evaluate(folder, model, labels, out, *extra, card=False):
    args = ["evaluate", "--model", str(model), "--data", str(folder / "images"), "--labels", str(labels)]
    return cli_main([*args, "--out", str(out), "--bootstrap", "50", *([] if card else ["--no-card"]), *map(str, extra)])


def _age_bin(age):
    age = float(age)
    if not 0 <= age <= 120:
        return "out of range"
    return "[0, 40)" if age < 40 else "[40, 60)" if age < 60 else "[60, 120]"


def _truth(rows):
    return np.array([[name in r["Finding Labels"].split("|") for name in MULTI.names] for r in rows], dtype=int)


def test_subgroup_metrics_equal_scikit_learn_on_the_subgroup_rows(cohort, tmp_path, capsys):
    """Per subgroup of a categorical (Patient Gender) and a binned (Patient Age) column: AUROC per class is
    roc_auc_score on its rows, macro their mean, sensitivity / specificity are confusion_matrix's at the thresholds
    chosen once on the validation patients; a class with fewer than 5 positives or negatives has no number and says
    why; the largest gap is max - min of the subgroup values, its bootstrap CI around it."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    from hf_medvis.evaluation import Predictor

    folder, model, val_csv, test_csv, _, test_rows = cohort
    out = tmp_path / "eval"
    extra = ("--thresholds-from", val_csv, "--subgroups", "Patient Gender", AGE_BINS)
    assert _evaluate(folder, model, test_csv, out, *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    thresholds = {name: point["threshold"] for name, point in metrics["operating_points"].items()}
    assert thresholds
    probs = Predictor(model).predict([str(folder / "images" / r["Image Index"]) for r in test_rows])
    truth = _truth(test_rows)
    groupings = {
        "Patient Gender": np.array([r["Patient Gender"] for r in test_rows]),
        "Patient Age": np.array([_age_bin(r["Patient Age"]) for r in test_rows]),
    }
    assert list(metrics["subgroups"]) == list(groupings)
    checked = {"scored": 0, "too_small": 0, "rates": 0}
    for column, labels in groupings.items():
        groups = metrics["subgroups"][column]
        assert set(groups) - {"_largest_gap"} == set(labels)
        assert sum(groups[value]["images"] for value in set(labels)) == len(test_rows)  # every image in one subgroup
        for value in set(labels):
            rows = np.flatnonzero(labels == value)
            entry = groups[value]
            assert entry["images"] == len(rows)
            assert entry["patients"] == len({test_rows[i]["Patient ID"] for i in rows})
            assert entry["positives"] == {name: int(truth[rows, c].sum()) for c, name in enumerate(MULTI.names)}
            scored = []
            for c, name in enumerate(MULTI.names):
                y, p = truth[rows, c], probs[rows, c]
                positives, negatives = int(y.sum()), int(len(y) - y.sum())
                if positives < 5 or negatives < 5:
                    assert entry["too_small"][name] == (
                        f"{positives} positives, {negatives} negatives (needs 5 of each)"
                    )
                    assert not any(key.endswith(f"_{name}") or f"_{name}_" in key for key in entry), (value, name)
                    checked["too_small"] += 1
                    continue
                auroc = roc_auc_score(y, p)
                scored.append(auroc)
                assert entry[f"auroc_{name}"] == pytest.approx(auroc, abs=1e-12), (column, value, name)
                low, high = entry[f"auroc_{name}_ci95_low"], entry[f"auroc_{name}_ci95_high"]
                assert low <= entry[f"auroc_{name}"] <= high
                checked["scored"] += 1
                if name in thresholds:  # the validation threshold, not one chosen on the subgroup
                    tn, fp, fn, tp = confusion_matrix(y, p >= thresholds[name], labels=[0, 1]).ravel()
                    assert entry[f"sensitivity_{name}"] == pytest.approx(tp / (tp + fn), abs=1e-12)
                    assert entry[f"specificity_{name}"] == pytest.approx(tn / (tn + fp), abs=1e-12)
                    checked["rates"] += 1
            if scored:
                assert entry["auroc_macro"] == pytest.approx(np.mean(scored), abs=1e-12)
            else:
                assert "auroc_macro" not in entry
        for metric, gap in groups["_largest_gap"].items():
            found = {value: groups[value][metric] for value in set(labels) if metric in groups[value]}
            assert len(found) >= 2
            assert gap["gap"] == pytest.approx(max(found.values()) - min(found.values()), abs=1e-12), metric
            assert found[gap["groups"][0]] == max(found.values()) and found[gap["groups"][1]] == min(found.values())
            assert gap["ci95_low"] <= gap["gap"] <= gap["ci95_high"], (column, metric, gap)
        assert "auroc_macro" in groups["_largest_gap"]
    assert checked["scored"] >= 6 and checked["too_small"] >= 2 and checked["rates"] >= 6, checked
    printed = capsys.readouterr().out
    assert "subgroups by Patient Gender" in printed and "subgroups by Patient Age" in printed
    assert "largest gap, auroc_macro:" in printed and "too few" in printed


def test_values_outside_the_bins_are_their_own_group(cohort, tmp_path):
    folder, model, _, test_csv, _, test_rows = cohort
    assert _evaluate(folder, model, test_csv, tmp_path / "eval", "--subgroups", "Patient Age:0,40,60") == 0
    groups = json.loads((tmp_path / "eval" / "metrics.json").read_text())["subgroups"]["Patient Age"]
    older = sum(float(r["Patient Age"]) > 60 for r in test_rows)
    assert older and groups["out of range"]["images"] == older
    assert list(groups)[:2] == ["[0, 40)", "[40, 60]"]  # the last bin holds its upper edge
    assert sum(entry["images"] for name, entry in groups.items() if name != "_largest_gap") == len(test_rows)


def test_a_missing_column_or_a_non_numeric_binned_value_is_refused_in_one_line(cohort, tmp_path, capsys):
    folder, model, _, test_csv, _, test_rows = cohort
    out = tmp_path / "eval"
    assert _evaluate(folder, model, test_csv, out, "--subgroups", "Patient Sex") == 2
    line = _one_error_line(capsys)
    assert "no column 'Patient Sex'" in line and "Patient Gender" in line and "Patient Age" in line, line

    with open(test_csv, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows[3]["Patient Age"] = "unknown"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    assert _evaluate(folder, model, bad, out, "--subgroups", AGE_BINS) == 2
    line = _one_error_line(capsys)
    assert "Patient Age" in line and "'unknown' is not a number" in line, line
    for edges in ("Patient Age:60,40", "Patient Age:40", "Patient Age:0,forty"):
        assert _evaluate(folder, model, test_csv, out, "--subgroups", edges) == 2
        assert "bin edges must be two or more increasing numbers" in _one_error_line(capsys)
    assert not out.exists()


def test_a_wide_labels_file_gives_the_same_subgroup_numbers(cohort, tmp_path):
    """The test rows rewritten CheXpert-style (Path, Sex, Age, Frontal/Lateral, one 1/0 column per class; the patient
    from the path) give the numbers of the NIH file, subgroup by subgroup."""
    folder, model, _, test_csv, _, test_rows = cohort
    wide = tmp_path / "wide.csv"
    sexes = {"F": "Female", "M": "Male"}
    with open(wide, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", *MULTI.names])
        for r, labels in zip(test_rows, _truth(test_rows), strict=True):
            writer.writerow([f"images/{r['Image Index']}", sexes[r["Patient Gender"]], r["Patient Age"], "Frontal",
                             *map(str, labels)])  # fmt: skip
    assert _evaluate(folder, model, test_csv, tmp_path / "nih", "--subgroups", "Patient Gender", AGE_BINS) == 0
    wide_flags = ("--labels-format", "wide", "--patient-regex", r"^images/0*(\d+)_")
    extra = ("--subgroups", "Sex", "Age:0,40,60,120", *wide_flags)
    assert _evaluate(folder, model, wide, tmp_path / "wide", *extra) == 0
    nih = json.loads((tmp_path / "nih" / "metrics.json").read_text())["subgroups"]
    got = json.loads((tmp_path / "wide" / "metrics.json").read_text())["subgroups"]
    gap = nih["Patient Gender"].pop("_largest_gap")
    for entry in gap.values():
        entry["groups"] = [sexes[value] for value in entry["groups"]]
    assert got["Sex"] == {**{sexes[value]: entry for value, entry in nih["Patient Gender"].items()},
                          "_largest_gap": gap}  # fmt: skip
    assert got["Age"] == nih["Patient Age"]


def test_the_model_card_has_the_subgroups_table(cohort, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    folder, model, _, test_csv, _, _ = cohort
    model = shutil.copytree(model, tmp_path / "model")  # the shared model folder stays without a card
    assert _evaluate(folder, model, test_csv, tmp_path / "eval", "--subgroups", "Patient Gender", card=True) == 0
    groups = json.loads((tmp_path / "eval" / "metrics.json").read_text())["subgroups"]["Patient Gender"]
    text = ModelCard.load(model / "README.md").text
    assert "### Subgroups" in text and "| column | value | images | patients | macro AUROC (95% CI) |" in text
    for value in ("F", "M"):
        entry = groups[value]
        assert (
            f"| Patient Gender | {value} | {entry['images']} | {entry['patients']} | {entry['auroc_macro']:.3f} ("
            in (text)
        )
    gap = groups["_largest_gap"]["auroc_macro"]
    assert (
        f"Largest gap by Patient Gender, macro AUROC: {gap['groups'][0]} - {gap['groups'][1]} = {gap['gap']:.3f}"
        in (text)
    )


def test_ages_as_dicom_age_strings_fall_in_the_bins_of_their_years():
    """NIH's first release and DICOM's PatientAge write ages as "058Y" / "006M" / "010W": binned by their years."""
    from hf_medvis.evaluation.subgroups import parse_subgroup_columns

    (age,) = parse_subgroup_columns([AGE_BINS])
    assert [age.group_of(v) for v in ("058Y", "58", "006M", "010W", "060y", "121Y")] == [
        "[40, 60)",
        "[40, 60)",
        "[0, 40)",
        "[0, 40)",
        "[60, 120]",
        "out of range",
    ]
