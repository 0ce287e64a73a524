"""Small helpers shared by the monitoring callbacks."""

from __future__ import annotations

from typing import Any


def is_training_log(logs: dict[str, Any]) -> bool:
    """A log record of training steps (not evaluation, not the end-of-training summary)."""
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
