"""Real 2-process runs on CPU (gloo): DeepSpeed ZeRO-2 (torchrun --deepspeed) and ZeRO-3 (accelerate YAML) for the tiny
MAE, DDP (accelerate --multi_gpu), ZeRO-2 and ZeRO-3 (accelerate YAMLs) for the tiny ViT; the lr derived from
base_learning_rate is read back from the optimizer that was built; outputs load with from_pretrained; a run resumed
from its checkpoint-2 trains step 3 exactly as the uninterrupted run did (MAE ZeRO-2, ViT DDP and ZeRO-3; MAE DDP on a
shard stream is test_preemption's)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, launch_command, multiprocess_env

pytestmark = pytest.mark.slow

TINY = (
    "--max_steps 3 --per_device_train_batch_size 4 --logging_steps 1 --save_steps 2 --eval_strategy no "
    "--num_reconstruction_images 0 --dataloader_num_workers 0 --base_learning_rate 0.016 "
    "--validation_split_percentage 0"
).split()
EXPECTED_LR = 0.016 * (4 * 2) / 256  # base lr x global batch (4 per device x 2 processes) / 256


def run(cmd: list[str], timeout: int = 240) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=multiprocess_env(), timeout=timeout, cwd=REPO)
    log = result.stdout + result.stderr
    # A native abort leaves only the faulthandler's dump of the rank's Python stacks: show it, not just the log's tail.
    dump = log.find("Fatal Python error")
    assert result.returncode == 0, (log[dump : dump + 4000] + "\n...\n" if dump >= 0 else "") + log[-3000:]
    return log


def resume_from_checkpoint_2(command, out: Path, tmp_path: Path) -> None:
    """Run the same command again in a folder holding only checkpoint-2 of ``out``: the resumed step 3 has the loss of
    the uninterrupted step 3 and ends with the same weights (DeepSpeed restores its own checkpoint files, DDP ours)."""
    import torch
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run(command(resumed, ["--resume_from_checkpoint", "last"]))

    def step_losses(folder: Path) -> dict[int, float]:
        lines = (folder / "loss_history.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert step_losses(resumed) == pytest.approx({3: step_losses(out)[3]}, rel=1e-6)
    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def check_run(log: str, out) -> None:
    from transformers import ViTMAEForPreTraining

    # Both processes ran, each saw world size 2 (accelerate --cpu would have started one).
    for rank in (0, 1):
        assert f"[node 0 rank {rank}]" in log
    assert "world size 2;" in log and "world size 1" not in log
    assert "per-device 4 x accumulation 1 x world size 2" in log
    peak = [
        float(x)
        for x in re.findall(r"hf_medvis.training.callbacks.optimizer_report: optimizer .*?: peak lr ([0-9.e-]+)", log)
    ]
    assert peak and all(lr == pytest.approx(EXPECTED_LR) for lr in peak), peak
    model = ViTMAEForPreTraining.from_pretrained(out)
    assert model.config.hidden_size == 64
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()


@pytest.mark.parametrize(
    "launcher, extra, tag",
    [
        ("torchrun", ["--deepspeed", "ds_configs/zero2.json"], "ZeRO-2"),
        ("accelerate", [], "ZeRO-3"),  # --config_file recipes/accelerate/deepspeed_zero3.yaml
    ],
    ids=["torchrun-deepspeed-zero2", "accelerate-zero3-yaml"],
)
def test_deepspeed_runs_use_the_derived_lr_and_save_loadable_weights(tmp_path, phantom_dir, launcher, extra, tag):
    def command(out: Path, more: list[str] = ()) -> list[str]:
        args = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *TINY, *extra, *more]
        if launcher == "torchrun":
            return launch_command("torchrun", "pretrain_mae", *args)
        return launch_command(
            "accelerate",
            "pretrain_mae",
            *args,
            config_file=str(REPO / "recipes" / "accelerate" / "deepspeed_zero3.yaml"),
        )

    out = tmp_path / "run"
    log = run(command(out))
    assert f"DeepSpeed {tag}" in log and "DeepSpeedZeroOptimizer" in log
    check_run(log, out)
    if launcher == "torchrun":  # ZeRO-2 resumes exactly (ZeRO-3: the ViT test's)
        resume_from_checkpoint_2(command, out, tmp_path)


VIT_TINY = (
    "--max_steps 3 --per_device_train_batch_size 4 --logging_steps 1 --save_steps 2 --eval_strategy no "
    "--load_best_model_at_end false --dataloader_num_workers 0 --base_learning_rate 0.016 --ci_bootstrap_samples 20 "
    "--save_total_limit 5"
).split()


@pytest.mark.parametrize(
    "launcher, extra, config",
    [
        ("accelerate", [], None),  # DDP: --multi_gpu on CPU (gloo)
        ("accelerate", [], "deepspeed_zero2.yaml"),
        ("accelerate", [], "deepspeed_zero3.yaml"),
    ],
    ids=["ddp", "accelerate-zero2-yaml", "accelerate-zero3-yaml"],
)
def test_vit_finetuning_runs_on_two_processes(tmp_path, phantom_dir, launcher, extra, config):
    from transformers import ViTForImageClassification

    def command(out: Path, more: list[str] = ()) -> list[str]:
        args = ["--train_data", str(phantom_dir / "images"), "--output_dir", str(out), *VIT_TINY, *extra, *more]
        config_file = str(REPO / "recipes" / "accelerate" / config) if config else None
        return launch_command(launcher, "finetune_vit", *args, config_file=config_file)

    out = tmp_path / "vit"
    log = run(command(out))
    for rank in (0, 1):
        assert f"[node 0 rank {rank}]" in log
    assert "world size 2;" in log and "world size 1" not in log
    peak = [
        float(x)
        for x in re.findall(r"hf_medvis.training.callbacks.optimizer_report: optimizer .*?: peak lr ([0-9.e-]+)", log)
    ]
    assert peak and all(lr == pytest.approx(EXPECTED_LR) for lr in peak), peak
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 3 and model.config.problem_type == "multi_label_classification"
    assert list(out.glob("checkpoint-*/checkpoint_complete.json"))
    if config != "deepspeed_zero2.yaml":  # DDP and ZeRO-3 (layer-decay param groups in the optimizer state)
        resume_from_checkpoint_2(command, out, tmp_path)


def test_segmentation_runs_on_two_processes_with_deepspeed(tmp_path, masked_phantom_dir):
    """The segmentation recipe through accelerate with ZeRO-2 on 2 gloo processes: both ranks train (layer-decay
    param groups in DeepSpeed's optimizer), evaluation gathers the per-image counts of both, and the saved folder
    loads as a segmentation model."""
    from hf_medvis.models.segmentation import load_segmenter

    out = tmp_path / "seg"
    data = ["--train_data", str(masked_phantom_dir / "images"), "--masks_dir", str(masked_phantom_dir / "masks")]
    data += ["--labels_file", str(masked_phantom_dir / "labels.csv"), "--layer_decay", "0.75"]
    config_file = str(REPO / "recipes" / "accelerate" / "deepspeed_zero2.yaml")
    log = run(launch_command("accelerate", "finetune_segmentation", *data, "--output_dir", str(out), *VIT_TINY,
                             config_file=config_file))  # fmt: skip
    for rank in (0, 1):
        assert f"[node 0 rank {rank}]" in log
    assert "world size 2;" in log and "DeepSpeed ZeRO-2" in log
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 3 and 0 <= results["eval_dice_macro"] <= 1
    held_out = int(re.search(r"eval_images (\d+)", log).group(1))  # the data line: the validation split's size
    assert results["eval_images"] == held_out  # every image scored once, across both ranks
    assert load_segmenter(out).config.id2label[3] == "nodule"
