"""A prepared-shard stream under 2 real processes (torchrun, gloo): SIGTERM to each process mid-epoch (as Azure ML
delivers it to the processes it started), resume from that checkpoint, and each sample of the interrupted epoch is
consumed exactly once across both ranks and both attempts, every epoch sees the samples an uninterrupted run sees, and
the model trains on exactly as the uninterrupted one (losses, final weights)."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, launch_command, multiprocess_env
from test_preemption import assert_same_training, complete_steps, consumed, steps_traced, wait_for

from hf_medvis.data.prepare import prepare

# 49 images in shards of 5: 10 shards, the last one short, so rank 0 holds 25 samples and rank 1 24. With batches of 4
# from 1 worker that is 7 batches against 6: every rank stops after 6 (MedVisTrainer's _RanksStopTogether).
STEPS_PER_EPOCH = 6
STEPS = 9  # into the second epoch
ARGS = ["--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--save_steps", "1", "--logging_steps", "1",
        "--eval_strategy", "no", "--num_reconstruction_images", "0", "--dataloader_num_workers", "1",
        "--validation_split_percentage", "0", "--seed", "7", "--resume_from_checkpoint", "last"]


@pytest.fixture(scope="module")
def shards(phantom_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mpshards") / "shards"
    prepare(str(phantom_dir / "images"), str(dst), size=64, shard_size=5, salt="x",
            labels=str(phantom_dir / "labels.csv"))
    assert [s["samples"] for s in json.loads((dst / "manifest.json").read_text())["shards"]] == [5] * 9 + [4]
    return dst


def start(shards: Path, out: Path, trace: Path) -> subprocess.Popen:
    cmd = launch_command("torchrun", "pretrain_mae", "--train_data", str(shards), "--output_dir", str(out), *ARGS)
    return subprocess.Popen(cmd, cwd=REPO, env=multiprocess_env(HF_MEDVIS_SAMPLE_TRACE=str(trace)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def keys_of(steps: dict[int, dict[int, list[str]]], first: int, last: int) -> list[str]:
    return [key for per_step in steps.values() for step, keys in per_step.items() if first <= step <= last
            for key in keys]


@pytest.mark.slow
def test_stream_sigterm_mid_epoch_then_resume_consumes_each_sample_once(tmp_path, shards):
    import signal

    import psutil

    ref_out, ref_trace = tmp_path / "ref", tmp_path / "ref_trace"
    ref = start(shards, ref_out, ref_trace)
    ref_log = ref.communicate(timeout=120)[0]
    assert ref.returncode == 0, ref_log[-3000:]

    # SIGTERM to each training process once step 2 is done: each saves at its next step boundary and exits 0, and so
    # does the launcher.
    out, traces = tmp_path / "run", [tmp_path / "trace0", tmp_path / "trace1"]
    first = start(shards, out, traces[0])
    wait_for(lambda: steps_traced(traces[0]) >= 2, first, timeout=120)
    for worker in psutil.Process(first.pid).children():
        worker.send_signal(signal.SIGTERM)
    log1 = first.communicate(timeout=60)[0]
    assert first.returncode == 0, log1[-3000:]
    stop = complete_steps(out)[-1]
    assert 2 <= stop < STEPS_PER_EPOCH, f"the signal came too late to be mid-epoch ({stop=})\n{log1[-3000:]}"
    assert json.loads((out / f"checkpoint-{stop}" / "stream_state.json").read_text())["fingerprint"]["world_size"] == 2

    second = start(shards, out, traces[1])
    log2 = second.communicate(timeout=120)[0]
    assert second.returncode == 0, log2[-3000:]
    assert "stream resumes epoch 0" in log2

    assert json.loads((out / "all_results.json").read_text())["global_step"] == STEPS
    assert json.loads((ref_out / "all_results.json").read_text())["global_step"] == STEPS
    # What each attempt consumed up to the checkpoint the next one resumed from (steps after it were lost).
    pieces = [consumed(traces[0], 1, stop), consumed(traces[1], stop + 1, STEPS)]
    reference = consumed(ref_trace, 1, STEPS)
    stitched = {rank: {} for rank in (0, 1)}
    for piece in pieces:
        for rank in (0, 1):
            stitched[rank].update(piece[rank])
    for rank in (0, 1):
        assert sorted(stitched[rank]) == list(range(1, STEPS + 1))
        # One worker per rank: the resumed stream continues in the very order of the uninterrupted one.
        assert stitched[rank] == reference[rank], f"rank {rank}: resumed order differs from the uninterrupted run"

    interrupted = keys_of(stitched, 1, STEPS_PER_EPOCH)
    assert len(interrupted) == 2 * STEPS_PER_EPOCH * 4 and len(set(interrupted)) == len(interrupted)  # exactly once
    for first_step, last_step in ((1, STEPS_PER_EPOCH), (STEPS_PER_EPOCH + 1, STEPS)):
        epoch = keys_of(stitched, first_step, last_step)
        assert len(set(epoch)) == len(epoch)
        assert set(epoch) == set(keys_of(reference, first_step, last_step))
    assert_same_training(ref_out, out, STEPS)
