"""Training observability switched on by recipe flags: profiler, metric alerts, per-rank structured logs, throughput.

What is measured, and how (no callback adds a host-device sync per step):

- Throughput is timed on the host between step events. Step boundaries on the host are fuzzy on a GPU (kernels run
  asynchronously), but each logging interval ends with the Trainer's own ``loss.item()`` sync, which we count as
  compute, so interval totals are right. Evaluation and checkpoint time are excluded.
- Data wait is the host time between one step's ``on_step_end`` (or the end of logging / evaluation / saving) and the
  next ``on_step_begin``: in the HF Trainer that is where the next batch(es) are fetched from the DataLoader
  (``get_batch_samples``). If the GPU queue is still draining during the fetch, that time overlaps GPU work, so it is
  an upper bound on the GPU idle time caused by input; a high value means the input pipeline is the bottleneck.
- FLOPs per image are counted once with torch's FlopCounterMode on a meta-device copy of the model (forward +
  backward); achieved TFLOP/s are per GPU; MFU needs a peak (``--peak_tflops`` or the GPU table in the package data).
- Alerts are evaluated at logging steps, on the values the Trainer logs (the loss averaged over the interval and
  across ranks, the last grad norm). With ``logging_nan_inf_filter`` (the Trainer default) NaN/inf step losses are
  replaced before logging, so a NaN shows up as a non-finite ``grad_norm``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerState, TrainingArguments

from hf_medvis.infra.jsonlog import JsonLinesHandler, install_json_log_handler

logger = logging.getLogger(__name__)


def parse_step_range(text: str) -> tuple[int, int]:
    """'10-15' → (10, 15); '12' → (12, 12). Steps are optimizer steps, counted from 1, both ends included."""
    first, sep, last = text.strip().partition("-")
    try:
        start, end = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ValueError(f"--profile_steps expects FIRST-LAST optimizer steps (e.g. 10-15), got '{text}'") from None
    if start < 1 or end < start:
        raise ValueError(f"--profile_steps needs 1 <= FIRST <= LAST, got '{text}'")
    return start, end


@dataclass
class MonitoringArguments:
    """Flags shared by both recipes for debugging and watching a run."""

    profile_steps: str | None = field(
        default=None,
        metadata={"help": "Record torch.profiler over these optimizer steps, e.g. '10-15': TensorBoard trace in "
                  "output_dir/profile and a top-operator table printed at the end of the range."},
    )  # fmt: skip
    profile_top_ops: int = field(default=15, metadata={"help": "Rows in the profiler's top-operator table."})
    structured_logs: bool = field(
        default=True,
        metadata={"help": "Write per-rank JSON-line logs (time, node, rank, step, level, message) to output_dir/logs; "
                  "search them with `hf-medvis logs`."},
    )  # fmt: skip
    throughput: bool = field(
        default=True,
        metadata={"help": "Log images/s, achieved TFLOP/s per GPU, MFU and data-wait %% at each logging step, and a "
                  "summary at the end (output_dir/throughput.json)."},
    )  # fmt: skip
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak TFLOP/s of one accelerator for MFU (default: vendor figure for known GPUs)."},
    )
    flops_per_sample: float | None = field(
        default=None, metadata={"help": "Training FLOPs per image (forward + backward); default: counted on the model."}
    )
    alerts: bool = field(default=True, metadata={"help": "Check logged metrics for problems and raise alerts."})
    alert_webhook: str | None = field(
        default=None, metadata={"help": "POST each alert as JSON to this URL (Teams/Slack-style {'text': ...})."}
    )
    stop_on_alert: bool = field(default=False, metadata={"help": "Stop training (on all ranks) after an alert."})
    alert_loss_spike: float = field(
        default=3.0, metadata={"help": "Alert when the loss exceeds this multiple of its moving median."}
    )
    alert_loss_window: int = field(default=20, metadata={"help": "Logged losses in the moving median."})
    alert_throughput_drop: float = field(
        default=0.5, metadata={"help": "Alert when images/s falls below (1 - this) x its moving median."}
    )
    alert_data_wait: float = field(
        default=0.5, metadata={"help": "Alert when the fraction of step time spent waiting for data exceeds this."}
    )
    alert_memory: float = field(
        default=0.95, metadata={"help": "Alert when accelerator memory in use exceeds this fraction of its capacity."}
    )

    def __post_init__(self) -> None:
        if self.profile_steps:
            parse_step_range(self.profile_steps)
        if self.profile_top_ops < 1 or self.alert_loss_window < 2:
            raise ValueError("--profile_top_ops must be >= 1 and --alert_loss_window >= 2")
        if self.alert_loss_spike <= 1:
            raise ValueError(f"--alert_loss_spike must be > 1, got {self.alert_loss_spike}")
        for name in ("alert_throughput_drop", "alert_data_wait", "alert_memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"--{name} must be in (0, 1], got {value}")
        if self.alert_webhook and urllib.parse.urlsplit(self.alert_webhook).scheme not in ("http", "https"):
            raise ValueError("--alert_webhook must be an http(s) URL")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError("--peak_tflops must be > 0")


def _is_training_log(logs: dict[str, Any]) -> bool:
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)


def _precision(training_args: TrainingArguments) -> str:
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"


# --------------------------------------------------------------------------------------------------------------------
# Structured logs


class StructuredLogCallback(TrainerCallback):
    """Keeps the JSON-line handler's step current and records each metrics log line (main process)."""

    def __init__(self, handler: JsonLinesHandler):
        self.handler = handler

    def on_step_begin(self, args, state, control, **kwargs):
        self.handler.step = state.global_step + 1  # the step being run

    def on_step_end(self, args, state, control, **kwargs):
        self.handler.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            logger.info("metrics %s", json.dumps(logs, default=float), extra={"step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        logger.info("training ended at step %d", state.global_step, extra={"step": state.global_step})


# --------------------------------------------------------------------------------------------------------------------
# Throughput


def count_model_flops_per_sample(model: torch.nn.Module) -> float | None:
    """Forward + backward FLOPs of one image, counted on a meta-device replica built from ``model.config``."""
    from torch.utils.flop_counter import FlopCounterMode

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "image_size"):
        return None
    try:
        with torch.device("meta"):
            replica = type(model)(config)
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        pixels = torch.empty(1, getattr(config, "num_channels", 3), size, size, device="meta")
        params = [p for p in replica.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            out = replica(pixel_values=pixels)
            loss = getattr(out, "loss", None)
            loss = loss if loss is not None else out.logits.float().sum()
            torch.autograd.grad(loss, params, allow_unused=True)
        return float(counter.get_total_flops())
    except Exception as err:  # an exotic model: MFU is then unavailable, training goes on
        logger.info(
            "could not count FLOPs of %s (%s); pass --flops_per_sample for TFLOP/s and MFU", type(model).__name__, err
        )
        return None


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def default_peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    from hf_medvis.infra.catalog import gpu_peak_tflops

    return gpu_peak_tflops(torch.cuda.get_device_name(), precision)


class ThroughputCallback(TrainerCallback):
    """Adds images_per_second, tflops_per_gpu, mfu and data_wait_pct to each training log (they reach the console,
    trainer_state.json and the structured logs; reporters that run before user callbacks, such as TensorBoard, see
    them in ``state.log_history``) and writes a summary at the end."""

    def __init__(
        self,
        monitoring: MonitoringArguments,
        training_args: TrainingArguments,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.clock = clock
        self.images_per_step = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * max(1, training_args.world_size)
        )
        self.world_size = max(1, training_args.world_size)
        self.flops_per_sample = monitoring.flops_per_sample
        self.peak_tflops = monitoring.peak_tflops
        self.precision = _precision(training_args)
        self.output_dir = training_args.output_dir
        self.intervals: list[dict[str, float]] = []
        self._reset_interval()
        self._ref: float | None = None  # end of the last step, log, evaluation or save
        self._step_begin: float | None = None
        self._last_step_end: float | None = None

    def _reset_interval(self) -> None:
        self._compute = 0.0
        self._wait = 0.0
        self._steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.flops_per_sample is None and model is not None:
            self.flops_per_sample = count_model_flops_per_sample(model)
        if self.peak_tflops is None:
            self.peak_tflops = default_peak_tflops(self.precision)
        self._ref = self.clock()

    def on_step_begin(self, args, state, control, **kwargs):
        now = self.clock()
        if self._ref is not None:
            self._wait += now - self._ref
        self._step_begin = now

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self._step_begin is not None:
            self._compute += now - self._step_begin
        self._steps += 1
        self._ref = self._last_step_end = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = self.clock()
        if logs is None or not _is_training_log(logs) or self._steps == 0:
            self._ref = now
            return
        if self._last_step_end is not None and self._ref == self._last_step_end:
            self._compute += now - self._last_step_end  # the Trainer's loss sync drains the GPU queue: compute time
        elapsed = self._compute + self._wait
        stats = {"steps": self._steps, "seconds": elapsed, "wait_seconds": self._wait}
        self.intervals.append(stats)
        metrics = self.metrics_for(self._steps, elapsed, self._wait)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self._reset_interval()
        self._ref = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._ref = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self._ref = self.clock()

    def metrics_for(self, steps: int, seconds: float, wait_seconds: float) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if seconds <= 0:
            return metrics
        images_per_second = steps * self.images_per_step / seconds
        metrics["images_per_second"] = _sig(images_per_second)
        metrics["data_wait_pct"] = round(100.0 * wait_seconds / seconds, 2)
        if self.flops_per_sample:
            tflops = self.flops_per_sample * images_per_second / self.world_size / 1e12
            metrics["tflops_per_gpu"] = _sig(tflops)
            if self.peak_tflops:
                metrics["mfu"] = _sig(tflops / self.peak_tflops)
        return metrics

    def summary(self) -> dict[str, Any]:
        # The first interval holds start-up (worker spawn, compilation, cuDNN autotuning): left out when there are more.
        steady = self.intervals[1:] if len(self.intervals) > 1 else self.intervals
        steps = sum(i["steps"] for i in steady)
        seconds = sum(i["seconds"] for i in steady)
        wait = sum(i["wait_seconds"] for i in steady)
        summary: dict[str, Any] = {
            "intervals": len(self.intervals),
            "steady_state_intervals": len(steady),
            "images_per_step": self.images_per_step,
            "flops_per_sample": self.flops_per_sample,
            "peak_tflops": self.peak_tflops,
        }
        summary.update(self.metrics_for(steps, seconds, wait))
        return summary

    def on_train_end(self, args, state, control, **kwargs):
        if not self.intervals:
            return
        summary = self.summary()
        if state.is_world_process_zero:
            parts = [
                f"{summary.get('images_per_second', 0):.1f} images/s",
                f"data wait {summary.get('data_wait_pct', 0):.1f}%",
            ]
            if "tflops_per_gpu" in summary:
                parts.append(f"{summary['tflops_per_gpu']:.3g} TFLOP/s per GPU")
            if "mfu" in summary:
                parts.append(f"MFU {summary['mfu']:.1%}")
            logger.info("throughput summary (steady state): %s", ", ".join(parts))
            path = Path(self.output_dir or ".") / "throughput.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Alerts


def _redact(url: str) -> str:
    """scheme://host/… only: webhook URLs often carry a token in the path or query."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}/…"


def cuda_memory_fraction() -> float | None:
    """Fraction of the current GPU's memory in use (all processes), from cudaMemGetInfo: no stream sync."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / total if total else None


class AlertCallback(TrainerCallback):
    """Checks each training log for NaN/inf, loss spikes, throughput drops, data-wait and memory; each alert goes to
    the log (WARNING), output_dir/alerts.jsonl (main process), an optional webhook, and optionally stops training.
    An alert of one kind fires once, and again only after the condition has cleared."""

    def __init__(
        self,
        monitoring: MonitoringArguments,
        training_args: TrainingArguments,
        memory_probe: Callable[[], float | None] = cuda_memory_fraction,
    ):
        self.m = monitoring
        self.output_dir = Path(training_args.output_dir or ".")
        self.rank = training_args.process_index
        self.is_main = training_args.process_index == 0
        self.node = socket.gethostname()
        self.memory_probe = memory_probe
        self.losses: deque[float] = deque(maxlen=monitoring.alert_loss_window)
        self.speeds: deque[float] = deque(maxlen=monitoring.alert_loss_window)
        self.active: set[str] = set()
        self.fired: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self._logs_seen = 0

    # The rules -------------------------------------------------------------------------------------------------------
    def check(self, logs: dict[str, Any]) -> list[dict[str, Any]]:
        """Conditions present in one training log: a list of {kind, message, value, threshold}."""
        found: list[dict[str, Any]] = []
        self._logs_seen += 1
        if self.is_main:  # loss and speed are the same on every rank after the Trainer's gather: judge them once
            found += self._check_loss(logs)
            found += self._check_speed(logs)
        fraction = self.memory_probe() if self.memory_probe else None
        if fraction is not None and fraction > self.m.alert_memory:
            found.append(self._finding("memory", f"accelerator memory {fraction:.1%} in use on rank {self.rank} "
                                       f"(limit {self.m.alert_memory:.0%})", fraction, self.m.alert_memory))  # fmt: skip
        return found

    @staticmethod
    def _finding(kind: str, message: str, value: float, threshold: float | None) -> dict[str, Any]:
        return {"kind": kind, "message": message, "value": value, "threshold": threshold}

    def _check_loss(self, logs: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        bad = {
            k: logs[k]
            for k in ("loss", "grad_norm")
            if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])
        }
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            found.append(self._finding("nonfinite", f"non-finite {what}", next(iter(bad.values())), None))
            return found
        loss = logs.get("loss")
        if isinstance(loss, (int, float)):
            if len(self.losses) >= 5:
                median = statistics.median(self.losses)
                limit = median + (self.m.alert_loss_spike - 1) * abs(median)
                if loss > limit:
                    found.append(
                        self._finding(
                            "loss_spike",
                            f"loss {loss:.4g} > {self.m.alert_loss_spike:g}x moving median {median:.4g}",
                            loss,
                            limit,
                        )
                    )
            self.losses.append(float(loss))
        return found

    def _check_speed(self, logs: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        speed, wait = logs.get("images_per_second"), logs.get("data_wait_pct")
        if self._logs_seen == 1:  # the first interval includes start-up: no baseline, no judgement
            return found
        if isinstance(speed, (int, float)):
            if len(self.speeds) >= 2:
                median = statistics.median(self.speeds)
                limit = (1 - self.m.alert_throughput_drop) * median
                if speed < limit:
                    found.append(
                        self._finding(
                            "throughput_drop",
                            f"{speed:.1f} images/s < {limit:.1f} ({1 - self.m.alert_throughput_drop:.0%} of moving median {median:.1f})",
                            speed,
                            limit,
                        )
                    )
            self.speeds.append(float(speed))
        if isinstance(wait, (int, float)) and wait / 100 > self.m.alert_data_wait:
            found.append(
                self._finding(
                    "data_wait",
                    f"{wait:.1f}% of step time waiting for data (limit {self.m.alert_data_wait:.0%})",
                    wait / 100,
                    self.m.alert_data_wait,
                )
            )
        return found

    # Delivery --------------------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not _is_training_log(logs):
            return
        findings = self.check(logs)
        kinds = {f["kind"] for f in findings}
        new = [f for f in findings if f["kind"] not in self.active]
        self.active = kinds
        for finding in new:
            self.raise_alert(finding, state)
        if self.m.stop_on_alert and self._any_rank_alerted(bool(new)):
            logger.warning("stopping training after an alert (--stop_on_alert)", extra={"step": state.global_step})
            control.should_training_stop = True

    def raise_alert(self, finding: dict[str, Any], state: TrainerState) -> dict[str, Any]:
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "step": state.global_step,
            "epoch": state.epoch,
            "node": self.node,
            "rank": self.rank,
            **finding,
        }
        self.fired.append(record)
        logger.warning(
            "ALERT %s at step %d: %s",
            finding["kind"],
            state.global_step,
            finding["message"],
            extra={"step": state.global_step},
        )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with (self.output_dir / "alerts.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        if self.m.alert_webhook:
            thread = threading.Thread(target=self._post, args=(record,), name="alert-webhook", daemon=True)
            thread.start()  # off the training loop: a slow endpoint must not stall the step
            self._threads.append(thread)
        return record

    def _post(self, record: dict[str, Any]) -> None:
        body = {
            "text": f"hf_medvis alert {record['kind']} at step {record['step']} (rank {record['rank']}): {record['message']}",
            "alert": record,
        }
        request = urllib.request.Request(
            self.m.alert_webhook,
            data=json.dumps(body, default=str).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except Exception as err:  # never let alert delivery break training
            logger.warning("alert webhook %s failed: %s", _redact(self.m.alert_webhook or ""), type(err).__name__)

    def _any_rank_alerted(self, alerted: bool) -> bool:
        """Every rank must stop at the same step or the others hang in the next collective: agree by all-reduce."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return alerted
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        flag = torch.tensor([1.0 if alerted else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # once per logging step, where the Trainer syncs anyway
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        for thread in self._threads:
            thread.join(timeout=15)


# --------------------------------------------------------------------------------------------------------------------
# Profiler


class ProfilerCallback(TrainerCallback):
    """torch.profiler over optimizer steps FIRST..LAST: a TensorBoard trace per rank in ``trace_dir`` and a table of
    the top operators (printed by the main process, saved per rank as top_ops-rank<R>.txt)."""

    def __init__(self, steps: tuple[int, int], trace_dir: str | os.PathLike, rank: int = 0, top_ops: int = 15):
        self.first, self.last = steps
        self.trace_dir = Path(trace_dir)
        self.rank = rank
        self.top_ops = top_ops
        self.profiler: torch.profiler.profile | None = None
        self.table: str | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if (
            self.profiler is None
            and self.table is None
            and state.global_step + 1 >= self.first
            and state.global_step < self.last
        ):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(
                activities=activities,
                record_shapes=True,
                profile_memory=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    str(self.trace_dir), worker_name=f"{socket.gethostname()}_rank{self.rank}"
                ),
            )
            self.profiler.start()
            logger.info("profiler started at step %d (until step %d)", state.global_step + 1, self.last)

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step >= self.last:
            self._finish()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # training ended inside the range
            self._finish()

    def _finish(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()  # writes the trace through on_trace_ready
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self.table = profiler.key_averages().table(sort_by=sort_by, row_limit=self.top_ops)
        (self.trace_dir / f"top_ops-rank{self.rank}.txt").write_text(self.table + "\n")
        if self.rank == 0:
            print(
                f"Top {self.top_ops} operators (profiled steps {self.first}-{self.last}), trace in {self.trace_dir}:\n{self.table}",
                flush=True,
            )
        logger.info("profiler trace written to %s", self.trace_dir)


# --------------------------------------------------------------------------------------------------------------------


def build_monitoring_callbacks(args: MonitoringArguments, training_args: TrainingArguments) -> list[TrainerCallback]:
    """The callbacks the flags ask for, in the order they must run (throughput fills the logs the alerts read)."""
    output_dir = Path(training_args.output_dir or ".")
    rank = training_args.process_index
    callbacks: list[TrainerCallback] = []
    if args.throughput:
        callbacks.append(ThroughputCallback(args, training_args))
    if args.alerts:
        callbacks.append(AlertCallback(args, training_args))
        if training_args.logging_nan_inf_filter:
            logger.info(
                "logging_nan_inf_filter is on: NaN/inf step losses are hidden from logs; NaN alerts rely on grad_norm"
            )
    if args.structured_logs:
        # Installed now, not at train begin, so model loading and data preparation messages are captured too. Placed
        # after the throughput callback so the metrics line it writes carries images/s, TFLOP/s and data wait.
        handler = install_json_log_handler(output_dir / "logs", rank=rank)
        callbacks.append(StructuredLogCallback(handler))
    if args.profile_steps:
        callbacks.append(
            ProfilerCallback(parse_step_range(args.profile_steps), output_dir / "profile", rank, args.profile_top_ops)
        )
    return callbacks
