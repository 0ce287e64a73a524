"""`hf-medvis evaluate` (patient-bootstrap CIs, plots) and `hf-medvis predict` (JSON lines, DICOM and PNG)."""

import ast
import csv
import json

import numpy as np
import pytest
from conftest import write_csv

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
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 5000
    assert not (tmp_path / "eval" / "confusion.png").exists()
    assert "patient-level bootstrap" in capsys.readouterr().out
    # Calibration, recomputed by hand from the model's probabilities on the same rows: Brier = mean squared error,
    # ECE over 10 equal-mass bins of the sorted probabilities (the first N % 10 bins one image larger).
    from hf_medvis.evaluation import Predictor

    paths = [str(phantom_dir / "images" / r["Image Index"]) for r in test_rows]
    probs = Predictor(model).predict(paths)
    for c, name in enumerate(MULTI.names):
        y = np.array([name in r["Finding Labels"].split("|") for r in test_rows], dtype=float)
        p = probs[:, c].astype(float)
        order, n, ece, start = np.argsort(p, kind="stable"), len(p), 0.0, 0
        for b in range(10):
            size = n // 10 + (1 if b < n % 10 else 0)
            chunk = order[start : start + size]
            start += size
            ece += size / n * abs(y[chunk].mean() - p[chunk].mean())
        got = metrics["calibration"][name]
        assert got["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-9), name
        assert got["ece"] == pytest.approx(ece, abs=1e-9) and got["images"] == n, name


def test_ece_tells_calibrated_from_overconfident_probabilities():
    from hf_medvis.evaluation.calibration import expected_calibration_error

    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)  # calibrated by construction
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.clip(1.6 * (p - 0.5) + 0.5, 0, 1)) > 0.05  # overconfident


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


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_transformers_reads_a_saved_classifier_as_predict_does_or_refuses_it(tmp_path, phantom_dir, capsys, pooling):
    """A mean-pooled classifier is saved as its own model_type with its code beside the weights: plain transformers
    refuses it without trust_remote_code (a CLS-pooled reading would give other scores), and with it the pipeline gives
    `hf-medvis predict`'s scores. A CLS-pooled classifier stays a plain `vit` that loads without remote code."""
    from transformers import AutoModelForImageClassification, ViTForImageClassification, pipeline

    model = _save_classifier(tmp_path / "model", MULTI, pooling=pooling)
    config = json.loads((model / "config.json").read_text())
    png = sorted((phantom_dir / "images").glob("*.png"))[:3]
    assert cli_main(["predict", "--model", str(model), *map(str, png)]) == 0
    expected = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    if pooling == "mean":
        assert config["model_type"] == "hf_medvis_vit" and config["pooling"] == "mean"
        assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_hf_medvis_vit.")
        assert [p.name for p in model.glob("*.py")] == ["modeling_hf_medvis_vit.py"]
        # The saved code stands alone: a user of the folder needs torch and transformers, not hf_medvis.
        tree = ast.parse((model / "modeling_hf_medvis_vit.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert {name.split(".")[0] for name in imported} <= {"__future__", "typing", "torch", "transformers"}
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForImageClassification.from_pretrained(model)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            pipeline("image-classification", model=str(model))
        classify = pipeline("image-classification", model=str(model), trust_remote_code=True)
        assert type(classify.model).__module__.startswith("transformers_modules.")  # the saved file, not hf_medvis
        # What the refusal prevents: read as a CLS-pooled ViT, the same weights score differently.
        wrong = pipeline(
            "image-classification",
            model=ViTForImageClassification.from_pretrained(model),
            image_processor=classify.image_processor,
        )
        first = {r["label"]: r["score"] for r in wrong(str(png[0]), top_k=None)}
        assert max(abs(first[name] - expected[0][name]) for name in MULTI.names) > 1e-3
    else:
        assert config["model_type"] == "vit" and "auto_map" not in config and not list(model.glob("*.py"))
        assert type(AutoModelForImageClassification.from_pretrained(model)) is ViTForImageClassification
        classify = pipeline("image-classification", model=str(model))
    for file, scores in zip(png, expected, strict=True):
        got = {r["label"]: r["score"] for r in classify(str(file), top_k=None)}
        assert sorted(got) == sorted(scores)
        for name in MULTI.names:
            assert got[name] == pytest.approx(scores[name], abs=1e-4), (file.name, name)


def _random_case(problem_type, seed=0):
    """Random probabilities and labels, 40 images of 12 patients, with tied scores; the last class has no positives;
    multi-label: about 15% of the labels unknown (-1)."""
    rng = np.random.default_rng(seed)
    n, names = 40, ("Cardiomegaly", "Effusion", "Nodule", "Hernia")
    if problem_type == "multi_label_classification":
        labels = (rng.random((n, 4)) < 0.4).astype(int)
        labels[:, 3] = 0
        probs = np.round(0.3 * labels + rng.random((n, 4)) * 0.7, 1)  # rounded: ties, and scores on the threshold
        labels[rng.random((n, 4)) < 0.15] = -1
    else:
        labels = np.eye(4, dtype=int)[rng.integers(0, 3, n)]
        probs = rng.dirichlet(np.ones(4), n) + 0.5 * labels
        probs = np.round(probs / probs.sum(axis=1, keepdims=True), 2)  # rounded: ties
    groups = [f"p{i % 12:02d}" for i in range(n)]
    return labels, probs, groups, LabelSpec(names, problem_type)


def _sklearn_values(kind, labels, probs, spec, threshold=0.5):
    """The reference: scikit-learn's own functions, class by class on the known (not -1) labels of that class."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

    known = [labels[:, c] >= 0 for c in range(len(spec.names))]
    out = {}
    if kind in ("auroc", "ap"):
        score = roc_auc_score if kind == "auroc" else average_precision_score
        present = [c for c, k in enumerate(known) if 0 < labels[k, c].sum() < k.sum()]
        out = {f"{kind}_{spec.names[c]}": score(labels[known[c], c], probs[known[c], c]) for c in present}
        if out:
            out[f"{kind}_macro"] = np.mean(list(out.values()))
    elif kind == "accuracy":
        out["accuracy"] = accuracy_score(labels.argmax(1), probs.argmax(1))
    elif spec.multi_label:
        predicted = (probs >= threshold).astype(int)
        f1 = [f1_score(labels[k, c], predicted[k, c], zero_division=0) for c, k in enumerate(known)]
        out = {f"f1_{name}": v for name, v in zip(spec.names, f1, strict=True)}
        out["f1_macro"] = np.mean(f1)
    else:
        out["f1_macro"] = f1_score(
            labels.argmax(1), probs.argmax(1), average="macro", labels=range(len(spec.names)), zero_division=0
        )
    return out


MODULE_KINDS = {
    "multi_label_classification": {"auroc": "auroc", "average_precision": "ap", "f1": "f1"},
    "single_label_classification": {"auroc": "auroc", "average_precision": "ap", "accuracy": "accuracy", "f1": "f1"},
}


def test_metric_modules_load_offline_silently_and_fast(monkeypatch, capfd):
    """evaluate.load of each shipped module: no network (a connect raises), nothing printed, well under a second."""
    import socket
    import time
    import warnings

    import evaluate

    from hf_medvis.evaluation.metric_modules import MODULES, module_path

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in MODULES.values():
            start = time.perf_counter()
            module = evaluate.load(module_path(name))
            elapsed = time.perf_counter() - start
            assert module.name == name and elapsed < 1.0, (name, elapsed)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_metric_modules_are_in_the_wheel():
    """The module folders have no __init__.py: setup.cfg's namespace package discovery is what ships them."""
    import configparser
    from pathlib import Path

    from setuptools import find_namespace_packages

    from hf_medvis.evaluation.metric_modules import MODULES

    repo = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(repo / "setup.cfg")
    assert setup["options"]["packages"].strip() == "find_namespace:"
    include = setup["options.packages.find"]["include"].replace(",", " ").split()
    packages = find_namespace_packages(str(repo), include=include)
    for name in MODULES.values():
        assert f"hf_medvis.evaluation.evaluate_modules.{name}" in packages, name


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_metrics_and_patient_bootstrap_cis_equal_scikit_learn(problem_type):
    """The one implementation (metric_values, behind every path) against scikit-learn: tied scores, unknown (-1)
    labels, a class without positives; each CI against the percentiles of scikit-learn's values over the same
    resamples of patients (the images of each drawn patient)."""
    from hf_medvis.evaluation.metrics import metric_values

    labels, probs, groups, spec = _random_case(problem_type)
    kinds = list(MODULE_KINDS[problem_type].values())
    for threshold in (0.5, 0.3):
        for kind in kinds:
            expected = _sklearn_values(kind, labels, probs, spec, threshold)
            got = metric_values(kind, labels, probs, spec, threshold)
            assert sorted(got) == sorted(expected), kind  # Hernia (no positives) has no AUROC/AP
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, abs=1e-12), key
    n_resamples, seed = 20, 5
    intervals = bootstrap_confidence_intervals(
        labels, probs, groups, spec, n_resamples=n_resamples, seed=seed, kinds=kinds, threshold=0.3
    )
    patients, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    samples = {}
    for _ in range(n_resamples):
        rows = np.concatenate([np.flatnonzero(inverse == g) for g in rng.integers(0, len(patients), len(patients))])
        for kind in kinds:
            for key, value in _sklearn_values(kind, labels[rows], probs[rows], spec, 0.3).items():
                samples.setdefault(key, []).append(value)
    expected = {key: np.quantile(v, [0.025, 0.975]) for key, v in samples.items() if len(v) >= 10}
    assert sorted(intervals) == sorted(expected)
    for key, (low, high) in expected.items():
        assert intervals[key] == pytest.approx([low, high], abs=1e-12), key


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "single_label_classification"])
def test_metric_modules_compute_what_hf_medvis_computes(problem_type):
    """Each evaluate module is a thin wrapper: its numbers, CIs included, are those of metric_values and the patient
    bootstrap, and together they are what metrics_with_ci (recipes' final metrics, hf-medvis evaluate) writes."""
    from hf_medvis.evaluation import load_metric, metrics_with_ci
    from hf_medvis.evaluation.bootstrap import CI_KINDS
    from hf_medvis.evaluation.metrics import kinds_for, metric_values

    labels, probs, groups, spec = _random_case(problem_type)
    common = {"label_names": list(spec.names), "problem_type": problem_type, "threshold": 0.5}
    for name, kind in MODULE_KINDS[problem_type].items():
        module = load_metric(name)
        point = module.compute(predictions=probs, references=labels, **common)
        assert point == metric_values(kind, labels, probs, spec), name
        with_ci = module.compute(predictions=probs, references=labels, groups=groups, n_resamples=30, seed=5, **common)
        intervals = bootstrap_confidence_intervals(labels, probs, groups, spec, n_resamples=30, seed=5, kinds=[kind])
        assert with_ci == {
            **point,
            **{f"{key}_ci95_{side}": intervals[key][i] for key in point for i, side in enumerate(("low", "high"))},
        }, name
    final = metrics_with_ci(labels, probs, groups, spec, n_resamples=30, seed=5)
    through_modules = {}
    for kind in kinds_for(spec):
        n_resamples = 30 if kind in CI_KINDS else 0
        through_modules.update(
            load_metric(kind).compute(
                predictions=probs, references=labels, groups=groups, n_resamples=n_resamples, seed=5, **common
            )
        )
    assert {k: v for k, v in final.items() if k not in ("images", "patients")} == through_modules


