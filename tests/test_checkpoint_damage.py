"""Checkpoints that cannot be resumed, and outputs that cannot be written, end in one line, never a traceback:

- ``--resume_from_checkpoint last`` takes the newest complete and readable checkpoint: a newer one that was truncated
  or lost a file is named in one WARNING line and skipped, and the run then trains exactly as the uninterrupted one;
  an explicit ``--resume_from_checkpoint PATH`` to a damaged checkpoint is refused in one line naming the file.
- A resume whose model (image size, hidden size) or shard-stream batches differ from the checkpoint's is one line naming
  the values, before anything is written.
- A disk that fills at a checkpoint (a small tmpfs) is one line naming the filesystem and the space needed; the
  interrupted checkpoint is gone, and after space is freed the same command with ``--resume_from_checkpoint last``
  ends with the weights and losses of a clean run. A read-only ``--output_dir`` (a read-only bind mount) is one line.
"""

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TRACEBACK, copy_checkpoints, load_recipe, mounted, run_recipe, subprocess_env
from safetensors.torch import save_file
from test_resume import assert_continues_exactly

from hf_medvis.core.local_disk import write_failure_kind
from hf_medvis.core.storage import write_json_atomic
from hf_medvis.training.checkpoints import COMPLETE_MARKER, checkpoint_problem, last_complete_checkpoint
from hf_medvis.training.outputs import describe_write_failure, resolve_resume_checkpoint

# 49 phantom images in 10 shards of <= 5, batches of 5 from 2 workers: 10 steps an epoch; 6 steps, a checkpoint each.
ARGS = (
    "--per_device_train_batch_size 5 --dataloader_num_workers 2 --max_steps 6 --logging_steps 1 --save_steps 1 "
    "--save_total_limit 20 --eval_strategy no --num_reconstruction_images 0 --seed 7 --structured_logs false"
).split()


def refused(recipe, argv: list[str]) -> str:
    """The one-line error of a recipe run that must stop before training."""
    with redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as info:
        recipe.main(argv)
    assert info.value.code not in (0, None)
    message = str(info.value.code)
    assert "\n" not in message and ": error: " in message
    return message


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("pretrain_mae")


@pytest.fixture(scope="module")
def reference(recipe, labelled_shards, tmp_path_factory) -> Path:
    """The uninterrupted run: what every resumed run here must end with."""
    out = tmp_path_factory.mktemp("damage_ref") / "run"
    run_recipe(recipe, ["--train_data", str(labelled_shards), "--output_dir", str(out), *ARGS])
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 6
    return out


# -- what makes a checkpoint unusable: cheap checks, one phrase naming the file ----------------------------------------


def _truncate(name: str, size: int):
    return lambda folder: os.truncate(folder / name, size)


def _replace(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate("model.safetensors", 300_000), "a truncated model.safetensors (300,000 of "),
        (_truncate("optimizer.pt", 500_000), "a truncated optimizer.pt (500,000 of "),
        (_remove("trainer_state.json"), "no trainer_state.json (it had one when saved)"),
        (_remove("stream_state.json"), "no stream_state.json (it had one when saved)"),
        (_remove(COMPLETE_MARKER), f"no {COMPLETE_MARKER} (interrupted while saving"),
    ],
    ids=["model-truncated", "optimizer-truncated", "state-lost", "stream-state-lost", "marker-lost"],
)
def test_a_damaged_checkpoint_is_named_with_its_file(reference, tmp_path, damage, problem):
    folder = copy_checkpoints(reference, (4,), tmp_path / "out") / "checkpoint-4"
    assert checkpoint_problem(folder) is None
    damage(folder)
    assert checkpoint_problem(folder).startswith(problem)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate("model.safetensors", 300_000), "a truncated model.safetensors (300,000 of 559,"),
        (_truncate("optimizer.pt", 500_000), "a truncated or damaged optimizer.pt (no zip central directory)"),
        (_truncate("rng_state.pth", 100), "a truncated or damaged rng_state.pth (no zip central directory)"),
        (_replace("trainer_state.json", '{"global_step": 4,'), "an unreadable trainer_state.json (not JSON)"),
        (_remove("trainer_state.json"), "no trainer_state.json"),
        (_remove("model.safetensors"), "no model.safetensors"),
        (_replace("latest", "global_step4"), "no DeepSpeed folder global_step4"),
    ],
    ids=["model-truncated", "optimizer-truncated", "rng-truncated", "state-not-json", "state-lost", "model-lost", "ds"],
)
def test_checkpoints_without_a_file_list_are_checked_by_their_formats(reference, tmp_path, damage, problem):
    """A marker written before it listed the files (or a file list that still matches) leaves the formats to tell:
    the safetensors header against the file size, the torch zip's central directory, JSON, the layout's files."""
    folder = copy_checkpoints(reference, (4,), tmp_path / "out") / "checkpoint-4"
    write_json_atomic(folder / COMPLETE_MARKER, {"global_step": 4, "time": 0})
    assert checkpoint_problem(folder) is None
    damage(folder)
    assert checkpoint_problem(folder) == problem or checkpoint_problem(folder).startswith(problem)


