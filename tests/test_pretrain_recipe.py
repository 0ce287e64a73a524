"""The MAE pretraining recipe: end to end through `accelerate launch`, argument handling, bad input, Hub fail-fast."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, load_recipe, subprocess_env

TINY = (
    "--max_steps 4 --per_device_train_batch_size 8 --logging_steps 1 --eval_steps 2 --save_steps 2 "
    "--num_reconstruction_images 4 --dataloader_num_workers 0"
).split()


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("pretrain_mae")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_dir):
    """One real run through `accelerate launch`, shared by the output checks."""
    out = tmp_path_factory.mktemp("mae") / "run"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        "1",
        "--cpu",
        str(REPO / "recipes" / "pretrain_mae.py"),
        "--train_data",
        str(phantom_dir / "images"),
        "--output_dir",
        str(out),
        "--validation_split_percentage",
        "20",
        *TINY,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_run_writes_a_loadable_hub_ready_folder(trained):
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    out, log = trained
    model = ViTMAEForPreTraining.from_pretrained(out)
    assert model.config.image_size == 64 and model.config.mask_ratio == 0.75
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 64, "width": 64} and len(processor.image_mean) == 3
    card = ModelCard.load(out / "README.md")
    assert "vit-mae" in card.data.tags and card.data.library_name == "transformers"
    assert "Not for clinical use" in card.text
    # No local paths or patient data in the card.
    assert str(out.parent) not in card.text and "Patient" not in card.text
    assert (out / "reconstructions.png").stat().st_size > 1000
    assert list(out.glob("checkpoint-*")), "Trainer checkpoints"
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in history)
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 4 and "eval_loss" in results
    assert "learning rate" in log and "base_learning_rate" in log
    # The trivial baselines next to the held-out loss, and the card says which side the model is on (4 steps: not yet).
    assert results["eval_loss_position_mean"] < results["eval_loss_mean_patch"]
    assert results["eval_loss"] > results["eval_loss_position_mean"] and "**does not beat**" in card.text


def test_trivial_baselines_are_the_losses_of_the_mean_image_and_mean_patch():
    """On images = a fixed mean image + noise, predicting the training mean image scores the noise variance; the
    function agrees with a direct computation of both baselines."""
    from hf_medvis.models.build import build_mae_model
    from hf_medvis.training.mae_baselines import mae_trivial_baselines

    model = build_mae_model(None, preset="tiny", image_size=32)
    model.config.norm_pix_loss = False  # targets are the pixels themselves (the demo config's loss)
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 32, 32, generator=generator)
    train = [{"pixel_values": base + 0.1 * torch.randn(16, 3, 32, 32, generator=generator)} for _ in range(8)]
    held = [{"pixel_values": base + 0.1 * torch.randn(16, 3, 32, 32, generator=generator)} for _ in range(2)]
    result = mae_trivial_baselines(model, train, held, prepare_train=dict, prepare_eval=dict, max_images=10_000)
    targets = torch.cat([model.patchify(b["pixel_values"]) for b in train]).double()
    position_mean, held_targets = targets.mean(0), torch.cat([model.patchify(b["pixel_values"]) for b in held]).double()
    mean_patch = position_mean.mean(0)
    assert result["eval_loss_position_mean"] == pytest.approx(float(((held_targets - position_mean) ** 2).mean()))
    assert result["eval_loss_mean_patch"] == pytest.approx(float(((held_targets - mean_patch) ** 2).mean()))
    assert result["eval_loss_position_mean"] == pytest.approx(0.01, rel=0.05)  # the noise variance


def test_reconstruction_figure_unnormalises_norm_pix_targets(phantom_dir):
    """With norm_pix_loss, a perfect prediction of the normalised target maps back onto the original image."""
    import numpy as np
    import torch

    from hf_medvis.core.tasks import MAE
    from hf_medvis.data.folder import make_decode_transform
    from hf_medvis.data.transforms import create_transform
    from hf_medvis.evaluation.reconstructions import reconstruct
    from hf_medvis.models.build import build_mae_model

    model = build_mae_model(None, preset="tiny", image_size=64, norm_pix_loss=True)
    paths = sorted(str(p) for p in (phantom_dir / "images").glob("*.png"))[:2]
    eval_transform = create_transform(MAE, False, image_size=64)
    batch = torch.stack(make_decode_transform(eval_transform)({"path": paths})["pixel_values"])
    mean, std = [0.5] * 3, [0.25] * 3

    class Oracle(torch.nn.Module):  # returns the exact normalised target as the "prediction"
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, pixel_values, noise):
            out = self.inner(pixel_values=pixel_values, noise=noise)
            target = self.inner.patchify(pixel_values)
            out.logits = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            return out

        def patchify(self, x):
            return self.inner.patchify(x)

        def unpatchify(self, x):
            return self.inner.unpatchify(x)

    original, masked, recon = reconstruct(Oracle(model), batch, mean, std)
    assert original.shape == recon.shape == (2, 64, 64)
    assert np.abs(original - recon).max() < 0.02
    assert np.abs(original - masked).max() > 0.1  # masked patches are greyed out


def test_config_file_and_flag_precedence(tmp_path, recipe):
    from hf_medvis.training.args import parse_recipe_args

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"mask_ratio": 0.9, "crop_scale": [0.5, 1.0], "learning_rate": 1e-3, "norm_pix_loss": False, "max_steps": 7}
        )
    )
    types = (recipe.MAEModelArguments, recipe.MAEDataArguments, recipe.PretrainingArguments, recipe.MonitoringArguments)
    model_args, data_args, training_args, _ = parse_recipe_args(
        types, ["--config", str(config), "--max_steps", "3", "--output_dir", str(tmp_path / "o")]
    )
    assert model_args.mask_ratio == 0.9 and model_args.norm_pix_loss is False  # from the file
    assert data_args.crop_scale == [0.5, 1.0] and training_args.learning_rate == 1e-3
    assert training_args.max_steps == 3  # the flag wins over the file
    # Without --config the recipe's default config applies, and flags still win.
    model_args, _, training_args, _ = parse_recipe_args(types, ["--mask_ratio", "0.6"], recipe.DEFAULT_CONFIG)
    default_steps = yaml.safe_load(Path(recipe.DEFAULT_CONFIG).read_text())["max_steps"]
    assert (
        model_args.mask_ratio == 0.6 and model_args.model_preset == "tiny" and training_args.max_steps == default_steps
    )
    # A learning rate on the command line replaces the config's base_learning_rate (it is not scaled, not ignored).
    _, _, training_args, _ = parse_recipe_args(types, ["--learning_rate", "5e-4"], recipe.DEFAULT_CONFIG)
    assert training_args.learning_rate == 5e-4 and training_args.base_learning_rate is None


def test_learning_rate_scales_with_global_batch():
    from types import SimpleNamespace

    from hf_medvis.training.lr import apply_base_learning_rate, global_batch_size

    args = SimpleNamespace(
        per_device_train_batch_size=32,
        gradient_accumulation_steps=4,
        world_size=8,
        learning_rate=0.0,
        hf_deepspeed_config=None,
    )
    assert global_batch_size(args) == 1024
    line = apply_base_learning_rate(args, 1.5e-4)
    assert args.learning_rate == pytest.approx(6e-4) and "global batch 1024" in line
    args.world_size, args.gradient_accumulation_steps = 1, 1
    apply_base_learning_rate(args, 1.5e-4)
    assert args.learning_rate == pytest.approx(1.5e-4 * 32 / 256)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--train_data", "/nonexistent/xrays"], "does not exist: /nonexistent/xrays"),
        (["--mask_ratio", "1.5"], "--mask_ratio must be in (0, 1)"),
        (["--mask_ratio", "0"], "--mask_ratio must be in (0, 1)"),
        (["--max_steps", "many"], "invalid int value: 'many'"),
        (["--no_such_flag", "1"], "no_such_flag"),
        (["--num_channels", "2"], "--num_channels must be 1 or 3"),
        (["--crop_scale", "0.9", "0.1"], "--crop_scale"),
        (["--config", "/nonexistent.yaml"], "--config: file not found"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0, got -1.0"),  # not replaced by the config's base lr
        (["--learning_rate", "1e-3", "--base_learning_rate", "1e-3"], "give --learning_rate or --base_learning_rate"),
        (["--deepspeed", "{tmp}/ds.json"], "--deepspeed: DeepSpeed config {tmp}/ds.json: not valid JSON"),
        (["--resume_from_checkpoint", "{tmp}/half/checkpoint-4"], "{tmp}/half/checkpoint-4: incomplete checkpoint"),
        (["--output_dir", "{tmp}/a_file", "--overwrite_output_dir", "true"], "{tmp}/a_file exists and is not a folder"),
        (["--output_dir", "{tmp}/a_file/run"], "--output_dir {tmp}/a_file/run: {tmp}/a_file is not a folder"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(recipe, tmp_path, argv, expected):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2,}}')  # a trailing comma
    (tmp_path / "half" / "checkpoint-4").mkdir(parents=True)  # killed while saving: no completion marker
    (tmp_path / "a_file").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        recipe.main(["--output_dir", str(out), *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    message = str(info.value)
    assert info.value.code != 0
    assert expected.replace("{tmp}", str(tmp_path)) in message and "\n" not in message
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["pretrain_mae", "finetune_vit"])
def test_help_lists_every_argument(name, capsys):
    """Every field of the four argument dataclasses the recipe parses (so every TrainingArguments flag) is a flag."""
    import dataclasses

    from hf_medvis.data import ClassificationDataArguments, MAEDataArguments
    from hf_medvis.models import ClassifierModelArguments, MAEModelArguments
    from hf_medvis.training.args import FinetuningArguments, MonitoringArguments, PretrainingArguments

    parsed = {
        "pretrain_mae": (MAEModelArguments, MAEDataArguments, PretrainingArguments, MonitoringArguments),
        "finetune_vit": (
            ClassifierModelArguments,
            ClassificationDataArguments,
            FinetuningArguments,
            MonitoringArguments,
        ),
    }[name]
    with pytest.raises(SystemExit) as info:
        load_recipe(name).main(["--help"])
    assert info.value.code == 0
    shown = set(re.findall(r"(--[\w.]+)", capsys.readouterr().out))
    fields = {f"--{f.name}" for cls in parsed for f in dataclasses.fields(cls) if f.init}
    assert len(fields) > 100 and not sorted(fields - shown)


def test_bad_config_key_and_empty_folder(recipe, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("mask_ratio: 0.75\nmask_ration: 0.8\n")
    with pytest.raises(SystemExit, match="unknown key 'mask_ration'"):
        recipe.main(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files"):
        recipe.main(["--train_data", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_output_dir_holding_another_run_is_refused(recipe, tmp_path, phantom_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds another run"):
        recipe.main(["--output_dir", str(out), "--train_data", str(phantom_dir / "images")])
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_push_to_hub_fails_fast_when_the_hub_is_unreachable(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    start = time.time()
    with pytest.raises(SystemExit, match="needs a Hugging Face token"):
        recipe.main(["--output_dir", str(tmp_path / "a"), "--push_to_hub", "true", "--hub_model_id", "me/mae"])
    secret = "hf_" + "s3cr3t" * 4
    with pytest.raises(SystemExit) as info:
        recipe.main(
            [
                "--output_dir",
                str(tmp_path / "b"),
                "--push_to_hub",
                "true",
                "--hub_model_id",
                "me/mae",
                "--hub_token",
                secret,
            ]
        )
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in str(info.value)
    assert secret not in str(info.value)
    assert time.time() - start < 30
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hub_token_is_kept_out_of_saved_arguments(monkeypatch):
    from types import SimpleNamespace

    from hf_medvis.training.hub import keep_token_out_of_outputs

    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = SimpleNamespace(hub_token="hf_secret")
    keep_token_out_of_outputs(args)
    assert args.hub_token is None
    assert os.environ["HF_TOKEN"] == "hf_secret"


@pytest.mark.slow
def test_entry_point_defaults_and_sigterm_saves_and_exits_0(medvis_cache, tmp_path):
    """`python recipes/pretrain_mae.py` with no data argument trains on the phantom set; SIGTERM to every process of
    the job, DataLoader workers included (what Kubernetes or Azure ML send an evicted container), saves a complete
    checkpoint and exits 0 (its persistent workers included, which ignore the job's SIGTERM but not their parent's
    exit)."""
    import signal

    out = tmp_path / "o"
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "pretrain_mae.py"),
        "--output_dir",
        str(out),
        "--max_steps",
        "5000",
        "--phantom_patients",
        "6",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "2",
        "--dataloader_persistent_workers",
        "true",
        "--resume_from_checkpoint",
        "last",
    ]
    job = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(HF_MEDVIS_CACHE=str(medvis_cache)),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (out / "loss_history.jsonl").is_file():
        assert job.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)  # the training process and its DataLoader workers
    log = job.communicate(timeout=120)[0]
    assert job.returncode == 0, log[-3000:]
    assert "embedded synthetic chest X-ray phantoms" in log
    assert "SIGTERM received: saving checkpoint-" in log and "preempted: checkpoint-" in log
    checkpoints = list(out.glob("checkpoint-*/checkpoint_complete.json"))
    assert len(checkpoints) == 1  # whatever --save_strategy says: the restart resumes from it
    assert not (out / "all_results.json").exists()  # final outputs belong to the attempt that finishes


def test_new_models_get_sincos_position_embeddings():
    """transformers 5.x leaves a fresh ViTMAE's frozen position embeddings at zero (a position-blind model)."""
    import torch

    from hf_medvis.models.build import build_mae_model

    model = build_mae_model(None, preset="tiny", image_size=64)
    encoder = model.vit.embeddings.position_embeddings[0, 1:]
    decoder = model.decoder.decoder_pos_embed[0, 1:]
    for table in (encoder, decoder):
        assert table.abs().sum() > 0 and not table.requires_grad
        # Every patch position is distinguishable from every other one.
        distances = torch.cdist(table, table) + torch.eye(len(table)) * 1e3
        assert distances.min() > 1e-3
