"""Data-plane benchmark: the same phantom X-rays, held in a local Azurite (real Azure Blob API), into ready training
batches (uint8, 224², MAE augmentation), three ways side by side:

  (a) loose PNGs through ``datasets`` imagefolder streaming from az://  -- the anchor
  (b) prepared Parquet shards through ``hf_medvis.data.load_image_dataset`` from az://
  (c) the same shards from memory (fsspec memory://): the same pipeline with no storage I/O

Prints img/s and img/s per core, and as the last line ``speedup_vs_imagefolder=<b/a> io_efficiency=<b/c>``.
``--quick`` finishes in under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Azurite helper lives with the tests


def _batches_per_second(loader, limit_images: int) -> tuple[int, float]:
    """Steady-state rate: the clock starts at the first batch (worker start-up, imports and the first request are
    paid once per run, not per image)."""
    images, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()
            continue
        images += batch["pixel_values"].shape[0]
        if images >= limit_images:
            break
    return images, time.perf_counter() - start


def _collate(rows):
    import torch

    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small set, < 60 s on 2 cores")
    parser.add_argument("--patients", type=int, default=None, help="phantom patients (default 200 quick, 1000 full)")
    parser.add_argument("--image-size", type=int, default=256, help="raw phantom size (default 256)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    patients = args.patients or (200 if args.quick else 1000)

    import datasets
    import fsspec
    import torch
    from azurite import Azurite
    from torch.utils.data import DataLoader

    from hf_medvis.core.tasks import MAE
    from hf_medvis.data.phantoms import write_phantom_dataset
    from hf_medvis.data.prepare import prepare
    from hf_medvis.data.streaming import load_image_dataset
    from hf_medvis.data.transforms import create_transform, to_uint8_tensor

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    transform = create_transform(MAE, True, image_size=224, crop_scale=(0.5, 1.0))
    cores = max(1, args.workers)
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp = Path(tmp)
        raw = write_phantom_dataset(tmp / "phantoms", patients=patients, image_size=args.image_size, dicom=False)
        n_images = len(list((raw / "images").glob("*.png")))
        print(f"{n_images} phantom images written", file=sys.stderr)
        azurite = Azurite(location=tmp / "azurite").start()
        try:
            options = azurite.storage_options
            azurite.create_container("raw")
            azurite.create_container("prepared")
            fs = fsspec.filesystem("az", **options)
            fs.put(str(raw / "images"), "raw/images", recursive=True)
            t0 = time.perf_counter()
            prepare(
                str(raw),
                "az://prepared/set",
                size=256,
                shard_size=max(16, n_images // 8),
                salt="bench",
                storage_options=options,
                workers=args.workers,
            )
            prepare_s = time.perf_counter() - t0
            prepare_rates = _prepare_rates(raw / "images", tmp, args.workers)
            decode_costs = _decode_costs(tmp / "local-1")

            # (a) imagefolder streaming. datasets' Image decoding of az:// loses storage_options, so the anchor gets
            # its credentials from the environment, as a user would have to.
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
            folder = datasets.load_dataset(
                "imagefolder",
                data_files={"train": "az://raw/images/**/*.png"},
                split="train",
                streaming=True,
                storage_options=options,
            )
            folder = folder.map(
                lambda row: {"pixel_values": transform(to_uint8_tensor(_gray(row["image"])))}, remove_columns=["image"]
            )
            a = _batches_per_second(
                DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate),
                min(n_images, 300 if args.quick else n_images),
            )

            # (b) prepared shards from az://
            shards = load_image_dataset("az://prepared/set", image_transform=transform, storage_options=options)
            loader = DataLoader(shards, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate)
            b = _batches_per_second(loader, n_images)

            # (c) the same shards from memory: fsspec's memory filesystem is inherited by forked workers.
            mem = fsspec.filesystem("memory")
            for path in fs.find("prepared/set"):
                mem.pipe_file(f"/bench/{path[len('prepared/') :]}", fs.cat_file(path))
            in_memory = load_image_dataset("memory://bench/set", image_transform=transform)
            c = _batches_per_second(
                DataLoader(in_memory, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate),
                n_images,
            )
        finally:
            azurite.stop()

    print(
        f"{n_images} phantom images, {args.image_size}² PNG -> 256² uint8 shards (prepare {prepare_s:.1f} s); "
        f"batches of {args.batch_size}, 224², {args.workers} DataLoader workers, {os.cpu_count()} CPUs"
    )
    one, many, floor = prepare_rates
    print(
        f"prepare, local folder: 1 worker {one:.0f} img/s, {args.workers} workers {many:.0f} img/s "
        f"({many / cores:.0f} img/s/core, worker start-up included); Pillow decode+resize of the same files "
        f"{floor:.0f} img/s on one core"
    )
    print(
        "decode per 256² image, one core: "
        + ", ".join(f"{name} {microseconds:.1f} µs" for name, microseconds in decode_costs.items())
    )
    rates = {}
    for name, (images, seconds) in (
        ("(a) imagefolder, loose PNG, az://", a),
        ("(b) hf_medvis shards, az://", b),
        ("(c) hf_medvis shards, memory", c),
    ):
        rates[name[:3]] = images / seconds
        print(f"{name:38s} {images / seconds:9.0f} img/s {images / seconds / cores:9.0f} img/s/core ({images} images)")
    print(f"speedup_vs_imagefolder={rates['(b)'] / rates['(a)']:.1f} io_efficiency={rates['(b)'] / rates['(c)']:.2f}")
    return 0


def _prepare_rates(images: Path, tmp: Path, workers: int) -> tuple[float, float, float]:
    """img/s of `prepare` from a local folder with 1 and ``workers`` processes, and of a plain Pillow decode + resize of
    the same files in this process: the per-core floor the issue measures prepare against."""
    from PIL import Image

    from hf_medvis.data.prepare import prepare

    files = sorted(images.glob("*.png"))
    rates = []
    for count in (1, workers):
        t0 = time.perf_counter()
        prepare(
            str(images),
            str(tmp / f"local-{count}"),
            size=256,
            shard_size=max(16, len(files) // 8),
            salt="bench",
            workers=count,
        )
        rates.append(len(files) / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.convert("L").resize((256, 256), Image.BILINEAR)
    rates.append(len(files) / (time.perf_counter() - t0))
    return rates[0], rates[1], rates[2]


def _decode_costs(shard_dir: Path) -> dict[str, float]:
    """µs per image to get the pixels of a stored sample, best of 3: our reader (the PGM's pixels after its header, no
    decoding), format version 1's raw pixel column (the same pixels read with np.frombuffer), what a ``datasets`` user
    pays (the ``Image`` feature: PIL decodes the PGM), and what a PNG-encoded image column would cost."""
    import io
    import json

    import datasets
    import numpy as np
    from PIL import Image

    from hf_medvis.data.shard_format import iter_shard_rows, stored_pixels

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in iter_shard_rows((shard_dir / s["path"]).read_bytes())][:500]
    raw = [stored_pixels(r).tobytes() for r in rows]
    pngs = []
    for row in rows:
        buf = io.BytesIO()
        Image.fromarray(stored_pixels(row)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    feature = datasets.Image()
    ways = {
        "hf_medvis reader (PGM, header skipped)": lambda: [stored_pixels(r).copy() for r in rows],
        "format v1 raw pixels": lambda: [np.frombuffer(b, np.uint8).reshape(256, 256).copy() for b in raw],
        "datasets Image (PIL decodes the PGM)": lambda: [np.asarray(feature.decode_example(r["image"])) for r in rows],
        "PNG column (PIL)": lambda: [np.asarray(Image.open(io.BytesIO(b))) for b in pngs],
    }
    costs = {}
    for name, read in ways.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
        costs[name] = best / len(rows) * 1e6
    return costs


def _gray(image):
    import numpy as np

    return np.array(image.convert("L"))  # a writable copy: torch warns on read-only NumPy arrays


if __name__ == "__main__":
    sys.exit(main())
