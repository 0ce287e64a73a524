"""The ViT fine-tuning recipe: a short in-process run from an MAE output, its Hub-ready outputs, and bad input."""

import csv
import json
import shutil

import pytest
from conftest import load_recipe, write_csv

TINY = (
    "--max_steps 4 --per_device_train_batch_size 8 --logging_steps 1 --eval_steps 2 --save_steps 2 "
    "--validation_split_percentage 30 --ci_bootstrap_samples 50 --early_stopping_patience 3 --eval_subsample 8"
).split()


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("finetune_vit")


@pytest.fixture(scope="module")
def finetuned(recipe, tmp_path_factory, phantom_dir, tiny_mae_dir):
    """One short in-process run from the MAE output, shared by the output checks."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("ft") / "run"
    log = io.StringIO()
    with redirect_stdout(log):  # setup_logging logs to stdout
        metrics = recipe.main(
            [
                "--train_data",
                str(phantom_dir / "images"),
                "--model_name_or_path",
                str(tiny_mae_dir),
                "--output_dir",
                str(out),
                "--pos_weight",
                "true",
                "--dataset_id",
                "me/cxr-phantoms",
                *TINY,
            ]
        )
    return out, metrics, log.getvalue()


def test_run_from_mae_writes_a_hub_ready_classifier(finetuned, phantom_dir):
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, ViTForImageClassification

    out, metrics, log = finetuned
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "Cardiomegaly", 1: "Effusion", 2: "Nodule"}
    assert model.config.label2id == {"Cardiomegaly": 0, "Effusion": 1, "Nodule": 2}
    assert model.config.problem_type == "multi_label_classification"
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    processor = AutoImageProcessor.from_pretrained(out)
    assert (
        processor.crop_size["height"] == processor.crop_size["width"] == 64 and list(processor.image_mean) == [0.5] * 3
    )  # MAE stats

    # transformers' own pipeline reads the folder as `hf-medvis predict` does, on a grey PNG as X-rays come.
    from PIL import Image
    from transformers import pipeline

    from hf_medvis.evaluation import Predictor

    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    grey = Image.open(image)  # a PIL image as given (a path would be converted to RGB by the pipeline itself)
    assert grey.mode == "L"
    scores = {r["label"]: r["score"] for r in pipeline("image-classification", model=str(out))(grey, top_k=None)}
    expected = Predictor(out).predict([str(image)])[0]
    assert list(scores) and sorted(scores) == sorted(model.config.label2id)
    for name, index in model.config.label2id.items():
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-4), name
    # The saved processor itself takes the grey image (the pipeline converts to RGB before calling it; users may not).
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(out)
    torch.testing.assert_close(
        processor(grey, return_tensors="pt")["pixel_values"],
        processor(grey.convert("RGB"), return_tensors="pt")["pixel_values"],
    )

    # Transfer report in the log: loaded / missing / unexpected, decoder dropped.
    assert "weights from vit_mae checkpoint" in log and "2 missing (classifier.bias, classifier.weight)" in log
    assert "0 unexpected" in log and "dropped (decoder.*)" in log and "pos_weight: Cardiomegaly" in log

    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 4
    for key in ("eval_auroc_macro", "eval_ap_macro", "eval_f1_macro", "eval_auroc_macro_ci95_low", "eval_loss"):
        assert key in results, key
    assert results["eval_auroc_macro_ci95_low"] <= results["eval_auroc_macro"] <= results["eval_auroc_macro_ci95_high"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_metric"] is not None and "checkpoint-" in state["best_model_checkpoint"]
    # load_best_model_at_end really restored the best checkpoint, encoder included (not only head and embeddings).
    best = ViTForImageClassification.from_pretrained(state["best_model_checkpoint"]).state_dict()
    final = model.state_dict()
    assert all(torch.equal(best[k], final[k]) for k in final)
    evals = [r for r in state["log_history"] if "eval_auroc_macro" in r]
    assert len(evals) == 2  # --metric_for_best_model auroc_macro found its key at each evaluation

    report = json.loads((out / "split_report.json").read_text())
    assert set(report["splits"]) == {"train", "val"}
    assert report["splits"]["val"]["images"] == results["eval_images"]
    assert report["splits"]["val"]["patients"] == results["eval_patients"]

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local folder is not a Hub base model
    assert "roc_auc" in card.data.metrics and card.data.datasets == ["me/cxr-phantoms"]
    auroc = next(r for r in card.data.eval_results if r.metric_type == "roc_auc")
    assert auroc.metric_value == pytest.approx(results["eval_auroc_macro"], abs=1e-4)
    assert "95% CI" in auroc.metric_name and "patient bootstrap" in auroc.metric_name
    assert "Not for clinical use" in card.text and "no horizontal flip" in card.text
    # No local paths, patient ids or image names in the card.
    text = (out / "README.md").read_text()
    assert str(phantom_dir) not in text and str(out.parent) not in text and "Patient ID" not in text
    assert "00000001_000" not in text and "_000.png" not in text


@pytest.mark.slow
def test_card_names_its_data_splits_checkpoint_and_gets_the_test_result(finetuned, phantom_dir, tmp_path):
    """The card says the data are synthetic, which split each number is from and which checkpoint was kept; `hf-medvis
    evaluate --model` adds the test-patient result (model-index split `test`, with its CI), replacing it on a re-run."""
    import subprocess
    import sys

    from conftest import subprocess_env
    from huggingface_hub import ModelCard

    out, metrics, _ = finetuned
    model = tmp_path / "model"
    shutil.copytree(out, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    state = json.loads((out / "trainer_state.json").read_text())
    card = ModelCard.load(model / "README.md")
    assert "synthetic-data" in card.data.tags and "synthetic chest X-ray phantoms" in card.text
    assert "user-provided" not in card.text
    best = state["best_model_checkpoint"].rsplit("/", 1)[-1]
    assert f"{best} of 4 steps: best validation auroc_macro" in card.text
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    assert "The same split chose the checkpoint kept" in card.text

    labels = tmp_path / "test.csv"
    with open(phantom_dir / "labels.csv") as src, open(labels, "w", newline="") as dst:
        rows = list(csv.DictReader(src))
        writer = csv.DictWriter(dst, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[-12:])
    command = (
        f"-m hf_medvis.cli evaluate --model {model} --data {phantom_dir / 'images'} --labels {labels} --bootstrap 50"
    )
    for run in range(2):
        result = subprocess.run(
            [sys.executable, *command.split(), "--out", str(tmp_path / f"eval{run}")],
            capture_output=True,
            text=True,
            env=subprocess_env(),
        )
        assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    card = ModelCard.load(model / "README.md")
    test = [r for r in card.data.eval_results if r.dataset_split == "test"]
    assert len(test) == 2 and {r.metric_type for r in test} == {"roc_auc", "average_precision"}  # replaced, not added
    auroc = next(r for r in test if r.metric_type == "roc_auc")
    assert auroc.metric_value == pytest.approx(evaluated["auroc_macro"], abs=1e-4)
    assert f"{evaluated['auroc_macro_ci95_low']:.3f}" in auroc.metric_name and "patient bootstrap" in auroc.metric_name
    assert card.text.count("## Test results") == 1 and "synthetic chest X-ray phantoms" in card.text
    for name, calibration in evaluated["calibration"].items():  # the card's calibration rows are metrics.json's
        assert f"| {name} | {calibration['ece']:.3f} | {calibration['brier']:.3f} |" in card.text
    assert card.text.index("## Test results") < card.text.index("## Intended use and limitations")
    assert str(phantom_dir) not in (model / "README.md").read_text()


@pytest.mark.parametrize("shape", [(101, 64), (64, 99), (80, 121)], ids=["portrait", "landscape", "odd-margin"])
def test_pipeline_scores_non_square_x_rays_as_predict_does(finetuned, phantom_dir, tmp_path, shape):
    """Most X-rays are not square: the saved processor resizes the shorter side and centre-crops (no squashing) with
    evaluation's crop offset, so transformers' pipeline on the file gives `hf-medvis predict`'s scores."""
    from PIL import Image
    from transformers import pipeline

    from hf_medvis.evaluation import Predictor

    out, _, _ = finetuned
    source = Image.open(sorted((phantom_dir / "images").glob("*.png"))[1])
    path = tmp_path / "xray.png"
    source.resize(shape[::-1], Image.Resampling.BILINEAR).save(path)  # PIL sizes are (width, height)
    predictor = Predictor(out)
    expected = predictor.predict([str(path)])[0]
    scores = {r["label"]: r["score"] for r in pipeline("image-classification", model=str(out))(str(path), top_k=None)}
    for name, index in predictor.model.config.label2id.items():
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-4), name


