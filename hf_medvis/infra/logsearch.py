"""Search the per-rank JSON-line logs of a run (all ranks and nodes) as one time-ordered stream."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """'30s', '10m', '2h', '1d' (ago) or an ISO time ('2026-01-31T12:00', UTC when no zone is given)."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since expects a duration (30s, 10m, 2h, 1d) or an ISO time, got '{text}'") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_level(text: str) -> int:
    level = LEVELS.get(text.strip().upper())
    if level is None:
        raise ValueError(f"unknown level '{text}' (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def find_log_files(directory: str | Path) -> list[Path]:
    """``*.jsonl`` under DIR, or under DIR/logs when DIR is a run's output_dir (alerts.jsonl is not a log)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    files = sorted(p for p in root.rglob("*.jsonl") if p.name != "alerts.jsonl")
    if not files:
        raise FileNotFoundError(f"no per-rank logs (*.jsonl) under {root}")
    return files


@dataclass
class LogQuery:
    pattern: re.Pattern[str] | None = None
    rank: int | None = None
    min_level: int = 0
    since: datetime | None = None
    node: str | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.rank is not None and entry.get("rank") != self.rank:
            return False
        if self.node is not None and entry.get("node") != self.node:
            return False
        if LEVELS.get(str(entry.get("level", "")).upper(), 0) < self.min_level:
            return False
        if self.since is not None and _entry_time(entry) < self.since:
            return False
        return not (self.pattern is not None and not self.pattern.search(str(entry.get("message", ""))))


def _entry_time(entry: dict[str, Any]) -> datetime:
    try:
        when = datetime.fromisoformat(str(entry.get("time")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def read_entries(files: Iterable[Path], skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # A rank killed mid-write leaves a torn last line: note it, keep going.
                    if skipped is not None:
                        skipped.append(f"{path}:{number}")
                    continue
                if isinstance(entry, dict):
                    yield entry


def search_logs(directory: str | Path, query: LogQuery, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Matching entries from every rank's file, merged in time order (ties by rank)."""
    entries = [e for e in read_entries(find_log_files(directory), skipped) if query.matches(e)]
    entries.sort(key=lambda e: (_entry_time(e), e.get("rank", 0)))
    return entries


def format_entry(entry: dict[str, Any]) -> str:
    step = entry.get("step")
    return (
        f"{entry.get('time', '?')} {entry.get('node', '?')} rank {entry.get('rank', '?')} "
        f"step {'-' if step is None else step} {entry.get('level', '?'):<7} {entry.get('message', '')}"
    )


def compile_pattern(text: str | None, ignore_case: bool = False) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text, re.IGNORECASE if ignore_case else 0)
    except re.error as err:
        raise ValueError(f"--grep: bad regular expression '{text}': {err}") from None
