"""Training monitoring callbacks: a tiny real Trainer run with the profiler and a planted slowdown, another with a
planted NaN, a webhook and --stop_on_alert, and the rules driven directly through callback events."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from hf_medvis.infra.jsonlog import remove_json_log_handlers
from hf_medvis.training.args import MonitoringArguments, parse_step_range
from hf_medvis.training.callbacks import AlertCallback, ThroughputCallback, build_monitoring_callbacks
from hf_medvis.training.callbacks.throughput import count_model_flops_per_sample

TINY_MAE = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
)  # fmt: skip


class VirtualClock:
    """Virtual time: every reading advances 1 ms, plus the planted delays: a slowdown the callbacks measure exactly,
    without sleeping through it, and no real timing noise (a busy CI host stalling one step) faking a throughput drop
    before the planted one."""

    def __init__(self):
        self.offset = 0.0
        self.ticks = 0

    def __call__(self) -> float:
        self.ticks += 1
        return self.ticks * 1e-3 + self.offset


class PlantedImages(torch.utils.data.Dataset):
    """Random 32 px images; after ``slow_after`` reads each read takes ``delay_s`` more, and read ``nan_at`` returns
    NaN pixels."""

    def __init__(
        self,
        slow_after: int | None = None,
        delay_s: float = 0.0,
        nan_at: int | None = None,
        clock: VirtualClock | None = None,
    ):
        self.reads, self.slow_after, self.delay_s, self.nan_at, self.clock = 0, slow_after, delay_s, nan_at, clock

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        if self.slow_after is not None and self.reads > self.slow_after:
            self.clock.offset += self.delay_s
        pixels = torch.rand(3, 32, 32)
        if self.nan_at is not None and self.reads == self.nan_at:
            pixels[0, 0, 0] = float("nan")
        return {"pixel_values": pixels}


def _train(output_dir: Path, dataset, monitoring: MonitoringArguments, max_steps: int, clock=None) -> Trainer:
    torch.manual_seed(0)
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3,
    )  # fmt: skip
    callbacks = build_monitoring_callbacks(monitoring, training_args)
    for callback in callbacks:
        if clock is not None and isinstance(callback, ThroughputCallback):
            callback.clock = clock
    trainer = Trainer(
        model=ViTMAEForPreTraining(ViTMAEConfig(**TINY_MAE)),
        args=training_args,
        train_dataset=dataset,
        callbacks=callbacks,
    )
    try:
        trainer.train()
    finally:
        remove_json_log_handlers()
    return trainer


def _alerts(output_dir: Path) -> list[dict]:
    path = output_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_arguments_parse_with_training_arguments_and_reject_bad_ranges():
    parser = HfArgumentParser((MonitoringArguments, TrainingArguments))
    monitoring, _ = parser.parse_args_into_dataclasses(
        (
            "--output_dir x --profile_steps 10-15 --alert_webhook http://127.0.0.1:1/h --stop_on_alert --peak_tflops "
            "764"
        ).split()
    )
    assert (
        parse_step_range(monitoring.profile_steps) == (10, 15)
        and monitoring.stop_on_alert
        and monitoring.peak_tflops == 764
    )
    assert parse_step_range("7") == (7, 7)
    for bad in ("15-10", "ten", "0-3"):
        with pytest.raises(ValueError, match="--profile_steps"):
            MonitoringArguments(profile_steps=bad)
    with pytest.raises(ValueError, match="--alert_webhook"):
        MonitoringArguments(alert_webhook="ftp://x")


def test_profiled_run_with_planted_slowdown(tmp_path, capsys):
    # 8 fast steps of 4 images, then every image read takes 5 s more: data wait and a throughput drop.
    out, clock = tmp_path / "run", VirtualClock()
    dataset = PlantedImages(slow_after=32, delay_s=5.0, clock=clock)
    trainer = _train(out, dataset, MonitoringArguments(profile_steps="2-3", profile_top_ops=5), 11, clock=clock)

    traces = list((out / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
    assert "Top 5 operators (profiled steps 2-3)" in capsys.readouterr().out
    table = (out / "profile" / "top_ops-rank0.txt").read_text().splitlines()
    rows = [line.strip() for line in table if line.strip() and not line.startswith("-")]
    rows = [row for row in rows if not row.startswith(("Name", "Self CPU time"))]
    # Five operator rows; which ones lead (aten ops, optimizer step, profiler step markers) varies from run to run.
    assert len(rows) >= 5 and any(row.startswith("aten::") for row in rows), table

    kinds = {a["kind"]: a for a in _alerts(out)}
    assert "data_wait" in kinds and "throughput_drop" in kinds, kinds
    # Step 9's batch is read during step 8's fetch: accelerate's DataLoaderShard reads one batch ahead.
    assert kinds["data_wait"]["step"] >= 8 and kinds["throughput_drop"]["step"] >= 8

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"images_per_second", "data_wait_pct", "tflops_per_gpu", "alerts_total"} <= set(h) for h in train_logs)
    # Each alert is a number in the log of its step, for the reporters to chart.
    for kind in ("data_wait", "throughput_drop"):
        assert [h["step"] for h in train_logs if f"alert_{kind}" in h] == [kinds[kind]["step"]], kind
    assert train_logs[-1]["alerts_total"] == len(_alerts(out))
    assert train_logs[-1]["data_wait_pct"] > 90 > 50 > train_logs[5]["data_wait_pct"]
    summary = json.loads((out / "throughput.json").read_text())
    assert (
        summary["flops_per_sample"] > 0 and summary["images_per_second"] > 0 and "mfu" not in summary
    )  # no peak on CPU

    lines = [json.loads(line) for line in next((out / "logs").glob("*-rank00000.jsonl")).read_text().splitlines()]
    assert {"time", "node", "rank", "step", "level", "message"} <= set(lines[0])
    metrics = [entry for entry in lines if entry["message"].startswith('metrics {"loss"')]
    assert metrics and "images_per_second" in metrics[-1]["message"]
    assert any(entry["level"] == "WARNING" and "ALERT data_wait" in entry["message"] for entry in lines)


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def webhook():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=secret", _Hook.received
    server.shutdown()


def test_planted_nan_alerts_posts_webhook_and_stops(tmp_path, webhook):
    url, received = webhook
    out = tmp_path / "run"
    monitoring = MonitoringArguments(alert_webhook=url, stop_on_alert=True)
    trainer = _train(out, PlantedImages(nan_at=14), monitoring, max_steps=30)  # read 14 is in step 4

    alerts = _alerts(out)
    assert [a["kind"] for a in alerts] == ["nonfinite"] and alerts[0]["step"] == 4
    assert "grad_norm=nan" in alerts[0]["message"]  # the Trainer's nan filter hides the loss; the grad norm shows it
    assert trainer.state.global_step == 4  # stopped right after the alert
    assert [body["alert"]["kind"] for body in received] == ["nonfinite"] and "step 4" in received[0]["text"]
    logged = "".join(p.read_text() for p in (out / "logs").glob("*.jsonl"))
    assert "secret" not in logged


def _state(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step, state.epoch = step, step / 100
    return state


def test_loss_spike_and_memory_rules_fire_once_per_episode(tmp_path):
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    memory = iter([0.5] * 6 + [0.99, 0.99, 0.5, 0.99])
    callback = AlertCallback(MonitoringArguments(), training_args, memory_probe=lambda: next(memory))
    control = TrainerControl()
    losses = [1.0, 0.9, 0.95, 0.85, 0.9, 0.88, 4.0, 4.1, 0.8, 0.82]
    logged = []
    for step, loss in enumerate(losses, 1):
        logged.append({"loss": loss, "grad_norm": 1.0})
        callback.on_log(training_args, _state(step), control, logs=logged[-1])
    fired = [(a["kind"], a["step"]) for a in _alerts(tmp_path)]
    assert fired == [("loss_spike", 7), ("memory", 7), ("memory", 10)]  # the memory episode cleared at step 9
    # The same as numbers in the logs: a running count, and a flag at the step an alert fires.
    assert [logs["alerts_total"] for logs in logged] == [0] * 6 + [2, 2, 2, 3]
    flags = [sorted(k for k in logs if k.startswith("alert_")) for logs in logged]
    assert flags == [[]] * 6 + [["alert_loss_spike", "alert_memory"], [], [], ["alert_memory"]]
    assert not control.should_training_stop  # --stop_on_alert is off


def test_throughput_arithmetic_with_a_fake_clock(tmp_path):
    now = [0.0]
    training_args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
    )
    callback = ThroughputCallback(
        MonitoringArguments(flops_per_sample=1e12, peak_tflops=100.0), training_args, clock=lambda: now[0]
    )
    state, control = _state(0), TrainerControl()
    callback.on_train_begin(training_args, state, control)
    for _ in range(4):  # each step: 0.25 s fetching data, 0.75 s computing
        now[0] += 0.25
        callback.on_step_begin(training_args, state, control)
        now[0] += 0.75
        state.global_step += 1
        callback.on_step_end(training_args, state, control)
    logs = {"loss": 1.0}
    callback.on_log(training_args, state, control, logs=logs)
    assert logs["images_per_second"] == pytest.approx(16.0)  # 4 steps x 16 images / 4 s
    assert logs["data_wait_pct"] == pytest.approx(25.0)
    assert logs["tflops_per_gpu"] == pytest.approx(16.0) and logs["mfu"] == pytest.approx(0.16)


def test_flop_count_matches_the_reference_mae_base_figure():
    # REFERENCE: MAE-B/16 (mask 0.75, decoder 512x8) 58.8 GFLOP per image, forward + backward.
    config = ViTMAEConfig(
        mask_ratio=0.75, decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_intermediate_size=2048
    )
    with torch.device("meta"):
        model = ViTMAEForPreTraining(config)
    assert count_model_flops_per_sample(model) / 1e9 == pytest.approx(58.8, rel=0.02)
