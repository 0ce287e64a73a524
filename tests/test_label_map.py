"""Label maps (external validation): `read_label_map`, the mapping of one Finding Labels text, the shipped map of the
public datasets, and `hf-medvis evaluate --label-map` scored against scikit-learn."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from conftest import write_csv
from test_evaluate_predict import MULTI, _save_classifier

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelError
from hf_medvis.data.labels.label_map import (
    CANONICAL_FINDINGS,
    PUBLIC_FINDING_NAMES,
    default_label_map,
    load_label_map,
    map_finding_labels,
    read_label_map,
)

NIH14 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
         "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")  # fmt: skip
CHEXPERT_ONLY = ("Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "Pleural Other",
                 "Support Devices")  # fmt: skip


def test_read_label_map_compares_names_without_case_or_surrounding_spaces(tmp_path):
    yaml_map = tmp_path / "map.yaml"
    yaml_map.write_text("'  Pleural Effusion ': Effusion\nLUNG LESION: ' Nodule '\nOther lesion: null\nILD: []\n"
                        "pleural effusion: Effusion\n")  # fmt: skip
    expected = {"pleural effusion": "Effusion", "lung lesion": "Nodule", "other lesion": None, "ild": None}
    assert read_label_map(yaml_map) == expected
    json_map = tmp_path / "map.json"
    json_map.write_text(json.dumps({"Pleural Effusion": "Effusion", "lung Lesion": "Nodule", "Other Lesion": None,
                                    "ILD": ""}))  # fmt: skip
    assert read_label_map(json_map) == expected
    # The shipped file's shape (the map under "map", documentation beside it) reads as its map.
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"_notes": ["x"], "map": {"Pleural Effusion": "Effusion"}}))
    assert read_label_map(wrapped) == {"pleural effusion": "Effusion"}


@pytest.mark.parametrize(
    ("file_name", "content", "expected"),
    [
        ("list.yaml", "- Effusion\n- Nodule\n", "expected a mapping of finding names to class names, got a list"),
        ("empty.yaml", "", "expected a mapping of finding names to class names, got nothing"),
        ("number.yaml", "Effusion: 3\n", "'Effusion' maps to int 3; a name maps to one class name"),
        ("several.yaml", "Nodule/Mass: [Nodule, Mass]\n", "'Nodule/Mass' maps to a list (Nodule, Mass)"),
        ("nested.yaml", "Effusion: {a: b}\n", "'Effusion' maps to a mapping"),
        ("key.yaml", "1: Effusion\n", "the key 1 is not a finding name"),
        ("spellings.yaml", "Pleural Effusion: Effusion\n' pleural effusion': Nodule\n",
         "'Pleural Effusion' -> Effusion and ' pleural effusion' -> Nodule name one finding"),
        ("twice.yaml", "Effusion: Effusion\nEffusion: Nodule\n", "'Effusion' is listed twice, -> Effusion and -> Nodule"),
        ("twice.json", '{"Effusion": "Effusion", "Effusion": null}', "'Effusion' is listed twice"),
        ("broken.yaml", "Effusion: [Nodule\n", "is not valid YAML"),
        ("broken.json", '{"Effusion": ', "is not valid JSON"),
    ],
)  # fmt: skip
def test_read_label_map_refuses_a_bad_map_in_one_line_naming_file_and_entry(tmp_path, file_name, content, expected):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(LabelError) as caught:
        read_label_map(path)
    message = str(caught.value)
    assert "\n" not in message and file_name in message and expected in message, message


CLASSES = ("Cardiomegaly", "Effusion", "Nodule")
MAP = {"pleural effusion": "Effusion", "lung lesion": "Nodule", "other lesion": None, "lung opacity": "Lung Opacity"}


@pytest.mark.parametrize(
    ("text", "expected", "ignored"),
    [
        ("Pleural Effusion|Lung Lesion", "Effusion|Nodule", {}),
        ("?pleural effusion|LUNG LESION", "Nodule|?Effusion", {}),  # unknowns are renamed and stay unknown
        ("?Pleural Effusion|pleural effusion ", "Effusion", {}),  # a positive wins over an unknown of the same class
        ("Cardiomegaly|Other lesion", "Cardiomegaly", {"Other lesion": 1}),  # a model class not in the map: itself
        ("Other lesion", "No Finding", {"Other lesion": 1}),  # labelled; its findings are none of the classes
        ("Lung Opacity|?Mystery", "No Finding", {"Lung Opacity": 1, "Mystery": 1}),  # mapped to no model class
        ("?Effusion|Nodule|?Cardiomegaly", "Nodule|?Effusion|?Cardiomegaly", {}),
        ("cardiomegaly", "No Finding", {"cardiomegaly": 1}),  # outside the map, a name counts only if spelt exactly
        ("No Finding", "No Finding", {}),
        ("", "", {}),  # unlabelled stays unlabelled
        (None, None, {}),
    ],
)
def test_map_finding_labels(text, expected, ignored):
    counts = Counter()
    assert map_finding_labels(text, MAP, CLASSES, counts) == expected
    assert dict(counts) == ignored


def test_the_public_map_maps_onto_the_canonical_classes_and_documents_its_sources(tmp_path):
    assert (*NIH14, *CHEXPERT_ONLY) == CANONICAL_FINDINGS
    mapping = default_label_map()
    assert mapping == load_label_map("public")
    assert all(key == key.strip().lower() for key in mapping)
    assert set(mapping.values()) <= set(CANONICAL_FINDINGS)
    assert not {"no finding", "normal", "no lung opacity / not normal", "target"} & set(mapping)
    for dataset, names in PUBLIC_FINDING_NAMES["datasets"].items():
        assert all(name.lower() in mapping for name in names["mapped"]), dataset
        assert not [name for name in names["not_mapped"] if name.lower() in mapping], dataset
    listed = {name.lower() for names in PUBLIC_FINDING_NAMES["datasets"].values() for name in names["mapped"]}
    assert set(mapping) == listed  # every name of the map says which dataset it comes from
    datasets = PUBLIC_FINDING_NAMES["datasets"]
    assert {n: mapping[n.lower()] for n in datasets["NIH ChestX-ray14"]["mapped"]} == {n: n for n in NIH14}
    assert mapping["pleural effusion"] == "Effusion" and mapping["lung lesion"] == "Lung Lesion"
    assert mapping["nodule/mass"] == mapping["nodule or mass"] == "Lung Lesion"  # neither a Nodule nor a Mass
    # The file reads as a label map of its own (a user copies and edits it).
    from importlib import resources

    shipped = resources.files("hf_medvis.data.labels").joinpath("public_names.json")
    copy = tmp_path / "public_names.json"
    copy.write_text(shipped.read_text())
    assert read_label_map(copy) == mapping


# --- hf-medvis evaluate --label-map ---------------------------------------------------------------------------------


def _phantom_rows(phantom_dir):
    return list(csv.DictReader((phantom_dir / "labels.csv").read_text().splitlines()))


def _probabilities(model, phantom_dir, rows):
    from hf_medvis.evaluation import Predictor

    return Predictor(model).predict([str(phantom_dir / "images" / row["Image Index"]) for row in rows])


def _evaluate(model, phantom_dir, labels, out, *extra):
    argv = ["evaluate", "--model", str(model), "--data", str(phantom_dir / "images"), "--labels", str(labels)]
    return cli_main([*argv, "--out", str(out), "--bootstrap", "20", *extra])


def _expected(truth: dict[str, np.ndarray], probs: np.ndarray) -> dict[str, float]:
    """scikit-learn's AUROC, AP and F1 (threshold 0.5) of each class on its known (not -1) labels, and the macros."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    out = {}
    for name, y in truth.items():
        known, p = y >= 0, probs[:, MULTI.names.index(name)]
        out[f"auroc_{name}"] = roc_auc_score(y[known], p[known])
        out[f"ap_{name}"] = average_precision_score(y[known], p[known])
        out[f"f1_{name}"] = f1_score(y[known], p[known] >= 0.5, zero_division=0)
    for kind in ("auroc", "ap", "f1"):
        out[f"{kind}_macro"] = np.mean([out[f"{kind}_{name}"] for name in truth])
    return out


