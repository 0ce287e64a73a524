"""The online linear probe of MAE pretraining (``--probe_labels``): logged at its steps to every history, equal to an
independent recomputation, without touching the model or the training run, and bad probe inputs fail before training."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_recipe, run_recipe, write_csv

RUN = (
    "--max_steps 4 --per_device_train_batch_size 8 --logging_steps 1 --save_strategy no "
    "--validation_split_percentage 0 --num_reconstruction_images 0 --dataloader_num_workers 0 --seed 0"
).split()


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("pretrain_mae")


def _history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def runs(recipe, phantom_dir, tmp_path_factory):
    """The same 4-step run (seed 0) with the probe every 2 steps, and without it."""
    base = tmp_path_factory.mktemp("probe")
    images, labels = str(phantom_dir / "images"), str(phantom_dir / "labels.csv")
    probed, plain = base / "probed", base / "plain"
    log = run_recipe(recipe, ["--train_data", images, "--output_dir", str(probed), *RUN,
                              "--probe_labels", labels, "--probe_steps", "2"])  # fmt: skip
    run_recipe(recipe, ["--train_data", images, "--output_dir", str(plain), *RUN])
    return probed, plain, log


def _encode(model, images, mean, std):
    """Written out again here: the mean patch token of the unmasked encoder, images normalised as the Trainer does."""
    model.eval()
    model.config.mask_ratio = 0.0
    pixels = torch.stack(images).float() / 255.0
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pixels = ((pixels - mean_t) / std_t).expand(-1, model.config.num_channels, -1, -1)
    patches = model.vit.embeddings.patch_embeddings.num_patches
    noise = torch.arange(patches, dtype=torch.float32).expand(len(images), patches)  # keep every patch, in order
    with torch.no_grad():
        hidden = model.vit(pixel_values=pixels, noise=noise).last_hidden_state
    return hidden[:, 1:].mean(dim=1).numpy()


def test_probe_is_logged_at_its_steps_and_equals_a_recomputation(runs, phantom_dir):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    from hf_medvis.training.callbacks import online_probe
    from hf_medvis.training.callbacks.online_probe import load_probe_set

    out, _, log = runs
    probes = {r["step"]: r for r in _history(out) if "probe_auroc_macro" in r}
    assert sorted(probes) == [2, 4]
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in history if "probe_auroc_macro" in r) == [2, 4]
    assert {"probe_auroc_Cardiomegaly", "probe_auroc_Effusion", "probe_seconds"} <= set(probes[4])
    assert "online probe at step 2: probe_auroc_macro" in log and "online probe at step 4" in log

    # The same images and patient split (the callback's own setup), encoded, fitted and scored here.
    probe = load_probe_set(str(phantom_dir / "images"), str(phantom_dir / "labels.csv"), image_size=64)
    model = ViTMAEForPreTraining.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    features = _encode(model, probe.images, processor.image_mean, processor.image_std)
    train, held = ~probe.held_out, probe.held_out
    scaler = StandardScaler().fit(features[train])
    aurocs = []
    for column, name in enumerate(probe.spec.names):
        classifier = LogisticRegression(
            C=online_probe.PROBE_C, max_iter=online_probe.PROBE_MAX_ITER, random_state=online_probe.PROBE_RANDOM_STATE
        ).fit(scaler.transform(features[train]), probe.truth[train, column])
        y = probe.truth[held, column]
        if 0 < y.sum() < len(y):
            auroc = roc_auc_score(y, classifier.predict_proba(scaler.transform(features[held]))[:, 1])
            assert probes[4][f"probe_auroc_{name}"] == pytest.approx(auroc, abs=1e-6)
            aurocs.append(auroc)
    assert len(aurocs) >= 2
    assert probes[4]["probe_auroc_macro"] == pytest.approx(np.mean(aurocs), abs=1e-6)


def test_probe_leaves_the_training_run_alone(runs):
    probed, plain, _ = runs
    losses = [[(r["step"], r["loss"]) for r in _history(out) if "loss" in r] for out in (probed, plain)]
    # Every step's loss logged (a probe step is a logging step too) and the same: the probe draws no random number.
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_probe_restores_weights_modes_config_and_rng(phantom_dir):
    from transformers import TrainerControl, TrainerState

    from hf_medvis.evaluation import classification_metrics
    from hf_medvis.models.build import build_mae_model
    from hf_medvis.training.callbacks.online_probe import OnlineProbeCallback, load_probe_set

    probe = load_probe_set(str(phantom_dir / "images"), str(phantom_dir / "labels.csv"), image_size=64)
    torch.manual_seed(0)
    model = build_mae_model(None, preset="tiny", image_size=64)
    model.train()
    model.decoder.eval()  # a submodule's own mode is kept too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    trainer = SimpleNamespace(
        image_mean=[0.5] * 3, image_std=[0.25] * 3, log=logged.append, callback_handler=SimpleNamespace(callbacks=[])
    )
    callback = OnlineProbeCallback(trainer, probe, classification_metrics, probe_steps=2)
    args = SimpleNamespace(device=torch.device("cpu"), eval_steps=None)
    state = TrainerState(global_step=2, max_steps=10)
    rng = torch.get_rng_state()
    control = TrainerControl(should_log=True)
    callback.on_step_end(args, state, control, model=model)
    callback.on_step_end(args, TrainerState(global_step=3, max_steps=10), control, model=model)  # not a probe step
    assert control.should_log  # the training log of that step still happens
    assert len(logged) == 1 and 0 <= logged[0]["probe_auroc_macro"] <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.vit.training and not model.decoder.training
    assert model.config.mask_ratio == 0.75 and model.vit.embeddings.config.mask_ratio == 0.75
    assert torch.equal(torch.get_rng_state(), rng)


def test_probe_interval_and_patient_cap(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_medvis.training.callbacks.online_probe import OnlineProbeCallback, select_by_patient

    def interval(probe_steps, eval_steps, max_steps):
        args = TrainingArguments(tmp_path, eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps)
        state = TrainerState(max_steps=max_steps)
        state.compute_steps(args, max_steps)  # as the Trainer does before on_train_begin
        callback = OnlineProbeCallback(None, None, None, probe_steps=probe_steps)
        callback.on_train_begin(args, state, TrainerControl())
        return callback.every

    assert interval(3, 300, 900) == 3
    assert interval(None, 300, 900) == 300
    assert interval(None, 0.25, 8) == 2  # --eval_steps as a ratio of the run
    assert interval(None, None, 900) == 500
    groups, keys = ["b", "a", "b", "c", "a", "c"], ["b1", "a1", "b2", "c1", "a2", "c2"]
    assert select_by_patient(groups, keys, 4) == [1, 4, 0, 2]  # whole patients in hashed-id order
    assert select_by_patient(groups, keys, 5) == [1, 4, 0, 2]
    assert select_by_patient(groups, keys, 1) == [1]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_images", "--probe_labels {labels}: none of the 49 images in {images} has a label in it"),
        ("unlabelled", "--probe_labels {labels}: none of the 49 images in {images} has a label in it"),
        ("default_data", "--probe_labels needs --probe_data IMAGES"),
        ("glob_data", "--probe_labels needs --probe_data IMAGES"),
    ],
)
def test_bad_probe_input_is_one_line_before_training(recipe, phantom_dir, tmp_path, monkeypatch, case, expected):
    monkeypatch.setattr(sys, "argv", ["pretrain_mae.py"])
    images = str(phantom_dir / "images")
    header = ["Image Index", "Finding Labels", "Patient ID"]
    labels = tmp_path / "probe.csv"
    if case == "missing_images":
        write_csv(labels, header, [[f"9999999{i}_000.png", "Effusion", f"9{i}"] for i in range(4)])
    else:
        names = sorted(p.name for p in (phantom_dir / "images").glob("*.png"))
        write_csv(labels, header, [[name, "", name[:8]] for name in names])
    argv = {
        "missing_images": ["--train_data", images],
        "unlabelled": ["--train_data", images],
        "default_data": [],
        "glob_data": ["--train_data", f"{images}/*.png"],
    }[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        recipe.main([*argv, "--probe_labels", str(labels), "--output_dir", str(out), *RUN])
    message = str(info.value)
    assert message.startswith("pretrain_mae.py: error: ") and "\n" not in message
    assert expected.format(labels=labels, images=images) in message
    assert not list(out.glob("checkpoint-*")) and not (out / "trainer_state.json").exists()