# -- resume: fall back past a damaged checkpoint, refuse an explicit one -----------------------------------------------


def test_last_skips_a_damaged_checkpoint_and_trains_as_the_uninterrupted_run(
    recipe, labelled_shards, reference, tmp_path
):
    out = copy_checkpoints(reference, (3, 4), tmp_path / "out")
    os.truncate(out / "checkpoint-4" / "model.safetensors", 300_000)
    log = run_recipe(
        recipe,
        ["--train_data", str(labelled_shards), "--output_dir", str(out), *ARGS, "--resume_from_checkpoint", "last"],
    )
    warnings = [line for line in log.splitlines() if "not resuming from it" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], log[-3000:]
    assert "checkpoint-4 has a truncated model.safetensors (300,000 of 559," in warnings[0]
    assert f"resuming from {out / 'checkpoint-3'}: 62 tensors restored" in log
    assert_continues_exactly(reference, out, 3, 6)
    # Step 4 was saved again over the damaged copy: every checkpoint left is sound, the newest is the last step's.
    assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")


def test_last_with_only_damaged_checkpoints_starts_fresh_and_says_why(reference, tmp_path, caplog):
    out = copy_checkpoints(reference, (3, 4), tmp_path / "out")
    os.truncate(out / "checkpoint-4" / "optimizer.pt", 10)
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    assert resolve_resume_checkpoint(SimpleNamespace(resume_from_checkpoint="last", output_dir=str(out))) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("checkpoint-4 has a truncated optimizer.pt (10 of ")
    assert warnings[1] == "checkpoint-3 has no trainer_state.json (it had one when saved): not resuming from it"
    assert warnings[2].startswith(f"--resume_from_checkpoint last: no sound checkpoint in {out} (")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_remove("trainer_state.json"), "damaged checkpoint, it has no trainer_state.json (it had one when saved)"),
        (_truncate("optimizer.pt", 1000), "damaged checkpoint, it has a truncated optimizer.pt (1,000 of "),
    ],
    ids=["state-lost", "optimizer-truncated"],
)
def test_an_explicit_damaged_checkpoint_is_refused_in_one_line(
    recipe, labelled_shards, reference, tmp_path, damage, problem
):
    out = copy_checkpoints(reference, (3, 4), tmp_path / "out")
    damage(out / "checkpoint-4")
    before = snapshot(out)
    checkpoint = out / "checkpoint-4"
    message = refused(
        recipe,
        [
            "--train_data",
            str(labelled_shards),
            "--output_dir",
            str(out),
            *ARGS,
            "--resume_from_checkpoint",
            str(checkpoint),
        ],
    )
    assert f"--resume_from_checkpoint {checkpoint}: {problem}" in message
    assert "--resume_from_checkpoint last" in message
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--image_size", "32"], "it holds another model (image_size 64 in the checkpoint, 32 now); resume with the "),
        (["--config_overrides", "hidden_size=128"], "(hidden_size 64 in the checkpoint, 128 now)"),
        (
            ["--per_device_train_batch_size", "4"],
            "cannot resume the shard stream from checkpoint-4: this run differs from the one that saved it in "
            "per_device_train_batch_size 5 in the checkpoint, 4 now",
        ),
    ],
    ids=["image-size", "hidden-size", "stream-batch-size"],
)
def test_a_resume_that_does_not_match_the_checkpoint_is_one_line(
    recipe, labelled_shards, reference, tmp_path, change, difference
):
    out = copy_checkpoints(reference, (3, 4), tmp_path / "out")
    before = snapshot(out)
    argv = [
        "--train_data",
        str(labelled_shards),
        "--output_dir",
        str(out),
        *ARGS,
        *change,
        "--resume_from_checkpoint",
        "last",
    ]
    assert difference in refused(recipe, argv)
    assert snapshot(out) == before  # nothing written: no history, no checkpoint, no results


