"""nccl-check's report: the results of every rank agreed in one table (nccl-tests' columns), and the pass/fail
comparison of the measured all-reduce bus bandwidth with the expected figure of the hardware."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .nccl import CollectiveResult


@dataclass
class CheckReport:
    world_size: int
    nodes: int
    backend: str
    device: str
    dtype: str
    nccl_version: str | None
    nccl_env: dict[str, str]
    results: list[CollectiveResult] = field(default_factory=list)
    expectation: dict[str, Any] | None = None

    @property
    def all_correct(self) -> bool:
        return all(r.correct for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["all_correct"] = self.all_correct
        return data


def format_table(report: CheckReport) -> str:
    lines = [
        f"# nccl-check: {report.world_size} ranks on {report.nodes} node(s), backend {report.backend}, device {report.device}, "
        f"dtype {report.dtype}",
        f"# NCCL version: {report.nccl_version or 'n/a'}; NCCL_* environment: "
        + (" ".join(f"{k}={v}" for k, v in report.nccl_env.items()) or "(none)"),
        f"# {'collective':<15}{'size':>12}{'count':>12}{'time(us)':>12}{'algbw(GB/s)':>13}{'busbw(GB/s)':>13}  check",
    ]
    for r in report.results:
        lines.append(
            f"  {r.op:<15}{r.size_bytes:>12}{r.count:>12}{r.time_us:>12.1f}{r.algbw_gbps:>13.3f}{r.busbw_gbps:>13.3f}  "
            + ("OK" if r.correct else f"FAIL (max error {r.max_error:g})")
        )
    if report.results:
        avg = statistics.fmean(r.busbw_gbps for r in report.results)
        lines.append(
            f"# Avg bus bandwidth: {avg:.3f} GB/s; correctness: {'all OK' if report.all_correct else 'FAILED'}"
        )
    if report.expectation:
        e = report.expectation
        lines.append(
            f"# Expectation: peak all_reduce busbw {e['measured_gbps']:.2f} GB/s vs {e['required_gbps']:.2f} GB/s required "
            f"({e['tolerance']:.0%} of {e['expected_gbps']:.2f} GB/s from {e['source']}): {'PASS' if e['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


def evaluate_expectation(
    results: Sequence[CollectiveResult], expected_gbps: float, tolerance: float, source: str
) -> dict[str, Any]:
    """Pass when the best all-reduce busbw reaches ``tolerance`` × the expected figure (expected figures are quoted at
    large messages, so the best size of the sweep is the fair comparison)."""
    measured = max((r.busbw_gbps for r in results if r.op == "all_reduce"), default=0.0)
    if not any(r.op == "all_reduce" for r in results):
        raise ValueError("--expect-busbw compares all_reduce busbw: include all_reduce in --ops")
    required = expected_gbps * tolerance
    return {
        "expected_gbps": expected_gbps,
        "tolerance": tolerance,
        "required_gbps": required,
        "measured_gbps": measured,
        "source": source,
        "passed": measured >= required,
    }
