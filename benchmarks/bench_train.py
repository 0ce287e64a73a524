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

Each run's img/s, TFLOP/s and data-wait % are the steady state of monitoring's ThroughputCallback (first logging
interval -- worker start, compilation, autotuning -- left out); MFU is against the GPU's measured bf16 matmul peak (n/a
on a CPU); peak memory is torch's max allocated (GPU). The last line is
``speedup_vs_plain_trainer=<best recipe variant / plain> mfu=<its MFU or n/a>``; the line before names the variant.
``--quick`` runs tiny models on CPU in well under a minute (the CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import platform
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

    from hf_medvis.data import shards as shard_format
    from hf_medvis.data import storage
    from hf_medvis.data.streaming import find_manifest

    found = find_manifest(source)
    if found is None:
        raise SystemExit(f"bench_train: {source} is not a prepared-shard location (no manifest.json)")
    base, manifest = found
    images = []
    for shard in {s["path"]: s for s in manifest["shards"]}.values():
        data = storage.read_bytes(storage.join(base, shard["path"]))
        for row in shard_format.iter_shard_rows(data, columns=["pixels", "height", "width", "bits"]):
            if row["bits"] == 8:
                array = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"])
            else:
                array = (np.frombuffer(row["pixels"], dtype="<u2").reshape(row["height"], row["width"]) // 257).astype(
                    np.uint8
                )
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
    parser.add_argument("--data", default=None, help="prepared-shard location (default: phantoms prepared into --out)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default: 256 base, 128 large)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; quick 12)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers for both (default: the config's)")
    parser.add_argument("--patients", type=int, default=None, help="phantom patients when --data is not given")
    parser.add_argument(
        "--variants", default=None, help="comma list of plain,recipe,compile,devaug (default: all that apply)"
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
                    results.append(Result(name, note=f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}"))
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
