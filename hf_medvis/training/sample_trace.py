"""Which samples each optimizer step consumed, per rank: ``HF_MEDVIS_SAMPLE_TRACE=DIR`` writes
``DIR/samples-rank<R>.jsonl`` lines ``{"step": S, "keys": [...]}``. Off by default; used to verify exactly-once data
order across a preemption and resume (the tests), or to audit which images a run saw."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "HF_MEDVIS_SAMPLE_TRACE"
BATCH_KEY = "sample_keys"  # rides along in the collated batch; the Trainer removes it before the model sees it


class SampleTrace:
    def __init__(self, folder: str | os.PathLike, rank: int) -> None:
        self.path = Path(folder) / f"samples-rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, rank: int) -> SampleTrace | None:
        folder = os.environ.get(ENV_VAR)
        return cls(folder, rank) if folder else None

    def wrap_collator(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Callable:
        def collate_with_keys(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            batch[BATCH_KEY] = [str(example.get("key", example.get("path", "?"))) for example in examples]
            return batch

        return collate_with_keys

    def record(self, step: int, keys: list[str]) -> None:
        # One flushed line per batch: a SIGKILL loses at most the line being written.
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def read_trace(folder: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """rank -> records, in the order they were written."""
    traces = {}
    for path in sorted(Path(folder).glob("samples-rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples-rank"))
        traces[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return traces
