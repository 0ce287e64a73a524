"""Checkpoints that resume trusts: the completion marker, "is this checkpoint usable?", the newest usable one.

A checkpoint folder counts only once it holds ``checkpoint_complete.json``, written by rank 0 after every rank has
finished writing (``callbacks/checkpoint_commit.py``, installed last by ``MedVisTrainer``). A crash or SIGKILL mid-save
leaves a folder without it, which ``last_complete_checkpoint`` skips. The marker also records every file of the
checkpoint with its size, so a checkpoint damaged later (a copy cut short, a file lost) is found before resuming from
it: sizes, the headers of safetensors and torch zip files, the JSON files parsed; nothing is loaded
(``checkpoint_problem``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path

from ..core.storage import write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in a checkpoint folder, but the marker and hidden temp files."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith(".")
    }


def mark_complete(checkpoint_dir: str | os.PathLike, global_step: int) -> None:
    """Writes the marker atomically (it exists whole or not at all), with the size of every file the save wrote."""
    folder = Path(checkpoint_dir)
    record = {"global_step": global_step, "time": time.time(), "files": _checkpoint_files(folder)}
    write_json_atomic(folder / COMPLETE_MARKER, record)


def mark_incomplete(checkpoint_dir: str | os.PathLike) -> None:
    """Before (re)writing into a folder: until the new save is whole, it must not look complete."""
    marker = Path(checkpoint_dir) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / COMPLETE_MARKER).is_file()


def _size_change(name: str, actual: int, recorded: int) -> str:
    if actual < recorded:
        return f"a truncated {name} ({actual:,} of {recorded:,} bytes)"
    return f"a changed {name} ({actual:,} bytes, {recorded:,} when saved)"


def _safetensors_problem(path: Path) -> str | None:
    """The 8-byte header length, the JSON header, and the end of its last tensor against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if size < 8 or length > size - 8:
            return f"a truncated {path.name} ({size:,} bytes, shorter than its header)"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"an unreadable {path.name} (its header is not safetensors JSON)"
    expected = 8 + length + end
    return None if expected == size else _size_change(path.name, size, expected)


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose central directory is at the end: a file cut short has none. Opening the
    archive reads that directory only (``testzip`` would read everything)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # torch's legacy pickle format, or not ours: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as archive:
            last = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"a truncated or damaged {path.name} (no zip central directory)"
    return None if last <= path.stat().st_size else f"a truncated {path.name}"


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return f"an unreadable {path.name} (not JSON)"
    return None


_FORMAT_CHECKS = {".safetensors": _safetensors_problem, ".json": _json_problem}
_FORMAT_CHECKS.update(dict.fromkeys((".pt", ".pth", ".bin"), _torch_file_problem))


def _layout_problem(folder: Path) -> str | None:
    """The files a resume reads whatever the layout: the Trainer's state, and the weights (one safetensors file, an
    index and the shards it names, or DeepSpeed's ``latest`` and the ``global_stepN`` folder it names)."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json"
    latest = folder / "latest"
    if latest.is_file():  # DeepSpeed: its engine state, per rank, in the folder ``latest`` names
        tag = latest.read_text().strip()
        if not tag or not (folder / tag).is_dir() or not any((folder / tag).iterdir()):
            return f"no DeepSpeed folder {tag or '(latest is empty)'}"
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"an unreadable {index.name}"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        return f"no {missing[0]} (named in {index.name})" if missing else None
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return "no model.safetensors"
    return None


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from, as words that follow "the checkpoint has", naming the file
    (``"no checkpoint_complete.json (...)"``, ``"a truncated model.safetensors (1,000 of 2,000 bytes)"``); None when it
    is sound. Cheap whatever the checkpoint's size: sizes, file headers and small JSON files are read, no tensor."""
    folder = Path(checkpoint_dir)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (interrupted while saving, or not written by hf_medvis)"
    try:
        recorded = json.loads(marker.read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return f"an unreadable {COMPLETE_MARKER}"
    try:
        for name, size in recorded.items():  # what the save wrote (markers of older versions list nothing)
            path = folder / name
            if not path.is_file():
                return f"no {name} (it had one when saved)"
            if path.stat().st_size != size:
                return _size_change(name, path.stat().st_size, size)
        problem = _layout_problem(folder)
        if problem is not None:
            return problem
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            check = _FORMAT_CHECKS.get(path.suffix)
            problem = check(path) if check is not None and path.name != COMPLETE_MARKER else None
            if problem is not None:
                return problem
    except OSError as err:
        return f"a file that cannot be read ({err.strerror or type(err).__name__}: {err.filename})"
    return None


def numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders, newest first."""
    found = ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)))
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` that is complete and readable (``checkpoint_problem``); each newer one that is
    not (half-written by a crash, truncated, a file lost) is named in one warning line, with what is wrong, and
    skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    for _step, path in numbered_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("%s has %s: not resuming from it", path.name, problem)
    return None
