"""Alerts on the logged metrics: NaN/inf, loss spikes, throughput drops, data wait, accelerator memory.

They are evaluated at logging steps, on the values the Trainer logs (the loss averaged over the interval and across
ranks, the last grad norm). With ``logging_nan_inf_filter`` (the Trainer default) NaN/inf step losses are replaced before
logging, so a NaN shows up as a non-finite ``grad_norm``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import threading
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..args import MonitoringArguments
from .common import add_to_log, is_training_log

logger = logging.getLogger(__name__)


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
    An alert of one kind fires once, and again only after the condition has cleared. Each training log carries
    ``alerts_total`` (alerts fired so far on this process) and ``alert_<kind>: 1.0`` for each alert fired at its step,
    as numbers the reporters chart (they run after this callback: ``reporters.arrange_reporters``)."""

    adds_to_logs = True  # run before the reporters, after ThroughputCallback whose keys the rules read

    def __init__(
        self,
        monitoring: MonitoringArguments,
        training_args: TrainingArguments,
        memory_probe: Callable[[], float | None] = cuda_memory_fraction,
    ) -> None:
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
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not is_training_log(logs):
            return
        findings = self.check(logs)
        kinds = {f["kind"] for f in findings}
        new = [f for f in findings if f["kind"] not in self.active]
        self.active = kinds
        for finding in new:
            self.raise_alert(finding, state)
        scalars: dict[str, float] = {"alerts_total": float(len(self.fired))}
        scalars.update({f"alert_{finding['kind']}": 1.0 for finding in new})
        add_to_log(state, logs, scalars)
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
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return alerted
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        flag = torch.tensor([1.0 if alerted else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # once per logging step, where the Trainer syncs anyway
        return bool(flag.item())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for thread in self._threads:
            thread.join(timeout=15)
