"""A data mix (``--train_data mix.yaml``): three phantom sources written in three layouts with three naming schemes
train one model; metrics per source; the card lists the sources; a class a source does not label is masked; external
validation of one source with ``evaluate --label-map`` equals scikit-learn on the mapped labels."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from conftest import load_recipe, subprocess_env, write_csv
from sklearn.metrics import roc_auc_score

from hf_medvis.data.labels import LabelError, LabelSpec
from hf_medvis.data.mix import read_data_mix, weighted_concat
from hf_medvis.evaluation.metrics import build_compute_metrics

LABELS = ("Cardiomegaly", "Effusion", "Nodule")
PADCHEST_NAMES = {"Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion", "Nodule": "nodule"}


def _phantom_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory) -> Path:
    """Three phantom sets (patient ids 1..n in each: the same ids, other patients) with their labels written as NIH,
    PadChest (list text, lower-case names, 'normal') and VinDr-CXR (long, three readers, no Nodule class)."""
    from hf_medvis.data.phantoms import write_phantom_dataset

    base = tmp_path_factory.mktemp("mix")
    roots = {name: write_phantom_dataset(base / name, patients=14, seed=seed, image_size=64)
             for seed, name in enumerate(("nih", "padchest", "vindr"), start=11)}  # fmt: skip
    padchest = [
        (row["Image Index"], row["Patient ID"], str([PADCHEST_NAMES.get(n, "normal") for n in row["Finding Labels"].split("|")]))
        for row in _phantom_rows(roots["padchest"])
    ]  # fmt: skip
    write_csv(base / "padchest.csv", ("ImageID", "PatientID", "Labels"), padchest)
    vindr = []
    for row in _phantom_rows(roots["vindr"]):
        findings = [{"Effusion": "Pleural effusion"}.get(n, n) for n in row["Finding Labels"].split("|")]
        findings = [n for n in findings if n in ("Pleural effusion", "Cardiomegaly")] or ["No finding"]
        for reader in ("R1", "R2", "R3"):
            vindr += [(row["Image Index"], name, reader, row["Patient ID"]) for name in findings]
    write_csv(base / "vindr.csv", ("image_id", "class_name", "rad_id", "patient"), vindr)
    mix = base / "mix.yaml"
    mix.write_text(
        f"labels: [{', '.join(LABELS)}]\n"
        "sources:\n"
        "  - name: nih\n    data: nih/images\n    labels_file: nih/labels.csv\n"
        "  - name: padchest\n    data: padchest/images\n    labels_file: padchest.csv\n    labels_format: list\n"
        "    image_col: ImageID\n    group_col: PatientID\n    label_col: Labels\n    negative_label: normal\n"
        '    label_map: {"pleural effusion": Effusion, cardiomegaly: Cardiomegaly, nodule: Nodule}\n'
        "  - name: vindr\n    data: vindr/images\n    labels_file: vindr.csv\n    labels_format: long\n"
        "    image_column_name: image_id\n    group_column_name: patient\n    label_column_name: class_name\n"
        "    reader_col: rad_id\n    negative_label: No finding\n    weight: 2\n"
    )
    return mix


def test_mix_file_is_checked_in_one_line(tmp_path):
    bad = tmp_path / "mix.yaml"
    bad.write_text("labels: [A]\nsources:\n  - name: x\n    data: d\n    label_colum: L\n")
    with pytest.raises(LabelError, match=r"source 'x': unknown key\(s\) label_colum \(known: name, data"):
        read_data_mix(bad)
    bad.write_text("labels: [A]\nsources:\n  - name: x\n    data: d\n    label_map: {a: B}\n")
    with pytest.raises(LabelError, match=r"label_map maps onto B, not among the mix's labels \(A\)"):
        read_data_mix(bad)
    bad.write_text("labels: [A]\nsources:\n  - name: x y\n    data: d\n")
    with pytest.raises(LabelError, match="'name' must be letters"):
        read_data_mix(bad)


def test_prepared_shards_as_a_source_are_refused_in_one_line(labelled_shards, tmp_path):
    from hf_medvis.data.mix import mix_records

    mix = tmp_path / "mix.yaml"
    mix.write_text(f"labels: [Nodule]\nsources:\n  - name: shards\n    data: {labelled_shards}\n")
    with pytest.raises(LabelError, match=r"mix source 'shards': .* holds prepared shards or a Hugging Face dataset"):
        mix_records(read_data_mix(mix), None)


def test_weights_repeat_a_source_with_its_own_keys():
    parts = [{"key": ["a", "b"], "group": ["s/1", "s/2"]}, {"key": ["c", "d", "e", "f"], "group": ["t/1"] * 4}]
    out = weighted_concat(parts, [2.0, 0.5], seed=0)
    assert out["key"][:4] == ["a", "b", "a~1", "b~1"]  # each repeat draws its own augmentation
    assert len(out["key"]) == 6 and set(out["key"][4:]) <= {"c", "d", "e", "f"}


def test_compute_metrics_per_source_equal_scikit_learn():
    rng = np.random.default_rng(0)
    spec = LabelSpec(("A", "B"), "multi_label_classification")
    labels = (rng.random((60, 2)) < 0.4).astype(np.float32)
    labels[40:, 1] = -1  # source "t" does not label B
    logits = rng.normal(size=(60, 2)) + 2 * labels
    sources = ["s"] * 40 + ["t"] * 20
    prediction = type("P", (), {"predictions": logits, "label_ids": labels})()
    metrics = build_compute_metrics(spec, sources=sources)(prediction)
    probs = 1 / (1 + np.exp(-logits))
    for name, rows in (("s", slice(0, 40)), ("t", slice(40, 60))):
        assert metrics[f"{name}_auroc_A"] == pytest.approx(roc_auc_score(labels[rows, 0], probs[rows, 0]))
    assert metrics["s_auroc_B"] == pytest.approx(roc_auc_score(labels[:40, 1], probs[:40, 1]))
    assert "t_auroc_B" not in metrics and "t_f1_B" not in metrics  # not labelled: no number
    assert metrics["t_auroc_macro"] == pytest.approx(metrics["t_auroc_A"])


@pytest.mark.slow
def test_finetune_on_a_mix_reports_per_source_and_evaluate_label_map_equals_sklearn(mix_file, tmp_path):
    from huggingface_hub import ModelCard

    from hf_medvis.evaluation import Predictor

    out = tmp_path / "vit"
    args = f"--train_data {mix_file} --output_dir {out} --max_steps 6 --per_device_train_batch_size 8 --eval_steps 3 "
    args += "--save_steps 3 --validation_split_percentage 30 --ci_bootstrap_samples 20"
    with redirect_stdout(io.StringIO()):
        metrics = load_recipe("finetune_vit").main(args.split())
    for source in ("nih", "padchest", "vindr"):
        assert np.isfinite(metrics[f"eval_{source}_auroc_macro"]), source
        assert metrics[f"eval_{source}_images"] > 0
    assert sum(metrics[f"eval_{s}_patients"] for s in ("nih", "padchest", "vindr")) == metrics["eval_patients"]
    assert "eval_vindr_auroc_Nodule" not in metrics and "eval_nih_auroc_Nodule" in metrics  # VinDr: no Nodule here
    card = ModelCard.load(out / "README.md").content
    row = next(line for line in card.splitlines() if "sources (train / validation)" in line)
    assert all(f"{s}: " in row for s in ("nih", "padchest", "vindr")) and "does not label Nodule" in row

    # External validation of the PadChest-layout source with its own names, against scikit-learn on mapped labels.
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Pleural Effusion: Effusion\nCARDIOMEGALY: Cardiomegaly\n")  # Nodule: not mapped
    images = mix_file.parent / "padchest" / "images"
    result = subprocess.run(
        [sys.executable, "-m", "hf_medvis.cli", "evaluate", "--model", str(out), "--data", str(images),
         "--labels", str(mix_file.parent / "padchest.csv"), "--out", str(tmp_path / "eval"), "--bootstrap", "20",
         "--labels-format", "list", "--image-column-name", "ImageID", "--group-column-name", "PatientID",
         "--label-column-name", "Labels", "--negative-label", "normal", "--label-map", str(label_map), "--no-card"],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["not_evaluated"] == ["Nodule"] and "auroc_Nodule" not in evaluated
    with open(mix_file.parent / "padchest.csv", newline="") as handle:
        rows = {row[0]: row for row in csv.reader(handle)}
    predictor = Predictor(out)
    paths = sorted(str(p) for p in images.iterdir())
    probs = predictor.predict(paths)
    for name, theirs in (("Cardiomegaly", "cardiomegaly"), ("Effusion", "pleural effusion")):
        truth = [int(theirs in rows[Path(p).name][2]) for p in paths]
        column = predictor.spec.names.index(name)
        assert evaluated[f"auroc_{name}"] == pytest.approx(roc_auc_score(truth, probs[:, column]), abs=1e-6)


def test_mae_on_a_mix_holds_out_patients_per_source_and_weights_training(mix_file):
    from hf_medvis.data import build_datasets
    from hf_medvis.data.arguments import MAEDataArguments

    args = MAEDataArguments(train_data=str(mix_file), validation_split_percentage=30)
    data = build_datasets(args, "mae", image_size=32, seed=0)
    sources = data.info["sources"]
    for name in ("nih", "padchest", "vindr"):
        images = len(list((mix_file.parent / name / "images").iterdir()))
        assert sources[name]["train_images"] + sources[name]["eval_images"] == images, name
        assert sources[name]["eval_images"] > 0, name  # each source held out in its share
    train_groups = set(data.train.with_format(None)["group"])
    eval_groups = set(data.eval_during_training.with_format(None)["group"])
    assert not train_groups & eval_groups  # patient-disjoint; ids namespaced: 1..14 in every source, 42 patients
    assert len(train_groups | eval_groups) == 42
    weighted = sum(sources[n]["train_images"] for n in ("nih", "padchest")) + 2 * sources["vindr"]["train_images"]
    assert len(data.train) == weighted == data.info["train_images"]


@pytest.mark.slow
def test_pretrain_on_a_mix_card_lists_the_sources(mix_file, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "mae"
    args = (
        f"--train_data {mix_file} --output_dir {out} --model_preset tiny --image_size 32 --patch_size 8 --max_steps 2 "
    )
    args += "--per_device_train_batch_size 4 --validation_split_percentage 30 --dataloader_num_workers 0"
    with redirect_stdout(io.StringIO()):
        metrics = load_recipe("pretrain_mae").main(args.split())
    assert np.isfinite(metrics["train_loss"])
    card = ModelCard.load(out / "README.md").content
    row = next(line for line in card.splitlines() if "sources (train / validation)" in line)
    assert all(f"{s}: " in row for s in ("nih", "padchest", "vindr"))