def test_evaluate_with_a_label_map_scores_the_mapped_classes_and_not_the_unlabelled_one(tmp_path, phantom_dir, capsys):
    """A dataset that spells Effusion 'pleural effusion' (some uncertain: '?'), Cardiomegaly 'Enlarged heart', has
    findings the model lacks and does not label Nodule at all: each mapped class scores what scikit-learn gives on
    the mapped labels; Nodule has no number anywhere (metrics, macros, per-class table, card) and is named as not
    evaluated; the ignored names are listed with their counts."""
    model = _save_classifier(tmp_path / "model", MULTI)
    rows = _phantom_rows(phantom_dir)
    effusion, cardiomegaly, texts = [], [], []
    for i, row in enumerate(rows):
        found = row["Finding Labels"].split("|")
        names = []
        if "Cardiomegaly" in found:
            names.append("Enlarged heart")
        if "Effusion" in found:
            names.append("pleural effusion")
        elif i % 7 == 3:
            names.append("?Pleural Effusion")  # uncertain: neither a positive nor a negative
        if i % 4 == 0:
            names.append("Other lesion")
        if i % 5 == 0:
            names.append("calcification")
        texts.append("|".join(names) or "No Finding")
        cardiomegaly.append(int("Cardiomegaly" in found))
        effusion.append(1 if "Effusion" in found else -1 if i % 7 == 3 else 0)
    labels = write_csv(
        tmp_path / "external.csv",
        ["Image Index", "Patient ID", "Finding Labels"],
        [[row["Image Index"], row["Patient ID"], text] for row, text in zip(rows, texts, strict=True)],
    )
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Pleural Effusion: Effusion\nenlarged heart: Cardiomegaly\ncalcification: null\n")
    capsys.readouterr()
    assert _evaluate(model, phantom_dir, labels, tmp_path / "eval", "--label-map", str(label_map)) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    truth = {"Cardiomegaly": np.array(cardiomegaly), "Effusion": np.array(effusion)}
    expected = _expected(truth, _probabilities(model, phantom_dir, rows))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert metrics["not_evaluated"] == ["Nodule"] and metrics["images"] == len(rows)
    assert not [key for key in metrics if "Nodule" in key]
    assert "not evaluated (the dataset does not label them): Nodule" in out
    other, calcification = (
        sum(1 for i in range(len(rows)) if i % 4 == 0),
        sum(1 for i in range(len(rows)) if i % 5 == 0),
    )
    assert f"Other lesion ({other})" in err and f"calcification ({calcification})" in err
    per_class = {row["class"]: row for row in json.loads((tmp_path / "eval" / "per_class.json").read_text())}
    assert per_class["Nodule"] == {"class": "Nodule", "evaluated": False} and "auroc" in per_class["Effusion"]
    card = (model / "README.md").read_text()
    assert "Not evaluated (the test data does not label them): Nodule" in card
    assert "auroc_macro over 2 of 3 classes" in card
    nodule_row = next(line for line in card.splitlines() if line.startswith("Nodule "))
    assert nodule_row.split()[1:] == ["n/a", "n/a", "n/a"]


