"""Shared fixtures. The Hub is pointed at a dead local port (the Makefile sets HF_ENDPOINT) so nothing reaches it."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# As the recipes do on a host without CUDA: otherwise the first save_pretrained of a test process imports DeepSpeed
# (through accelerate), whose accelerator probe prints a WARNING to stdout, into whichever test happens to run first.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# --- output guard ---------------------------------------------------------------------------------------------------
# Two classes of defect must never come back silently: a checkpoint reload that drops weights (transformers reports it
# as a WARNING and trains on) and a traceback where a recipe or CLI should have printed one line. Every command a test
# runs through subprocess, and every transformers log record of the test itself, is checked for both; a test whose
# commands print a traceback on purpose names its exception: @pytest.mark.allow_traceback("SignalException", reason=...).

WEIGHT_LOAD_WARNING = re.compile(r"(missing|unexpected) keys in the checkpoint|were not used when initializing")
TRACEBACK = "Traceback (most recent call last)"


def output_defects(text: str, allowed_traceback: str | None = None) -> list[str]:
    """What in ``text`` makes a test fail: weight-load warnings, and every traceback whose exception line does not name
    ``allowed_traceback``."""
    lines = text.splitlines()
    defects = [line for line in lines if WEIGHT_LOAD_WARNING.search(line)]
    for start, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        # The exception line is the first one after the header that is not indented (the frames are).
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines) - 1)
        if not (allowed_traceback and allowed_traceback in lines[end]):
            defects.append("\n".join(lines[max(end - 12, start) : end + 1]))
    return defects


class _RecordWeightWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if WEIGHT_LOAD_WARNING.search(message):
            self.found.append(message[:500])


@pytest.fixture(autouse=True)
def output_guard(request, monkeypatch):
    marker = request.node.get_closest_marker("allow_traceback")
    allow = marker.args[0] if marker else None
    seen: list[str] = []

    def text_of(*parts) -> str:
        return "\n".join(p.decode(errors="replace") if isinstance(p, bytes) else p for p in parts if p)

    original_run, original_communicate = subprocess.run, subprocess.Popen.communicate

    def run(*args, **kwargs):
        result = original_run(*args, **kwargs)
        seen.append(text_of(result.stdout, result.stderr))
        return result

    def communicate(self, *args, **kwargs):
        out, err = original_communicate(self, *args, **kwargs)
        seen.append(text_of(out, err))
        return out, err

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    handler = _RecordWeightWarnings()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        yield
    finally:
        transformers_logger.removeHandler(handler)
    defects = handler.found + [d for text in seen for d in output_defects(text, allow)]
    if defects:
        pytest.fail("defects in the output of this test's commands:\n" + "\n---\n".join(defects[:5]), pytrace=False)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom set (64 px) shared by the whole session; treat it as read-only."""
    from hf_medvis.data.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "set", patients=16, seed=3, image_size=64)


# The phantom set with segmentation masks (``masked_phantom_dir``): tests recompute its masks from these.
MASKED_PATIENTS, MASKED_SEED, MASKED_SIZE = 16, 3, 64


@pytest.fixture(scope="session")
def masked_phantom_dir(tmp_path_factory) -> Path:
    """A small phantom set with masks (``masks/`` + ``classes.json``; PNG and DICOM images, 64 px) shared by the
    session; read-only (copy it to change files)."""
    from hf_medvis.data.phantoms import write_phantom_dataset

    out = tmp_path_factory.mktemp("masked_phantoms") / "set"
    return write_phantom_dataset(out, patients=MASKED_PATIENTS, seed=MASKED_SEED, image_size=MASKED_SIZE, masks=True)


@pytest.fixture(scope="session")
def labelled_shards(phantom_dir, tmp_path_factory) -> Path:
    """``phantom_dir``'s PNGs prepared as 64 px shards of 5 samples with their labels (10 shards); read-only."""
    from hf_medvis.data.prepare import prepare

    dst = tmp_path_factory.mktemp("labelled_shards") / "shards"
    labels = str(phantom_dir / "labels.csv")
    prepare(str(phantom_dir / "images"), str(dst), size=64, shard_size=5, salt="x", labels=labels)
    return dst


@contextlib.contextmanager
def mounted(*mount_args: str, target: Path) -> Iterator[Path]:
    """``mount MOUNT_ARGS TARGET`` for the block (a small tmpfs, a read-only bind mount); the test is skipped with the
    reason where this machine does not allow it."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(mount_args)}): {result.stderr.strip()[:200] or 'not permitted'}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True)


@pytest.fixture(scope="session")
def tiny_mae_dir(tmp_path_factory) -> Path:
    """An untrained tiny-preset MAE (64 px, patch 8) saved as pretrain_mae.py saves one (weights + processor, X-ray
    statistics 0.5/0.25), the starting point of fine-tuning tests; read-only."""
    from hf_medvis.models.build import build_image_processor, build_mae_model

    folder = tmp_path_factory.mktemp("tiny_mae") / "mae"
    torch.manual_seed(0)
    build_mae_model(None, preset="tiny", image_size=64).save_pretrained(folder)
    build_image_processor(64, [0.5] * 3, [0.25] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def medvis_cache(tmp_path_factory) -> Path:
    """HF_MEDVIS_CACHE for subprocesses, so the embedded default set is generated once per session."""
    return tmp_path_factory.mktemp("medvis_cache")


def load_recipe(name: str):
    """Imports recipes/<name>.py as a module (recipes are scripts, not package modules)."""
    path = REPO / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_recipe(recipe, argv: list[str]) -> str:
    """Runs a loaded recipe in this process; returns its log (setup_logging logs to stdout)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        recipe.main(argv)
    return log.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A labels file as a user's tools would write it (csv module, header first)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def copy_checkpoints(reference: Path, steps: tuple[int, ...], target: Path) -> Path:
    """A new run folder ``target`` holding copies of ``reference``'s checkpoints at ``steps``: a run stopped there."""
    target.mkdir()
    for step in steps:
        shutil.copytree(reference / f"checkpoint-{step}", target / f"checkpoint-{step}")
    return target


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """A real Azurite blob service for the session (tests/azurite.py): ``.connection_string``, ``.storage_options``
    (for adlfs), ``.create_container(name)`` -> ``az://name``. Stopped by PID at the end."""
    from azurite import Azurite  # tests/azurite.py (pytest puts tests/ on sys.path)

    try:
        service = Azurite(location=tmp_path_factory.mktemp("azurite")).start()
    except RuntimeError as err:
        pytest.fail(f"Azurite unavailable: {err}")
    yield service
    service.stop()


# --- multi-process runs (scale-out tests) ------------------------------------------------------------------------------
# DeepSpeed JIT-compiles its CPU Adam once per machine; keep the build outside the test's temp folders.
TORCH_EXTENSIONS_DIR = os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hf_medvis" / "torch_extensions")
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, script: str, *args: str, config_file: str | None = None) -> list[str]:
    """2 processes on CPU (gloo): ``torchrun`` or ``accelerate`` (with ``config_file``, else --multi_gpu)."""
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        head = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:
        head = [str(bin_dir / "accelerate"), "launch", "--num_processes", "2", "--main_process_port", port]
        head += ["--config_file", config_file] if config_file else ["--multi_gpu"]
    return [*head, str(REPO / "recipes" / f"{script}.py"), *args]


def multiprocess_env(**extra: str) -> dict[str, str]:
    # A rank that aborts (SIGABRT) prints its Python threads' stacks: the only trace a native abort leaves.
    return subprocess_env(TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR, PYTHONFAULTHANDLER="1", **extra)