def test_recipes_and_evaluate_write_the_same_keys_as_before_without_importing_evaluate():
    """compute_metrics and metrics_with_ci: their keys (and order) are the ones written before, and the training
    processes that call them never import `evaluate` (in 2-rank ZeRO-3 runs it made a rank abort at exit)."""
    import subprocess
    import sys

    from transformers import EvalPrediction

    from hf_medvis.evaluation import build_compute_metrics, metrics_with_ci, probabilities

    for problem_type, ci_keys in (
        ("multi_label_classification", ["auroc_Cardiomegaly", "auroc_Effusion", "auroc_Nodule", "auroc_macro"]),
        (
            "single_label_classification",
            ["auroc_Cardiomegaly", "auroc_Effusion", "auroc_Nodule", "auroc_macro", "accuracy"],
        ),
    ):
        labels, _, groups, spec = _random_case(problem_type)
        labels = np.maximum(labels, 0)  # every label known: every class but Hernia has its AUROC in each resample
        logits = np.random.default_rng(1).normal(size=labels.shape) + 2 * labels
        probs = probabilities(logits, spec)
        expected = classification_metrics(labels, probs, spec)
        if spec.multi_label:
            assert list(expected) == [
                *(f"{k}_{n}" for n in ("Cardiomegaly", "Effusion", "Nodule") for k in ("auroc", "ap")),
                *("auroc_macro", "ap_macro", "f1_macro"),
                *(f"f1_{n}" for n in spec.names),
            ]
        else:
            assert list(expected) == [
                *(f"auroc_{n}" for n in ("Cardiomegaly", "Effusion", "Nodule")),
                *("auroc_macro", "accuracy", "f1_macro"),
            ]
        label_ids = labels.astype(np.float32) if spec.multi_label else labels.argmax(1)
        computed = build_compute_metrics(spec)(EvalPrediction(predictions=logits, label_ids=label_ids))
        assert list(computed) == list(expected)
        assert computed == pytest.approx(expected, abs=1e-12)
        final = metrics_with_ci(labels, probs, groups, spec, n_resamples=50, seed=1)
        bounds = [f"{k}_ci95_{side}" for k in ci_keys for side in ("low", "high")]
        assert list(final) == [*expected, *bounds, "images", "patients"]
        intervals = bootstrap_confidence_intervals(labels, probs, groups, spec, n_resamples=50, seed=1)
        assert [final[f"{k}_ci95_low"] for k in ci_keys] == [intervals[k][0] for k in ci_keys]
        assert final["images"] == 40 and final["patients"] == 12
    code = (
        "import sys, numpy as np\n"
        "from hf_medvis.data.labels import LabelSpec\n"
        "from hf_medvis.evaluation import build_compute_metrics, metrics_with_ci\n"
        "from transformers import EvalPrediction\n"
        "spec = LabelSpec(('A', 'B'), 'multi_label_classification')\n"
        "y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)\n"
        "build_compute_metrics(spec)(EvalPrediction(predictions=y, label_ids=y))\n"
        "metrics_with_ci(y, y * 0.5, ['a', 'b', 'c', 'd'], spec, n_resamples=20)\n"
        "print('evaluate' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_evaluate_refuses_labels_whose_classes_are_not_the_models(tmp_path, phantom_dir, capsys):
    """A labels file with other classes than the model's is refused before anything is scored: exit 2, one line
    listing both sets, no output folder, the model card byte for byte as it was (evaluate exited 0, wrote metrics and
    changed the card). ``--label-names`` scores the model's classes of a file that has more, and then the card is
    updated."""
    model = _save_classifier(tmp_path / "model", MULTI)
    card = model / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# tiny classifier\n")
    before = card.read_bytes()
    rows = list(csv.DictReader((phantom_dir / "labels.csv").read_text().splitlines()))
    nih = [
        [r["Image Index"], r["Patient ID"], r["Finding Labels"].replace("Effusion", "Pleural Effusion")] for r in rows
    ]
    renamed = write_csv(tmp_path / "renamed.csv", ["Image Index", "Patient ID", "Finding Labels"], nih)
    wide_rows = [
        [r["Image Index"], r["Patient ID"], *("1" if c in r["Finding Labels"] else "0" for c in MULTI.names), "0"]
        for r in rows
    ]
    extra = write_csv(tmp_path / "extra.csv", ["Image Index", "Patient ID", *MULTI.names, "Pneumonia"], wide_rows)
    fewer = write_csv(
        tmp_path / "fewer.csv", ["Image Index", "Patient ID", *MULTI.names[:2]], [r[:4] for r in wide_rows]
    )
    more = [  # the model's classes, plus a finding it was not trained on in every third image
        [r["Image Index"], r["Patient ID"], r["Finding Labels"] + ("|Pneumonia" if i % 3 == 0 else "")]
        for i, r in enumerate(rows)
    ]
    nih_extra = write_csv(tmp_path / "more.csv", ["Image Index", "Patient ID", "Finding Labels"], more)
    model_line = "model Cardiomegaly, Effusion, Nodule; file "
    cases = [
        (renamed, [], "(missing: Effusion; extra: Pleural Effusion): the class names must match the model's exactly"),
        (extra, ["--labels-format", "wide"], "(extra: Pneumonia): the class names must match the model's exactly "
         "(spelling and case), or pass --label-names Cardiomegaly Effusion Nodule to score the model's classes only"),
        (fewer, ["--labels-format", "wide"], "file Cardiomegaly, Effusion (missing: Nodule)"),
        (nih_extra, [], "(extra: Pneumonia): the class names must match the model's exactly (spelling and case), or "
         "pass --label-names Cardiomegaly Effusion Nodule"),
    ]  # fmt: skip
    evaluate = ["evaluate", "--model", str(model), "--data", str(phantom_dir / "images"), "--bootstrap", "20"]
    for labels, extra_args, expected in cases:
        code = cli_main([*evaluate, "--labels", str(labels), "--out", str(tmp_path / "eval"), *extra_args])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert model_line in errors[0] and expected in errors[0], errors[0]
        assert not (tmp_path / "eval").exists()
        assert card.read_bytes() == before

    chosen = ["--label-names", *MULTI.names]  # nih: the classes to score (wide: the columns, as before)
    assert cli_main([*evaluate, "--labels", str(nih_extra), "--out", str(tmp_path / "eval"), *chosen]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == len(rows)
    assert card.read_bytes() != before