def test_evaluate_label_map_public_with_a_wide_file_and_label_names(tmp_path, phantom_dir, capsys):
    """A CheXpert-style wide file read with --label-names: its class columns are mapped by the shipped map
    ('Pleural Effusion' -> Effusion, -1 masked), a column the map leaves out is ignored, and the model classes no
    chosen column provides are not evaluated."""
    model = _save_classifier(tmp_path / "model", MULTI)
    rows = _phantom_rows(phantom_dir)
    effusion = np.array(
        [1 if "Effusion" in r["Finding Labels"] else -1 if i % 6 == 1 else 0 for i, r in enumerate(rows)]
    )
    wide = [
        [r["Image Index"], r["Patient ID"], {1: "1.0", -1: "-1.0", 0: "0.0"}[int(e)],
         "1" if "Cardiomegaly" in r["Finding Labels"] else "0", "1" if i % 3 == 0 else "0"]
        for i, (r, e) in enumerate(zip(rows, effusion, strict=True))
    ]  # fmt: skip
    header = ["Image Index", "Patient ID", "Pleural Effusion", "Cardiomegaly", "Aortic enlargement"]
    labels = write_csv(tmp_path / "wide.csv", header, wide)
    chosen = ["--labels-format", "wide", "--label-names", "Pleural Effusion", "Aortic enlargement"]
    capsys.readouterr()
    assert _evaluate(model, phantom_dir, labels, tmp_path / "eval", "--label-map", "public", *chosen) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = _expected({"Effusion": effusion}, _probabilities(model, phantom_dir, rows))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert metrics["not_evaluated"] == ["Cardiomegaly", "Nodule"]
    assert not [key for key in metrics if "Cardiomegaly" in key or "Nodule" in key]
    assert "not evaluated (the dataset does not label them): Cardiomegaly, Nodule" in out
    assert f"Aortic enlargement ({sum(1 for i in range(len(rows)) if i % 3 == 0)})" in err


def test_evaluate_refuses_a_label_map_that_gives_no_model_class(tmp_path, phantom_dir, capsys):
    """A bad map file fails before the model is loaded; a map under which no finding of the file is a model class is
    refused before anything is written: exit 2, one line each."""
    model = _save_classifier(tmp_path / "model", MULTI)
    rows = _phantom_rows(phantom_dir)
    labels = write_csv(
        tmp_path / "other.csv",
        ["Image Index", "Patient ID", "Finding Labels"],
        [[r["Image Index"], r["Patient ID"], "Pneumothorax" if i % 2 else "No Finding"] for i, r in enumerate(rows)],
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("- Effusion\n")
    cases = [
        (str(tmp_path / "no_model"), str(bad), "label map bad.yaml: expected a mapping"),
        (str(model), "public", "--label-map: none of the findings of other.csv (Pneumothorax) maps to a class of the "
         "model (Cardiomegaly, Effusion, Nodule)"),
    ]  # fmt: skip
    for model_dir, label_map, expected in cases:
        code = _evaluate(model_dir, phantom_dir, labels, tmp_path / "eval", "--label-map", label_map)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and expected in errors[0], err
        assert not (tmp_path / "eval").exists()
