"""Throughput per logging interval: images/s, achieved TFLOP/s per GPU, MFU and data-wait share, with no host-device
sync of its own.

- Throughput is timed on the host between step events. Step boundaries on the host are fuzzy on a GPU (kernels run
  asynchronously), but each logging interval ends with the Trainer's own ``loss.item()`` sync, which we count as
  compute, so interval totals are right. Evaluation and checkpoint time are excluded.
- Data wait is the host time between one step's ``on_step_end`` (or the end of logging / evaluation / saving) and the
  next ``on_step_begin``: in the HF Trainer that is where the next batch(es) are fetched from the DataLoader
  (``get_batch_samples``). If the GPU queue is still draining during the fetch, that time overlaps GPU work, so it is
  an upper bound on the GPU idle time caused by input; a high value means the input pipeline is the bottleneck.
- FLOPs per image are counted once with torch's FlopCounterMode on a meta-device copy of the model (forward +
  backward); achieved TFLOP/s are per GPU; MFU needs a peak (``--peak_tflops`` or the GPU table in the package data).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ...infra.catalog import gpu_peak_tflops
from ..args import MonitoringArguments, precision_name
from .common import add_to_log, is_training_log, significant

logger = logging.getLogger(__name__)


def count_model_flops_per_sample(model: torch.nn.Module) -> float | None:
    """Forward + backward FLOPs of one image, counted on a meta-device replica built from ``model.config``."""
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


def default_peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(), precision)


class ThroughputCallback(TrainerCallback):
    """Adds images_per_second, tflops_per_gpu, mfu and data_wait_pct to each training log (they reach the console,
    trainer_state.json, the structured logs and, through ``reporters.arrange_reporters``, every ``--report_to``
    reporter) and writes a summary at the end."""

    adds_to_logs = True  # run before the reporters (reporters.arrange_reporters)

    def __init__(
        self,
        monitoring: MonitoringArguments,
        training_args: TrainingArguments,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.images_per_step = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * max(1, training_args.world_size)
        )
        self.world_size = max(1, training_args.world_size)
        self.flops_per_sample = monitoring.flops_per_sample
        self.peak_tflops = monitoring.peak_tflops
        self.precision = precision_name(training_args)
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

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if self.flops_per_sample is None and model is not None:
            self.flops_per_sample = count_model_flops_per_sample(model)
        if self.peak_tflops is None:
            self.peak_tflops = default_peak_tflops(self.precision)
        self._ref = self.clock()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = self.clock()
        if self._ref is not None:
            self._wait += now - self._ref
        self._step_begin = now

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = self.clock()
        if self._step_begin is not None:
            self._compute += now - self._step_begin
        self._steps += 1
        self._ref = self._last_step_end = now

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        now = self.clock()
        if logs is None or not is_training_log(logs) or self._steps == 0:
            self._ref = now
            return
        if self._last_step_end is not None and self._ref == self._last_step_end:
            self._compute += now - self._last_step_end  # the Trainer's loss sync drains the GPU queue: compute time
        elapsed = self._compute + self._wait
        stats = {"steps": self._steps, "seconds": elapsed, "wait_seconds": self._wait}
        self.intervals.append(stats)
        add_to_log(state, logs, self.metrics_for(self._steps, elapsed, self._wait))
        self._reset_interval()
        self._ref = now

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._ref = self.clock()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._ref = self.clock()

    def metrics_for(self, steps: int, seconds: float, wait_seconds: float) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if seconds <= 0:
            return metrics
        images_per_second = steps * self.images_per_step / seconds
        metrics["images_per_second"] = significant(images_per_second)
        metrics["data_wait_pct"] = round(100.0 * wait_seconds / seconds, 2)
        if self.flops_per_sample:
            tflops = self.flops_per_sample * images_per_second / self.world_size / 1e12
            metrics["tflops_per_gpu"] = significant(tflops)
            if self.peak_tflops:
                metrics["mfu"] = significant(tflops / self.peak_tflops)
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

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
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
