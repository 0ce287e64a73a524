"""Training-throughput benchmark: the plain Hugging Face Trainer against our recipe, same model, batch and device, one
process.

  (a) plain    -- what a user of transformers' example run_mae.py runs: ``Trainer`` + ``ViTMAEForPreTraining``, images
                  as PIL -> torchvision RandomResizedCrop/flip/ToTensor/Normalize in the loader workers, float32
                  3-channel batches, bf16 on a GPU. Same images (read from the same shards, into memory), same number
                  of workers, the Trainer's defaults otherwise.
  (b) recipe   -- ``recipes/pretrain_mae.py`` itself, run in-process with its config (``mae_vit_base_cxr.yaml``):
                  prepared uint8 shards streamed and augmented in the workers, uint8 batches over pinned memory,
                  normalised on the device by ``MedVisTrainer``, our callbacks on.
  (c) compile  -- (b) + ``--torch_compile true`` (opt-in; GPU only by default: inductor's first compile takes minutes on
                  a CPU).
  (d) devaug   -- (b) + ``--augment_on_device true`` (crop/flip on the device).

``--same-pipeline`` (CPU time; works with ``--quick``) instead runs (a') transformers' ``Trainer`` and (b') the recipe
side by side, twice each in ABBA order (best of the two kept: a busy host only ever adds CPU time), on the SAME raw PNG
folder (phantoms written into --out, or --data), and measures the CPU time of ``trainer.train()`` -- the training
process plus its DataLoader workers (``getrusage`` SELF + CHILDREN, the workers reaped before reading) -- then prints
cProfile's per-step host costs of both and ``cpu_time_vs_plain=<recipe / plain>``. Identical in both: the image list,
the decoder and its cache (``folder.dataset_from_records``), the crop/flip transform (``create_transform`` with
the config's scale and flip), the model (``build_mae_model``: preset, size, patch, mask ratio, norm_pix_loss, seed), and
every TrainingArguments value (the plain run's are copied from the recipe's own parse of the same command line:
optimizer, lr, schedule, steps, batch, workers, prefetch, pin memory, logging steps), one torch intra-op thread in the
training process (``--threads``; with more, idle OpenMP threads spin between small ops and the CPU time measures that).
What differs is what the recipe adds: per-sample seeded crops, uint8 batches normalised in the training process
(run_mae.py normalises float batches in the workers, as the plain run does), MedVisTrainer's hooks and its callbacks
(loss history, throughput, alerts, JSON logs, preemption). FLOPs per image are counted once by the bench and passed
to the recipe (as for the variants above), so its one-time count is reported apart. Set-up and saving are outside
the measured call; the whole runs' CPU time is printed too.

Each run's img/s, TFLOP/s and data-wait % are the steady state of monitoring's ThroughputCallback (first logging
interval -- worker start, compilation, autotuning -- left out); MFU is against the GPU's measured bf16 matmul peak (n/a
on a CPU); peak memory is torch's max allocated (GPU). The last line is
``speedup_vs_plain_trainer=<best recipe variant / plain> mfu=<its MFU or n/a>``; the line before names the variant.
``--quick`` runs tiny models on CPU in well under a minute (the CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import platform
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {  # preset, config, default batch per device (issue 7: 256 for base, 128 for large)
    "mae-base": ("vit-base", "mae_vit_base_cxr.yaml", 256),
    "mae-large": ("vit-large", "mae_vit_base_cxr.yaml", 128),
}
QUICK = {
    "preset": "tiny",
    "image_size": 64,
    "patch_size": 8,
    "shard_size": 73,
    "batch": 16,
    "steps": 12,
    "patients": 48,
    "workers": 1,
}


def _log(message: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Data


def prepare_phantom_shards(root: Path, patients: int, size: int) -> str:
    """Phantom chest X-rays (PNG) -> prepared uint8 shards at ``size``², with the real ``prepare``."""
    from hf_medvis.data.phantoms import write_phantom_dataset
    from hf_medvis.data.prepare import prepare

    raw = write_phantom_dataset(
        root / "phantoms", patients=patients, image_size=max(size, 64), dicom=False, overwrite=True
    )
    n_images = len(list((raw / "images").glob("*.png")))
    dst = root / "shards"
    prepare(
        str(raw / "images"),
        str(dst),
        size=size,
        shard_size=max(16, n_images // 8),
        salt="bench_train",
        labels=str(raw / "labels.csv"),
        workers=min(4, os.cpu_count() or 1),
    )
    return str(dst)


def repeat_manifest(location: str, repeat: int) -> None:
    """List every shard ``repeat`` times in the (benchmark's own, local) manifest."""
    path = Path(location) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"] = [dict(shard) for _ in range(repeat) for shard in manifest["shards"]]
    manifest["totals"]["written"] = int(manifest["totals"]["written"]) * repeat
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def read_shard_pixels(source: str) -> list:
    """Every image of a prepared-shard set as a uint8 H x W array (the plain path's in-memory image list)."""
    import numpy as np

    from hf_medvis.core import storage
    from hf_medvis.data import shard_format
    from hf_medvis.data.streaming import find_manifest

    found = find_manifest(source)
    if found is None:
        raise SystemExit(f"bench_train: {source} is not a prepared-shard location (no manifest.json)")
    base, manifest = found
    images = []
    for shard in {s["path"]: s for s in manifest["shards"]}.values():
        data = storage.read_bytes(storage.join(base, shard["path"]))
        pixel_columns = ["pixels" if manifest.get("version", 1) < 2 else "image", "height", "width", "bits"]
        for row in shard_format.iter_shard_rows(data, columns=pixel_columns):
            array = shard_format.stored_pixels(row)
            if array.dtype != np.uint8:
                array = (array // 257).astype(np.uint8)
            images.append(array)
    return images


class PlainImages:
    """The plain path's dataset, as run_mae.py prepares it: PIL image -> RGB -> RandomResizedCrop(bicubic) -> flip ->
    ToTensor -> Normalize, in the loader workers; float32 [3, H, W] per image. Indexable, so the Trainer samples it."""

    def __init__(self, images: list, size: int, crop_scale: tuple[float, float], hflip: bool, mean, std):
        from torchvision import transforms as T

        steps = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
        self.images, self.transform = images, T.Compose(steps)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        return {"pixel_values": self.transform(Image.fromarray(self.images[index]).convert("RGB"))}


def plain_collate(examples: list[dict]) -> dict:
    import torch

    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}


# --------------------------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Result:
    name: str
    images_per_second: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    data_wait_pct: float | None = None
    peak_gib: float | None = None
    seconds: float | None = None
    note: str = ""

    def row(self) -> str:
        def fmt(value, spec, unit=""):
            return "n/a" if value is None else f"{value:{spec}}{unit}"

        return (
            f"{self.name:9s} {fmt(self.images_per_second, ',.1f'):>10s} img/s  {fmt(self.tflops, '.3g'):>7s} TFLOP/s  "
            f"MFU {fmt(None if self.mfu is None else 100 * self.mfu, '.1f', '%'):>6s}  "
            f"data wait {fmt(self.data_wait_pct, '.1f', '%'):>6s}  peak mem {fmt(self.peak_gib, '.1f', ' GiB'):>9s}"
            + (f"  ({self.note})" if self.note else "")
        )


def _from_summary(name: str, summary: dict, peak_gib, seconds: float, note: str = "") -> Result:
    return Result(
        name,
        summary.get("images_per_second"),
        summary.get("tflops_per_gpu"),
        summary.get("mfu"),
        summary.get("data_wait_pct"),
        peak_gib,
        seconds,
        note,
    )


def run_plain(cfg: dict, out: Path) -> Result:
    """(a): transformers' Trainer as run_mae.py drives it; our ThroughputCallback only measures."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from hf_medvis.models.build import build_mae_model
    from hf_medvis.training.args import MonitoringArguments
    from hf_medvis.training.callbacks import ThroughputCallback
    from hf_medvis.training.perf import peak_memory_gib, reset_peak_memory

    set_seed(0)
    model = build_mae_model(
        None,
        preset=cfg["preset"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_channels=3,
        mask_ratio=cfg["mask_ratio"],
        norm_pix_loss=cfg["norm_pix_loss"],
    )
    dataset = PlainImages(
        cfg["images"], cfg["image_size"], tuple(cfg["crop_scale"]), cfg["hflip"], [cfg["mean"]] * 3, [cfg["std"]] * 3
    )
    args = TrainingArguments(
        output_dir=str(out / "plain"),
        per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"],
        logging_steps=cfg["logging_steps"],
        bf16=cfg["cuda"],
        learning_rate=1.5e-4 * cfg["batch"] / 256,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        remove_unused_columns=False,
        label_names=["pixel_values"],
        dataloader_num_workers=cfg["workers"],
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        deepspeed=cfg.get("deepspeed"),
    )
    meter = ThroughputCallback(MonitoringArguments(peak_tflops=cfg["peak_tflops"], flops_per_sample=cfg["flops"]), args)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=plain_collate, callbacks=[meter])
    cfg["plain_optim"] = str(getattr(args.optim, "value", args.optim))
    reset_peak_memory()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_memory_gib()
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _from_summary("plain", meter.summary(), peak, seconds)


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_flags(recipe) -> set[str]:
    """Argument names the recipe's parser knows (so a variant is offered only when the recipe supports it)."""
    from hf_medvis.data import MAEDataArguments
    from hf_medvis.models import MAEModelArguments

    names = {f.name for cls in (MAEModelArguments, MAEDataArguments) for f in dataclasses.fields(cls)}
    names |= {f.name for f in dataclasses.fields(getattr(recipe, "MAEDataArguments", MAEDataArguments))}
    return names


def run_recipe(name: str, cfg: dict, out: Path, recipe, extra: list[str]) -> Result:
    """(b)-(d): the recipe's own main() with its config; the bench only shortens the run and turns saving off."""
    import torch

    from hf_medvis.training.perf import peak_memory_gib, reset_peak_memory

    output_dir = out / name
    argv = [
        "--config",
        str(cfg["config"]),
        "--train_data",
        cfg["data"],
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "true",
        "--model_preset",
        cfg["preset"],
        "--image_size",
        str(cfg["image_size"]),
        "--patch_size",
        str(cfg["patch_size"]),
        "--per_device_train_batch_size",
        str(cfg["batch"]),
        "--max_steps",
        str(cfg["steps"]),
        "--logging_steps",
        str(cfg["logging_steps"]),
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--num_reconstruction_images",
        "0",
        "--structured_logs",
        "false",
        "--dataloader_num_workers",
        str(cfg["workers"]),
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
    ]
    if cfg["flops"]:
        argv += ["--flops_per_sample", str(cfg["flops"])]
    if cfg["peak_tflops"]:
        argv += ["--peak_tflops", str(cfg["peak_tflops"])]
    if cfg["cuda"]:
        argv += ["--bf16", "true"]
    else:  # a CPU has nothing to pin to; keeps the smoke test free of the warning
        argv += ["--dataloader_pin_memory", "false"]
    if cfg.get("deepspeed"):
        argv += ["--deepspeed", cfg["deepspeed"]]
    argv += extra
    reset_peak_memory()
    start = time.perf_counter()
    recipe.main(argv)
    seconds = time.perf_counter() - start
    peak = peak_memory_gib()
    summary = json.loads((output_dir / "throughput.json").read_text())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _from_summary(name, summary, peak, seconds, note=" ".join(extra))


# --------------------------------------------------------------------------------------------------------------------
# --same-pipeline: CPU time of the plain Trainer and of the recipe on one raw folder through one input pipeline

SAME_QUICK_STEPS = 40  # 12 steps would be mostly worker start-up; 40 make the per-step costs the bulk (~2 s per run)
SAME_ROUNDS = 2  # plain, recipe, recipe, plain: the minimum of each is kept (a busy host only ever adds CPU time)


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU time of this process, and of its finished (waited-for) children: the DataLoader workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _reap_workers(timeout: float = 60.0) -> None:
    """Wait until every DataLoader worker has exited and been waited for (its CPU time then counts as the children's)."""
    gc.collect()  # a loader iterator kept alive by a reference cycle would keep its workers
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.02)


