"""`hf-medvis evaluate --calibrate`: temperatures fitted on the validation patients' negative log-likelihood (the same
as an independent scipy fit), saved into config.json and applied by `Predictor` / `hf-medvis predict`, thresholds
chosen on the calibrated probabilities, AUROC unchanged."""

import csv
import json

import numpy as np
import pytest
from test_evaluate_predict import MULTI, _save_classifier
from test_operating_points import _evaluate, _one_error_line, _split_by_patient

from hf_medvis.cli import main as cli_main
from hf_medvis.data.labels import LabelSpec

BOUNDS = (0.01, 100.0)


def _files(phantom_dir, rows):
    return [str(phantom_dir / "images" / r["Image Index"]) for r in rows]


def _raw_logits(model, files):
    """The model's own outputs for the files, computed here from its forward pass (no temperature anywhere)."""
    import torch

    from hf_medvis.data.transforms import normalize_batch
    from hf_medvis.evaluation import Predictor

    predictor = Predictor(model)
    batch = torch.stack([predictor.preprocess(f) for f in files])
    pixels = normalize_batch(batch, predictor.mean, predictor.std, predictor.model.config.num_channels)
    with torch.no_grad():
        return predictor.model(pixel_values=pixels).logits.float().numpy()


def _nll(y, z, temperature):
    s = z.astype(np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def _independent_fit(y, z):
    """The NLL-minimising temperature by scipy's L-BFGS-B over log T within the same bounds."""
    from scipy.optimize import minimize

    result = minimize(
        lambda x: _nll(y, z, np.exp(x[0])),
        x0=[0.0],
        method="L-BFGS-B",
        bounds=[(np.log(BOUNDS[0]), np.log(BOUNDS[1]))],
        options={"ftol": 1e-15, "gtol": 1e-12},
    )
    return float(np.exp(result.x[0]))


def _truth(rows, name):
    return np.array([name in r["Finding Labels"].split("|") for r in rows], dtype=int)


def test_fitted_temperatures_are_saved_and_applied_by_predict(tmp_path, phantom_dir, capsys):
    """Each class's T equals an independent fit on the validation logits (rel 1e-3) and lowers the validation NLL;
    config.json holds them; Predictor and `hf-medvis predict` give sigmoid(logit / T) of the raw logits; each
    threshold is one of the calibrated validation probabilities (fitted first, then chosen), and says so."""
    from hf_medvis.evaluation import Predictor

    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, val_rows, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", "--thresholds-from", val_csv, "--calibrate") == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    fitted = metrics["temperature"]["values"]
    without = metrics["temperature"].get("without_temperature", {})
    val_logits = _raw_logits(model, _files(phantom_dir, val_rows))
    for c, name in enumerate(MULTI.names):
        y, z = _truth(val_rows, name), val_logits[:, c]
        independent = _independent_fit(y, z)
        if not BOUNDS[0] * 1.01 < independent < BOUNDS[1] * 0.99:  # no estimate: the likelihood improves past the bound
            assert name not in fitted and "not calibrated" in without[name], name
            continue
        assert fitted[name] == pytest.approx(independent, rel=1e-3), name
        assert _nll(y, z, fitted[name]) <= _nll(y, z, 1.0), name
        assert (
            metrics["temperature"]["validation_nll_after"][name]
            <= metrics["temperature"]["validation_nll_before"][name]
        )
        assert {"validation_ece_before", "validation_ece_after"} <= set(metrics["temperature"])
    assert fitted  # at least one class with an informative fit (not on a bound)
    config = json.loads((model / "config.json").read_text())
    assert config["hf_medvis_temperature"] == fitted
    assert config["hf_medvis_operating_point"]["probabilities"].startswith("temperature-scaled")
    card = (model / "README.md").read_text()
    assert "temperature-scaled (logits / T, saved in config.json as `hf_medvis_temperature`" in card
    assert "Probabilities: temperature-scaled" in card  # the operating points section: which probabilities
    temperatures = np.array([fitted.get(name, 1.0) for name in MULTI.names], dtype=np.float32)

    # Predictor reads them from config.json: sigmoid(raw logit / T)
    files = _files(phantom_dir, test_rows)
    expected = 1 / (1 + np.exp(-_raw_logits(model, files).astype(np.float64) / temperatures))
    predictor = Predictor(model)
    assert np.allclose(predictor.predict(files), expected, atol=1e-6)
    val_probs = predictor.predict(_files(phantom_dir, val_rows))
    for name, point in metrics["operating_points"].items():  # chosen on the calibrated validation probabilities
        assert np.float32(point["threshold"]) in val_probs[:, MULTI.names.index(name)], name
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(model), *files[:5]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, row in zip(lines, expected[:5], strict=True):
        assert list(line["probabilities"].values()) == pytest.approx(row, abs=1e-6)


def test_auroc_is_unchanged_and_no_card_leaves_config_json_byte_identical(tmp_path, phantom_dir):
    """A positive per-class temperature keeps each class's order of images: the same AUROC; the calibration section
    describes the calibrated probabilities (Brier of sigmoid(logit / T))."""
    model = _save_classifier(tmp_path / "model", MULTI)
    val_csv, test_csv, _, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    before = (model / "config.json").read_bytes()
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "raw", "--no-card") == 0
    extra = ("--thresholds-from", val_csv, "--calibrate", "--no-card")
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "cal", *extra) == 0
    assert (model / "config.json").read_bytes() == before and not (model / "README.md").exists()
    raw = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    calibrated = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    for name in MULTI.names:
        assert calibrated[f"auroc_{name}"] == pytest.approx(raw[f"auroc_{name}"], abs=1e-12), name
    fitted = calibrated["temperature"]["values"]  # T = 1 (unscaled) for a class whose fit was not kept
    temperatures = np.array([fitted.get(n, 1.0) for n in MULTI.names], dtype=np.float32)
    probs = 1 / (1 + np.exp(-_raw_logits(model, _files(phantom_dir, test_rows)).astype(np.float64) / temperatures))
    for c, name in enumerate(MULTI.names):
        y = _truth(test_rows, name)
        assert calibrated["calibration"][name]["brier"] == pytest.approx(np.mean((probs[:, c] - y) ** 2), abs=1e-6)


