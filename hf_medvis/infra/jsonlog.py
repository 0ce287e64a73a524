"""Per-rank structured logs: one JSON object per line with time, node, rank, step, level, logger and message, written
to ``<dir>/<node>-rank<R>.jsonl``. ``hf-medvis logs`` reads them back across ranks and nodes."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

from ..core.launch_env import rank_and_world_size

LOGGERS = ("", "transformers", "accelerate", "DeepSpeed")  # transformers and DeepSpeed do not propagate to root


class JsonLinesHandler(logging.Handler):
    """A logging.Handler writing JSON lines; ``step`` is updated by the training callbacks as steps pass."""

    def __init__(
        self, directory: str | os.PathLike, rank: int | None = None, node: str | None = None, level: int = logging.INFO
    ) -> None:
        super().__init__(level)
        self.rank = rank_and_world_size()[0] if rank is None else rank
        self.node = node or socket.gethostname()
        self.step: int | None = None
        self.path = Path(directory) / f"{self.node}-rank{self.rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        # Attached to root and to libraries that may or may not propagate: write each record once.
        if getattr(record, "_json_lines_written", None) == id(self):
            return
        record._json_lines_written = id(self)  # an int: records may be pickled by other handlers
        try:
            entry = {
                "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
                "node": self.node,
                "rank": self.rank,
                "step": getattr(record, "step", self.step),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                entry["exception"] = logging.Formatter().formatException(record.exc_info)
            line = json.dumps(entry, default=str)
            with self._write_lock:
                self._file.write(line + "\n")
                self._file.flush()  # a crashed rank's last lines are the ones you need
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self._write_lock:
            if not self._file.closed:
                self._file.close()
        super().close()


def install_json_log_handler(
    directory: str | os.PathLike, rank: int | None = None, node: str | None = None, level: int = logging.INFO
) -> JsonLinesHandler:
    """Attaches one handler to the root logger and the libraries that do not propagate, replacing an earlier one."""
    remove_json_log_handlers()
    handler = JsonLinesHandler(directory, rank=rank, node=node, level=level)
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    # Our own INFO lines (throughput, alerts) must reach the handler even when the root logger sits at WARNING.
    package_logger = logging.getLogger("hf_medvis")
    if package_logger.level == logging.NOTSET or package_logger.level > level:
        package_logger.setLevel(level)
    return handler


def remove_json_log_handlers() -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, JsonLinesHandler):
                logger.removeHandler(handler)
                handler.close()
