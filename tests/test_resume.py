"""Resume restores exactly what was saved: a run stopped at a checkpoint and resumed trains on with the same weights, the
same batches, the same crops and the same random masks as the run that was never stopped, so its losses and final
weights are the uninterrupted run's (CPU arithmetic is deterministic here). Single process, both recipes, DataLoader
workers on, a shard stream resumed mid-epoch and at an epoch's end; a finished run is left alone."""

import hashlib
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import copy_checkpoints, load_recipe, run_recipe
from safetensors.torch import load_file, save_file

from hf_medvis.models.build import build_mae_model
from hf_medvis.models.weights import WeightLoadError, load_saved_weights

# 49 phantom images in 10 shards of <= 5; 2 DataLoader workers take 5 shards each (25 and 24 samples), so with batches of
# 5 an epoch is 10 batches whose order alternates between the workers.
STREAM_ARGS = (
    "--per_device_train_batch_size 5 --dataloader_num_workers 2 --max_steps 12 --logging_steps 1 --save_steps 1 "
    "--save_total_limit 20 --eval_strategy no --num_reconstruction_images 0 --seed 7"
).split()
EPOCH_STEPS = 10
FINETUNE_ARGS = (
    "--per_device_train_batch_size 8 --dataloader_num_workers 2 --max_steps 6 --logging_steps 1 --save_steps 1 "
    "--save_total_limit 20 --eval_strategy no --load_best_model_at_end false --hidden_dropout_prob 0.1 "
    "--ci_bootstrap_samples 10 --validation_split_percentage 25 --seed 7"
).split()


RESUME_LAST = ("--resume_from_checkpoint", "last")


def stream_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data", str(shards), "--output_dir", str(out), *STREAM_ARGS, *extra]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_continues_exactly(reference: Path, resumed: Path, from_step: int, last_step: int) -> None:
    ref, res = losses(reference), losses(resumed)
    after = list(range(from_step + 1, last_step + 1))
    assert sorted(k for k in res if k > from_step) == after
    assert [res[k] for k in after] == pytest.approx([ref[k] for k in after], rel=1e-6, abs=1e-7)
    final_ref, final_res = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final_ref.keys() == final_res.keys()
    for name, tensor in final_ref.items():
        torch.testing.assert_close(final_res[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def mae_recipe():
    return load_recipe("pretrain_mae")


@pytest.fixture(scope="module")
def stream_reference(mae_recipe, labelled_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream_ref") / "run"
    run_recipe(mae_recipe, stream_argv(labelled_shards, out))
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 12
    return out


@pytest.mark.parametrize("step, where", [(3, "mid-epoch"), (EPOCH_STEPS, "epoch end")])
def test_stream_resume_continues_the_uninterrupted_run(
    mae_recipe, labelled_shards, stream_reference, tmp_path, step, where
):
    out = copy_checkpoints(stream_reference, (step,), tmp_path / "resumed")
    log = run_recipe(mae_recipe, stream_argv(labelled_shards, out, *RESUME_LAST))
    assert f"resuming from {out / f'checkpoint-{step}'}: 62 tensors restored" in log
    if where == "epoch end":
        assert "stream resumes at the start of epoch 1 (the checkpoint ended epoch 0)" in log
    else:
        assert "stream resumes epoch 0 after 3 batches" in log
    assert_continues_exactly(stream_reference, out, step, 12)


def test_finetune_resume_continues_the_uninterrupted_run(phantom_dir, tmp_path):
    recipe = load_recipe("finetune_vit")
    argv = ["--train_data", str(phantom_dir / "images"), *FINETUNE_ARGS]
    reference = tmp_path / "reference"
    run_recipe(recipe, [*argv, "--output_dir", str(reference)])
    out = copy_checkpoints(reference, (3,), tmp_path / "resumed")
    log = run_recipe(recipe, [*argv, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
    assert "tensors restored" in log
    assert_continues_exactly(reference, out, 3, 6)  # map-style data, 2 workers, dropout on


def test_resume_at_the_last_step_finishes_without_training(mae_recipe, labelled_shards, stream_reference, tmp_path):
    """A preemption that saved the last step's checkpoint before the final outputs: the restart trains nothing more and
    writes the outputs of the run (the Trainer alone would take a 13th step)."""
    out = copy_checkpoints(stream_reference, (12,), tmp_path / "resumed")
    run_recipe(mae_recipe, stream_argv(labelled_shards, out, *RESUME_LAST))
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 12
    assert not losses(out) and not list(out.glob("checkpoint-13"))
    assert_continues_exactly(stream_reference, out, 12, 12)


def test_rerunning_a_finished_job_changes_nothing(mae_recipe, labelled_shards, stream_reference):
    def snapshot() -> dict[str, str]:
        return {
            str(p.relative_to(stream_reference)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(stream_reference.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    log = io.StringIO()
    with redirect_stdout(log), pytest.raises(SystemExit) as info:
        mae_recipe.main(stream_argv(labelled_shards, stream_reference, *RESUME_LAST))
    assert info.value.code in (0, None)
    assert "holds a finished run (step 12, all_results.json): nothing to do" in log.getvalue()
    assert snapshot() == before


def test_saved_weights_load_back_under_their_legacy_names_or_fail(tmp_path):
    model = build_mae_model(None, preset="tiny", image_size=32, patch_size=8)
    model.save_pretrained(tmp_path / "saved")
    on_disk = load_file(tmp_path / "saved" / "model.safetensors")
    # What makes the Trainer's own reload drop them: the file does not use the module names.
    assert any(".attention.attention.query." in k for k in on_disk) and set(on_disk) != set(model.state_dict())
    fresh = build_mae_model(None, preset="tiny", image_size=32, patch_size=8)
    assert not all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert load_saved_weights(fresh, tmp_path / "saved") == len(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    (tmp_path / "partial").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "partial")
    save_file({k: v for k, v in on_disk.items() if "layer.1." not in k}, tmp_path / "partial" / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"partial: saved weights do not match the model: \d+ missing keys"):
        load_saved_weights(fresh, tmp_path / "partial")
    with pytest.raises(WeightLoadError, match="no model.safetensors"):
        load_saved_weights(fresh, tmp_path)