def test_calibrate_needs_the_validation_set(tmp_path, phantom_dir, capsys):
    model = _save_classifier(tmp_path / "model", MULTI)
    _, test_csv, _, _ = _split_by_patient(phantom_dir, tmp_path / "split")
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", "--calibrate") == 2
    assert "--calibrate needs --thresholds-from" in _one_error_line(capsys)
    assert not (tmp_path / "eval").exists()


def test_single_label_models_get_one_temperature_for_all_classes(tmp_path, phantom_dir):
    """softmax(logits / T) with one T fitted on the validation patients' NLL; no threshold is chosen."""
    spec = LabelSpec(("Cardiomegaly", "Normal"), "single_label_classification")
    model = _save_classifier(tmp_path / "model", spec, pooling="mean")
    val_csv, test_csv, val_rows, test_rows = _split_by_patient(phantom_dir, tmp_path / "split")
    for path in (val_csv, test_csv):  # two classes: Cardiomegaly or Normal
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        for row in rows:
            row["Finding Labels"] = "Cardiomegaly" if "Cardiomegaly" in row["Finding Labels"] else "Normal"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    assert _evaluate(model, phantom_dir, test_csv, tmp_path / "eval", "--thresholds-from", val_csv, "--calibrate") == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics["temperature"]["values"]) == ["all"] and "operating_points" not in metrics
    temperature = metrics["temperature"]["values"]["all"]
    from scipy.optimize import minimize_scalar

    logits = _raw_logits(model, _files(phantom_dir, val_rows)).astype(np.float64)
    label = np.array(["Cardiomegaly" not in r["Finding Labels"] for r in val_rows], dtype=int)

    def nll(t):
        s = logits / t
        return float(np.mean(np.logaddexp.reduce(s, axis=1) - s[np.arange(len(s)), label]))

    independent = minimize_scalar(nll, bounds=BOUNDS, method="bounded", options={"xatol": 1e-10}).x
    assert temperature == pytest.approx(independent, rel=1e-3)
    assert json.loads((model / "config.json").read_text())["hf_medvis_temperature"] == {"all": temperature}
    from hf_medvis.evaluation import Predictor

    test_logits = _raw_logits(model, _files(phantom_dir, test_rows)).astype(np.float64) / temperature
    expected = np.exp(test_logits - np.logaddexp.reduce(test_logits, axis=1, keepdims=True))
    assert np.allclose(Predictor(model).predict(_files(phantom_dir, test_rows)), expected, atol=1e-6)


def test_a_fit_on_a_bound_is_not_kept_so_saturation_cannot_change_the_auroc():
    """A class the validation set separates perfectly drives T to the lower bound, where sigmoid(logit / T) is exactly
    0 or 1 in float32 for most images: those ties would lower the AUROC. Such a fit is no estimate and is not kept;
    neither is one that drives T to the upper bound (uninformative logits)."""
    from hf_medvis.data.labels import LabelSpec
    from hf_medvis.evaluation.calibration import fit_temperatures

    rng = np.random.default_rng(0)
    truth = np.repeat([[0, 0, 0], [1, 1, 1]], 40, axis=0)
    separated = np.where(truth[:, 0] == 1, 4.0, -4.0) + rng.normal(0, 0.5, 80)  # every positive above every negative
    noisy = rng.normal(0, 1e-3, 80)  # nothing to learn from
    informative = truth[:, 2] * 1.0 + rng.normal(0, 1.0, 80)  # overlapping: a finite T
    logits = np.stack([separated, noisy, informative], axis=1)
    spec = LabelSpec(("Separated", "Noise", "Overlapping"), "multi_label_classification")
    temperatures, reasons = fit_temperatures(truth, logits, spec)
    assert list(temperatures) == ["Overlapping"] and BOUNDS[0] < temperatures["Overlapping"] < BOUNDS[1]
    assert "separate it perfectly" in reasons["Separated"] and "almost no information" in reasons["Noise"]