# -- full and read-only filesystems ------------------------------------------------------------------------------------


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{COMPLETE_MARKER}"))


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_equals_a_clean_run(
    recipe, labelled_shards, reference, tmp_path
):
    checkpoint_bytes = sum(p.stat().st_size for p in (reference / "checkpoint-3").iterdir())
    # Room for the history and three checkpoints, not four.
    size_k = (checkpoint_bytes * 7 // 2) // 1024
    with mounted("-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", target=tmp_path / "small") as disk:
        out = disk / "run"
        command = [sys.executable, str(REPO / "recipes" / "pretrain_mae.py"), "--train_data", str(labelled_shards)]
        # As a job runs it: structured logs on (they write into the full folder too), restarted with the same command.
        logs_on = ARGS[: ARGS.index("--structured_logs")]
        command += ["--output_dir", str(out), *logs_on, "--resume_from_checkpoint", "last"]
        result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert TRACEBACK not in result.stdout + result.stderr
        saved = complete_steps(out)
        failed = saved[-1] + 1
        assert saved == list(range(1, failed)) and failed <= 6, saved
        errors = [line for line in result.stderr.splitlines() if ": error: " in line]
        error = result.stderr.strip().splitlines()[-1]
        assert errors == [error], result.stderr[-3000:]
        assert error.startswith(f"pretrain_mae.py: error: no space left on {disk} (tmpfs) for checkpoint-{failed} ")
        assert f"under {out}: free ~" in error and "--resume_from_checkpoint last" in error
        assert not (out / f"checkpoint-{failed}").exists()  # the half-written checkpoint is gone, its space freed
        assert last_complete_checkpoint(out) == str(out / f"checkpoint-{failed - 1}")

        # Space freed: the same command continues from the last complete checkpoint and ends as the clean run.
        subprocess.run(["mount", "-o", f"remount,size={size_k * 4}k", str(disk)], check=True)
        log = run_recipe(recipe, command[2:])
        assert f"resuming from {out / f'checkpoint-{failed - 1}'}: 62 tensors restored" in log
        assert_continues_exactly(reference, out, 0, 6)  # every step's loss, and the final weights


def test_a_read_only_output_dir_is_one_line(recipe, labelled_shards, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    with mounted("--bind", "-o", "ro", str(source), target=tmp_path / "ro") as read_only:
        message = refused(recipe, ["--train_data", str(labelled_shards), "--output_dir", str(read_only / "run"), *ARGS])
    assert message.endswith(f"--output_dir {read_only / 'run'} cannot be written (Read-only file system)")
    assert not list(source.iterdir())


def test_full_and_read_only_filesystems_are_told_apart_from_other_errors(tmp_path):
    """What each writer raises on a full tmpfs (torch.save: a RuntimeError without the OS error; safetensors: its own
    error; Python: OSError 28) and on a read-only bind mount is recognised; any other error is not."""
    with mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=tmp_path / "tiny") as disk:
        failures = []
        for write in (
            lambda: torch.save(torch.zeros(100_000), disk / "a.pt"),
            lambda: save_file({"a": torch.zeros(100_000)}, disk / "b.safetensors"),
            lambda: (disk / "c.json").write_text("x" * 100_000),
        ):
            with pytest.raises(Exception) as info:  # noqa: PT011 -- each writer has its own exception type
                write()
            failures.append(write_failure_kind(info.value, disk))
        assert failures == ["full", "full", "full"]
        message = describe_write_failure("full", disk / "run", "checkpoint-3")
        assert message.startswith(f"no space left on {disk} (tmpfs) for checkpoint-3 under {disk / 'run'}: free space")
    source = tmp_path / "source"
    source.mkdir()
    with mounted("--bind", "-o", "ro", str(source), target=tmp_path / "ro") as read_only:
        with pytest.raises(OSError) as info:
            (read_only / "x.json").write_text("{}")
        assert write_failure_kind(info.value, read_only) == "read-only"
        message = describe_write_failure("read-only", read_only / "run", "checkpoint-3")
        assert message.startswith(f"cannot write checkpoint-3 under {read_only / 'run'}: {read_only} (")
        assert "is read-only; make it writable (or pass another --output_dir)" in message
    assert write_failure_kind(ValueError("not a write"), tmp_path) is None
    # Another filesystem full (a DataLoader worker's /dev/shm): the output folder has room, so it is not the cause.
    assert write_failure_kind(OSError(errno.ENOSPC, "No space left on device"), tmp_path) is None
    assert write_failure_kind(RuntimeError("PytorchStreamWriter failed writing file"), tmp_path) is None  # space left