def timed_trainer(base: type, record: dict, profile: bool = False) -> type:
    """``base`` whose ``train()`` records in ``record`` its CPU time (training process + loader workers), the workers'
    share, wall time and steps; with ``profile``, also a cProfile of the training process over the same call."""

    class Timed(base):
        def train(self, *args: Any, **kwargs: Any) -> Any:
            _reap_workers()
            profiler = cProfile.Profile() if profile else None
            cpu, wall = cpu_seconds(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            try:
                return super().train(*args, **kwargs)
            finally:
                if profiler is not None:
                    profiler.disable()
                    record["profile"] = pstats.Stats(profiler, stream=sys.stderr)
                _reap_workers()
                now = cpu_seconds()
                record.update(
                    cpu=now[0] + now[1] - cpu[0] - cpu[1],
                    workers_cpu=now[1] - cpu[1],
                    wall=time.perf_counter() - wall,
                    steps=self.state.global_step,
                )

    return Timed


def same_pipeline_argv(cfg: dict, folder: str, output_dir: Path) -> list[str]:
    """The recipe's command line: its config, the raw folder, no holdout, no checkpoints, its monitoring left on."""
    argv = [
        *("--config", str(cfg["config"]), "--train_data", folder, "--output_dir", str(output_dir)),
        *("--overwrite_output_dir", "true", "--model_preset", cfg["preset"], "--image_size", str(cfg["image_size"])),
        *("--patch_size", str(cfg["patch_size"]), "--per_device_train_batch_size", str(cfg["batch"])),
        *("--max_steps", str(cfg["steps"]), "--logging_steps", str(cfg["logging_steps"]), "--eval_strategy", "no"),
        *("--save_strategy", "no", "--validation_split_percentage", "0", "--num_reconstruction_images", "0"),
        *("--dataloader_num_workers", str(cfg["workers"]), "--disable_tqdm", "true", "--report_to", "none"),
        *("--seed", "0", "--flops_per_sample", str(cfg["flops"])),
    ]
    argv += ["--bf16", "true"] if cfg["cuda"] else ["--dataloader_pin_memory", "false"]
    return argv


class PlainNormalise:
    """run_mae.py's batches: float, normalised, 3 channels, made in the loader workers (its ToTensor + Normalize)."""

    def __init__(self, mean: float, std: float, channels: int = 3) -> None:
        self.mean, self.std, self.channels = [mean] * channels, [std] * channels, channels

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        pixels = torch.stack([e["pixel_values"] for e in examples]).float().div_(255.0)
        pixels = pixels.expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return {"pixel_values": (pixels - mean) / std}


def run_plain_same(cfg: dict, folder: str, out: Path, record: dict, profile: bool = False) -> None:
    """transformers' Trainer as run_mae.py drives it, with the TrainingArguments the recipe's command line gives (same
    optimizer, schedule, loader settings), the same model, and the same folder dataset, decoder and crop/flip."""
    from transformers import Trainer, TrainingArguments, set_seed

    from hf_medvis.core.tasks import MAE
    from hf_medvis.data import MAEDataArguments
    from hf_medvis.data.folder import build_folder_records, dataset_from_records
    from hf_medvis.data.transforms import create_transform
    from hf_medvis.models import MAEModelArguments
    from hf_medvis.models.build import build_mae_model
    from hf_medvis.training.args import MonitoringArguments, PretrainingArguments, parse_recipe_args
    from hf_medvis.training.lr import apply_base_learning_rate

    _, data_args, recipe_args, _ = parse_recipe_args(
        (MAEModelArguments, MAEDataArguments, PretrainingArguments, MonitoringArguments),
        same_pipeline_argv(cfg, folder, out / "plain-same"),
    )
    apply_base_learning_rate(recipe_args, recipe_args.base_learning_rate)
    args = TrainingArguments(
        **{f.name: getattr(recipe_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    )
    set_seed(args.seed)
    model = build_mae_model(
        None,
        preset=cfg["preset"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_channels=3,
        mask_ratio=cfg["mask_ratio"],
        norm_pix_loss=cfg["norm_pix_loss"],
    )
    transform = create_transform(
        MAE, True, image_size=cfg["image_size"], crop_scale=data_args.crop_scale, hflip=data_args.hflip
    )
    dataset = dataset_from_records(build_folder_records(folder), transform)
    trainer = timed_trainer(Trainer, record, profile)(
        model=model, args=args, train_dataset=dataset, data_collator=PlainNormalise(cfg["mean"], cfg["std"])
    )
    metrics = trainer.train().metrics  # then what run_mae.py does after training
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


def run_recipe_same(cfg: dict, folder: str, out: Path, recipe: Any, record: dict, profile: bool = False) -> None:
    """The recipe's own main() on that command line; its Trainer's train() is the measured call."""
    original = recipe.MedVisTrainer
    recipe.MedVisTrainer = timed_trainer(original, record, profile)
    try:
        recipe.main(same_pipeline_argv(cfg, folder, out / "recipe-same"))
    finally:
        recipe.MedVisTrainer = original


# (label, functions whose cumulative time it is: "file fragment:function"); the largest match counts (an override
# includes the method it extends).
COST_GROUPS = [
    ("forward + loss", ["trainer.py:compute_loss"]),
    ("backward", ["accelerate/accelerator.py:backward"]),
    ("grad clip", ["trainer.py:_clip_grad_norm"]),
    ("optimizer + lr step", ["accelerate/optimizer.py:step", "torch/optim/lr_scheduler.py:step"]),
    ("batch from the loader", ["trainer.py:get_batch_samples"]),
    ("batch to device + normalise", ["trainer.py:_prepare_inputs"]),
    ("callbacks (every event)", ["transformers/trainer_callback.py:call_event"]),
    ("log/save/evaluate checks", ["transformers/trainer.py:_maybe_log_save_evaluate"]),
    ("Trainer FLOP estimate", ["trainer.py:floating_point_ops"]),
]


def cost_table(stats: pstats.Stats) -> dict[str, float]:
    """Seconds per COST_GROUPS label (cumulative, training process), plus "train() in all"."""
    table: dict[str, float] = {}
    for label, patterns in COST_GROUPS:
        total = 0.0
        for pattern in patterns:
            where, name = pattern.rsplit(":", 1)
            found = [ct for (file, _, func), (_, _, _, ct, _) in stats.stats.items() if func == name and where in file]
            total += max(found, default=0.0)
        table[label] = total
    table["train() in all"] = max(ct for (_, _, func), (_, _, _, ct, _) in stats.stats.items() if func == "train")
    return table


def top_own_costs(stats: pstats.Stats, steps: int, n: int = 8) -> list[str]:
    """The recipe's own functions (hf_medvis, callbacks) by cumulative time per step, umbrella calls left out."""
    rows = []
    for (file, line, func), (_, calls, _, ct, _) in stats.stats.items():
        if "/hf_medvis/" in file and func not in ("train", "_run_epoch", "get_batch_samples"):
            rows.append((ct, f"{file.split('/hf_medvis/')[-1]}:{line}({func}) x{calls}"))
    rows.sort(reverse=True)
    return [f"  {1e3 * ct / steps:7.2f} ms/step  {name}" for ct, name in rows[:n]]


def run_same_pipeline(cfg: dict, out: Path, recipe: Any, folder: str, flops_cpu: float) -> int:
    """--same-pipeline: both runs SAME_ROUNDS times (ABBA), measured; then once more each under cProfile."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])  # 1: CPU time counts work, not OpenMP threads spinning between small ops
    runs: dict[str, list[dict]] = {"plain": [], "recipe": []}
    order = ["plain", "recipe", "recipe", "plain"] * ((SAME_ROUNDS + 1) // 2)
    try:
        for name in [*order[: 2 * SAME_ROUNDS], "plain-profile", "recipe-profile"]:
            record: dict = {}
            quiet = io.StringIO()
            start = cpu_seconds()
            with contextlib.redirect_stdout(quiet):
                if name.startswith("plain"):
                    run_plain_same(cfg, folder, out, record, profile=name.endswith("profile"))
                else:
                    run_recipe_same(cfg, folder, out, recipe, record, profile=name.endswith("profile"))
            _reap_workers()
            record["run_cpu"] = sum(cpu_seconds()) - sum(start)
            logging.getLogger().handlers.clear()  # the recipe's stdout handler points at the closed capture buffer
            (out / f"same-{name}.log").write_text(quiet.getvalue())
            runs.setdefault(name, []).append(record)
            _log(
                f"{name}: {record['cpu']:.2f} s CPU ({record['workers_cpu']:.2f} s in workers), {record['steps']} steps"
            )
    finally:
        torch.set_num_threads(threads)
    best = {name: min(runs[name], key=lambda r: r["cpu"]) for name in ("plain", "recipe")}
    steps = cfg["steps"]
    print(
        f"bench_train --same-pipeline{' --quick (tiny model)' if cfg['quick'] else ''}: {cfg['preset']} MAE "
        f"{cfg['image_size']}², batch {cfg['batch']}, {steps} steps, {cfg['workers']} loader worker(s), "
        f"{cfg['threads']} intra-op thread(s), {cfg['n_images']} PNG images in {folder}"
    )
    print(f"device: {_versions()}")
    print(
        f"measured: trainer.train() (training process + loader workers), best of {SAME_ROUNDS}; FLOPs per image counted "
        f"once by the bench ({flops_cpu:.2f} s CPU) and passed to the recipe"
    )
    for name in ("plain", "recipe"):
        r = best[name]
        each = ", ".join(f"{x['cpu']:.2f}" for x in runs[name])
        print(
            f"{name:7s} CPU {r['cpu']:6.2f} s ({r['workers_cpu']:5.2f} s in workers)  {1e3 * r['cpu'] / steps:6.1f} "
            f"ms/step  wall {r['wall']:5.2f} s  (runs: {each})"
        )
    run_ratio = min(r["run_cpu"] for r in runs["recipe"]) / min(r["run_cpu"] for r in runs["plain"])
    print(
        f"whole runs (set-up, train(), saving; best of {SAME_ROUNDS}): plain "
        f"{min(r['run_cpu'] for r in runs['plain']):.2f} s, recipe {min(r['run_cpu'] for r in runs['recipe']):.2f} s "
        f"CPU = {run_ratio:.2f}x (the recipe's set-up adds the environment report, split and card work once per run)"
    )
    plain_costs = cost_table(runs["plain-profile"][0]["profile"])
    recipe_stats = runs["recipe-profile"][0]["profile"]
    recipe_costs = cost_table(recipe_stats)
    print("host costs per step, training process (cProfile, which inflates Python-heavy parts): recipe | plain")
    for label in [*(label for label, _ in COST_GROUPS), "train() in all"]:
        print(f"  {label:30s} {1e3 * recipe_costs[label] / steps:7.2f} | {1e3 * plain_costs[label] / steps:7.2f} ms")
    print("top costs of the recipe's own code (cumulative, per step):")
    print("\n".join(top_own_costs(recipe_stats, steps)))
    ratio = best["recipe"]["cpu"] / best["plain"]["cpu"]
    summary = {
        "same_pipeline": True,
        "quick": cfg["quick"],
        "device": _versions(),
        "steps": steps,
        "runs": {k: [{x: y for x, y in r.items() if x != "profile"} for r in v] for k, v in runs.items()},
        "cpu_time_vs_plain": ratio,
        "whole_run_cpu_vs_plain": run_ratio,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / f"results-same-pipeline{'-quick' if cfg['quick'] else ''}.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    bound = cfg.get("max_cpu_ratio")
    if bound is not None and ratio > bound:
        _log(
            f"cpu_time_vs_plain {ratio:.3f} is above --max-cpu-ratio {bound}: the recipe costs more host time per step"
        )
    print(f"cpu_time_vs_plain={ratio:.3f}")
    return 1 if bound is not None and ratio > bound else 0


def same_pipeline_main(args: argparse.Namespace, cfg: dict, out: Path) -> int:
    from hf_medvis.data.folder import list_image_files
    from hf_medvis.data.phantoms import write_phantom_dataset
    from hf_medvis.models.build import build_mae_model
    from hf_medvis.training.callbacks.throughput import count_model_flops_per_sample

    if args.quick and args.steps is None:
        cfg["steps"] = SAME_QUICK_STEPS
        cfg["logging_steps"] = max(1, cfg["steps"] // 4)
    folder = args.data
    if folder is None:
        size = cfg["image_size"] if args.quick else round(cfg["image_size"] * 256 / 224)
        patients = args.patients or (QUICK["patients"] if args.quick else 400)
        raw = write_phantom_dataset(out / "phantoms", patients=patients, image_size=size, dicom=False, overwrite=True)
        folder = str(raw / "images")
    cfg["n_images"] = len(list_image_files(folder))
    cfg["quick"], cfg["threads"], cfg["max_cpu_ratio"] = args.quick, args.threads, args.max_cpu_ratio
    model = build_mae_model(
        None, preset=cfg["preset"], image_size=cfg["image_size"], patch_size=cfg["patch_size"], num_channels=3
    )
    start = sum(cpu_seconds())
    cfg["flops"] = count_model_flops_per_sample(model)
    flops_cpu = sum(cpu_seconds()) - start
    del model
    return run_same_pipeline(cfg, out, load_recipe(Path(args.recipe)), folder, flops_cpu)


# --------------------------------------------------------------------------------------------------------------------


def _versions() -> str:
    import accelerate
    import torch
    import transformers

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    return (
        f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on CPU, < 60 s (CI smoke test)")
    parser.add_argument("--model", choices=sorted(MODELS), default="mae-base")
    parser.add_argument(
        "--data",
        default=None,
        help="prepared-shard location; with --same-pipeline a raw image folder (default: phantoms)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default: 256 base, 128 large)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; quick 12)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers for both (default: the config's)")
    parser.add_argument("--patients", type=int, default=None, help="phantom patients when --data is not given")
    parser.add_argument(
        "--variants", default=None, help="comma list of plain,recipe,compile,devaug (default: all that apply)"
    )
    parser.add_argument(
        "--same-pipeline",
        action="store_true",
        help="CPU time of the plain Trainer and the recipe on one raw folder and one input pipeline "
        "(last line cpu_time_vs_plain=<recipe/plain>); --data is then a raw image folder",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="--same-pipeline: torch intra-op threads of the training process"
    )
    parser.add_argument(
        "--max-cpu-ratio",
        type=float,
        default=None,
        help="--same-pipeline: exit 1 when cpu_time_vs_plain is above this (a benchmark job's gate; see RESULTS.md)",
    )
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "pretrain_mae.py"), help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured on GPU)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON for both runs (e.g. ds_configs/zero2.json)")
    parser.add_argument("--out", default=None, help="folder for run outputs and results.json (default: a temp dir)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from configs: never reach the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import yaml

    from hf_medvis.core.errors import first_line
    from hf_medvis.training.callbacks.throughput import count_model_flops_per_sample
    from hf_medvis.training.perf import measure_matmul_tflops

    cuda = torch.cuda.is_available()
    if args.quick and cuda:
        _log("--quick is the CPU smoke test; running it on the CPU logic anyway (tiny model)")
    preset, config_name, default_batch = MODELS[args.model]
    config_path = REPO / "recipes" / "configs" / config_name
    config = yaml.safe_load(config_path.read_text())
    cfg: dict[str, Any] = {
        "cuda": cuda,
        "config": config_path,
        "preset": preset,
        "image_size": config["image_size"],
        "patch_size": config["patch_size"],
        "mask_ratio": config["mask_ratio"],
        "norm_pix_loss": config["norm_pix_loss"],
        "crop_scale": config["crop_scale"],
        "hflip": config["hflip"],
        "batch": args.batch_size or default_batch,
        "steps": args.steps or 40,
        "workers": config.get("dataloader_num_workers", 0),
        "deepspeed": args.deepspeed,
    }
    shard_size = round(cfg["image_size"] * 256 / 224)
    patients = args.patients or 400
    if args.quick:
        cfg.update(
            preset=QUICK["preset"],
            image_size=QUICK["image_size"],
            patch_size=QUICK["patch_size"],
            batch=args.batch_size or QUICK["batch"],
            steps=args.steps or QUICK["steps"],
            workers=QUICK["workers"],
        )
        shard_size, patients = QUICK["shard_size"], args.patients or QUICK["patients"]
    if args.workers is not None:
        cfg["workers"] = args.workers
    cfg["logging_steps"] = max(1, cfg["steps"] // 4)  # 4 intervals; the first (start-up) is left out of the summary

    from hf_medvis.models.build import XRAY_MEAN, XRAY_STD

    cfg["mean"], cfg["std"] = XRAY_MEAN, XRAY_STD
    out_ctx = contextlib.nullcontext(args.out) if args.out else tempfile.TemporaryDirectory(prefix="bench_train-")
    with out_ctx as out_name:
        out = Path(out_name)
        out.mkdir(parents=True, exist_ok=True)
        if args.same_pipeline:
            return same_pipeline_main(args, cfg, out)
        t0 = time.perf_counter()
        cfg["data"] = args.data or prepare_phantom_shards(out / "data", patients, shard_size)
        cfg["images"] = read_shard_pixels(cfg["data"])
        # One epoch must cover the whole run: an epoch boundary restarts the loader workers and refills the shuffle
        # buffer, which real datasets (10^5 images) hit once an hour, not every few steps. The phantom set is small, so
        # its shards are listed several times in the manifest (real shards, read and decoded every time).
        needed = cfg["batch"] * cfg["steps"] + cfg["batch"]
        repeat = -(-needed // len(cfg["images"]))
        if repeat > 1 and args.data is None:
            repeat_manifest(cfg["data"], repeat)
        elif repeat > 1:
            _log(
                f"warning: {cfg['data']} holds {len(cfg['images'])} images, fewer than the {needed} of one run: the "
                "recipe's workers will restart at each epoch boundary"
            )
        cfg["images"] = cfg["images"] * repeat  # the plain path gets the same epoch length
        _log(
            f"{len(cfg['images'])} images ({cfg['images'][0].shape[0]}² uint8 shards) in {time.perf_counter() - t0:.1f} s"
        )

        from transformers import ViTMAEForPreTraining

        from hf_medvis.models.build import build_mae_config

        with torch.device("meta"):  # FLOPs are counted once, on a weightless replica, and given to every run
            probe = ViTMAEForPreTraining(
                build_mae_config(
                    cfg["preset"],
                    image_size=cfg["image_size"],
                    patch_size=cfg["patch_size"],
                    num_channels=3,
                    mask_ratio=cfg["mask_ratio"],
                    norm_pix_loss=cfg["norm_pix_loss"],
                )
            )
        cfg["flops"] = count_model_flops_per_sample(probe)
        del probe
        cfg["peak_tflops"] = args.peak_tflops or (measure_matmul_tflops() if cuda else None)

        recipe = load_recipe(Path(args.recipe))
        known = recipe_flags(recipe)
        wanted = args.variants.split(",") if args.variants else ["plain", "recipe", "compile", "devaug"]
        variants: list[tuple[str, list[str]]] = []
        skipped: list[str] = []
        for name in wanted:
            if name == "recipe":
                variants.append(("recipe", []))
            elif name == "compile":
                if cuda or args.variants:
                    variants.append(("compile", ["--torch_compile", "true"]))
                else:
                    skipped.append(
                        "compile (CPU: inductor's first compile takes minutes; --variants compile forces it)"
                    )
            elif name == "devaug":
                if "augment_on_device" in known:
                    variants.append(("devaug", ["--augment_on_device", "true"]))
                else:
                    skipped.append("devaug (the recipe has no --augment_on_device yet)")
            elif name != "plain":
                raise SystemExit(f"bench_train: unknown variant '{name}'")

        results: list[Result] = []
        if "plain" in wanted:
            _log("(a) plain Trainer")
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet):  # the Trainer prints its log dicts; keep the report readable
                results.append(run_plain(cfg, out))
            (out / "plain.log").write_text(quiet.getvalue())
        for name, extra in variants:
            _log(f"recipe variant '{name}' {' '.join(extra)}")
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet):  # the recipe logs to stdout; keep our report readable
                try:
                    results.append(run_recipe(name, cfg, out, recipe, extra))
                except Exception as err:  # one failing variant (e.g. compile on an odd host) must not lose the others
                    logging.getLogger().handlers.clear()
                    results.append(Result(name, note=f"FAILED: {type(err).__name__}: {first_line(err)[:200]}"))
            (out / f"{name}.log").write_text(quiet.getvalue())
        logging.getLogger().handlers.clear()  # the recipe's stdout handler points at the closed capture buffer

        plain = next((r for r in results if r.name == "plain" and r.images_per_second), None)
        ours = [r for r in results if r.name != "plain" and r.images_per_second]
        best = max(ours, key=lambda r: r.images_per_second) if ours else None
        print(
            f"bench_train {args.model}{' --quick (tiny model)' if args.quick else ''}: batch {cfg['batch']}/device, "
            f"{cfg['image_size']}², {cfg['steps']} steps per run (logging every {cfg['logging_steps']}; first interval "
            f"left out), {cfg['workers']} loader workers, {len(cfg['images'])} images from {cfg['data']}"
        )
        print(f"device: {_versions()}")
        flops = cfg["flops"]
        print(
            f"FLOPs per image (fwd+bwd): {flops / 1e9:.2f} GFLOP; peak for MFU: "
            + (f"{cfg['peak_tflops']:.0f} TFLOP/s (measured bf16 matmul)" if cfg["peak_tflops"] else "n/a (CPU)")
            + f"; plain Trainer optimizer: {cfg.get('plain_optim', '?')}"
        )
        for r in results:
            print(r.row())
        for s in skipped:
            print(f"skipped   {s}")
        speedup = best.images_per_second / plain.images_per_second if (best and plain) else float("nan")
        mfu = f"{best.mfu:.3f}" if best and best.mfu is not None else "n/a"
        summary = {
            "model": args.model,
            "quick": args.quick,
            "device": _versions(),
            "batch": cfg["batch"],
            "steps": cfg["steps"],
            "workers": cfg["workers"],
            "flops_per_image": flops,
            "peak_tflops": cfg["peak_tflops"],
            "results": [dataclasses.asdict(r) for r in results],
            "skipped": skipped,
            "best": best.name if best else None,
            "speedup_vs_plain_trainer": speedup,
            "date": time.strftime("%Y-%m-%d"),
        }
        (out / f"results-{args.model}{'-quick' if args.quick else ''}.json").write_text(
            json.dumps(summary, indent=2) + "\n"
        )
        print(f"best recipe variant: {best.name if best else 'none'}")
        print(f"speedup_vs_plain_trainer={speedup:.2f} mfu={mfu}")
    return 0 if best and plain else 1


if __name__ == "__main__":
    sys.exit(main())