def test_hub_base_model_goes_into_the_card(recipe):
    from hf_medvis.training.hub import hub_model_id

    assert hub_model_id("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert hub_model_id("/abs/path") is None and hub_model_id("./rel") is None and hub_model_id("az://c/x") is None
    assert hub_model_id("~/models/mae") is None and hub_model_id("a/b/c") is None and hub_model_id(None) is None


def _copy_images(phantom_dir, dest, n=None):
    dest.mkdir()
    for path in sorted((phantom_dir / "images").glob("*.png"))[:n]:
        shutil.copy(path, dest / path.name)
    return dest


def _bad(recipe, out, argv, expected):
    with pytest.raises(SystemExit) as info:
        recipe.main(["--output_dir", str(out), *argv])
    message = str(info.value)
    assert info.value.code != 0
    assert expected in message and "\n" not in message, message
    assert not out.exists()


def _labels_without(tmp_path, phantom_dir, column):
    rows = list(csv.reader((phantom_dir / "labels.csv").read_text().splitlines()))
    keep = [i for i, c in enumerate(rows[0]) if c != column]
    return write_csv(tmp_path / "labels.csv", [rows[0][i] for i in keep], [[r[i] for i in keep] for r in rows[1:]])


def _single_class_labels(tmp_path, phantom_dir):
    rows = list(csv.reader((phantom_dir / "labels.csv").read_text().splitlines()))
    li = rows[0].index("Finding Labels")
    return write_csv(tmp_path / "one.csv", rows[0], [[*r[:li], "Effusion", *r[li + 1 :]] for r in rows[1:]])


def _bert_folder(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


# (case, argv built from (tmp_path, images folder, phantom folder), the one line expected)
BAD_INPUTS = [
    (
        "images-without-labels",
        lambda t, i, p: ["--train_data", str(_copy_images(p, t / "bare", 6))],
        "images without labels",
    ),
    (
        "unknown-label-name",
        lambda t, i, p: ["--train_data", i, "--label_names", "Effusion", "Pneumonia"],
        "--label_names: Pneumonia not found in the labels",
    ),
    ("validation-shares-patients", lambda t, i, p: ["--train_data", i, "--validation_data", i], "shares"),
    (
        "labels-without-patient-column",
        lambda t, i, p: ["--train_data", i, "--labels_file", str(_labels_without(t, p, "Patient ID"))],
        "no column 'Patient ID'",
    ),
    (
        "labels-without-label-column",
        lambda t, i, p: ["--train_data", i, "--labels_file", str(_labels_without(t, p, "Finding Labels"))],
        "no column 'Finding Labels'",
    ),
    (
        "single-class",
        lambda t, i, p: [
            "--train_data",
            i,
            "--labels_file",
            str(_single_class_labels(t, p)),
            "--problem_type",
            "single_label",
        ],
        "needs at least 2 classes",
    ),
    (
        "not-a-vit-model",
        lambda t, i, p: ["--train_data", i, "--model_name_or_path", str(_bert_folder(t))],
        "'bert' model",
    ),
    (
        "early-stopping-without-best-model",
        lambda t, i, p: ["--early_stopping_patience", "2", "--load_best_model_at_end", "false"],
        "--early_stopping_patience needs --load_best_model_at_end",
    ),
    ("layer-decay-out-of-range", lambda t, i, p: ["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
    ("unknown-pooling", lambda t, i, p: ["--pooling", "max"], "--pooling must be one of cls, mean"),
]


@pytest.mark.parametrize("argv, expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line(recipe, tmp_path, phantom_dir, argv, expected):
    _bad(recipe, tmp_path / "out", argv(tmp_path, str(phantom_dir / "images"), phantom_dir), expected)


def test_push_to_hub_fails_fast_before_any_data_or_training(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _bad(recipe, tmp_path / "a", ["--push_to_hub", "true", "--hub_model_id", "me/vit"], "needs a Hugging Face token")
    _bad(
        recipe,
        tmp_path / "b",
        ["--push_to_hub", "true", "--hub_model_id", "me/vit", "--hub_token", "hf_x" * 8],
        "cannot reach the Hugging Face Hub at http://127.0.0.1:9",
    )


def test_split_csvs_drive_training_and_validation(recipe, tmp_path, phantom_dir):
    """`hf-medvis split` output used as --labels_file / --validation_labels_file on one image folder."""
    from hf_medvis.data.splits import split_labels_csv

    split_labels_csv(phantom_dir / "labels.csv", tmp_path / "split", val=0.3, test=0.2)
    images = str(phantom_dir / "images")
    out = tmp_path / "out"
    metrics = recipe.main(
        [
            "--train_data",
            images,
            "--labels_file",
            str(tmp_path / "split" / "train.csv"),
            "--validation_data",
            images,
            "--validation_labels_file",
            str(tmp_path / "split" / "val.csv"),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            "--ci_bootstrap_samples",
            "0",
        ]
    )
    val_rows = list(csv.DictReader((tmp_path / "split" / "val.csv").read_text().splitlines()))
    assert metrics["eval_images"] == len(val_rows)
    assert metrics["eval_patients"] == len({r["Patient ID"] for r in val_rows})
    assert not (out / "split_report.json").exists()  # nothing was split by the recipe


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_default_run_reaches_auroc_090_on_held_out_patients(medvis_cache, tmp_path):
    """`accelerate launch recipes/finetune_vit.py` with no data or model arguments: the embedded phantoms, the tiny
    config, macro AUROC >= 0.90 on patients never seen in training, on CPU (its run time is a benchmark figure)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import REPO, subprocess_env

    out = tmp_path / "default"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        "1",
        "--cpu",
        str(REPO / "recipes" / "finetune_vit.py"),
        "--output_dir",
        str(out),
    ]
    start = time.time()
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=660,
        cwd=REPO,
        env=subprocess_env(HF_MEDVIS_CACHE=str(medvis_cache)),
    )
    elapsed = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    report = json.loads((out / "split_report.json").read_text())
    assert results["eval_patients"] == report["splits"]["val"]["patients"] > 20
    # load_best_model_at_end restored the best evaluation's weights: the final metrics are at least that good.
    state = json.loads((out / "trainer_state.json").read_text())
    assert results["eval_auroc_macro"] == pytest.approx(state["best_metric"], abs=1e-6)
    assert results["eval_auroc_Cardiomegaly"] >= 0.95 and results["eval_auroc_Effusion"] >= 0.95
    aurocs = {k: round(v, 3) for k, v in results.items() if k.startswith("eval_auroc") and "ci95" not in k}
    assert results["eval_auroc_macro"] >= 0.90, aurocs
    print(f"default fine-tuning run: {elapsed:.0f} s, {aurocs}")  # the 3-minute budget is a benchmark figure


def test_the_medical_mae_config_decays_to_their_minimum_learning_rate():
    """recipes/configs/vit_base_medical_mae.yaml's schedule arguments reach transformers' scheduler as medical_mae's
    cosine to 1e-5 after 5 of 75 warmup epochs (a misspelled kwarg would fail or decay to 0)."""
    import torch
    from transformers import get_scheduler

    from hf_medvis.data import ClassificationDataArguments
    from hf_medvis.models import ClassifierModelArguments
    from hf_medvis.training.args import FinetuningArguments, MonitoringArguments, parse_recipe_args

    config = "recipes/configs/vit_base_medical_mae.yaml"
    _, _, args, _ = parse_recipe_args(
        (ClassifierModelArguments, ClassificationDataArguments, FinetuningArguments, MonitoringArguments),
        ["--config", config, "--output_dir", "unused"],
        None,
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    steps = 75
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert args.get_warmup_steps(steps) == 6  # ceil(0.0667 x 75): their 5 warmup epochs of 75, rounded up
    assert max(rates) == pytest.approx(1e-3) and scheduler.get_last_lr()[0] == pytest.approx(1e-5)  # at the end
    assert min(rates[6:]) > 1e-5 > 0  # never below their floor
