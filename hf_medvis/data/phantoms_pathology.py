"""Synthetic H&E-like pathology tiles: the colour demo set (``hf-medvis demo-data --modality pathology``).

Each tile is eosin-pink stroma with haematoxylin-purple nuclei. The learnable finding, ``Tumor``, is what a pathologist
looks for first: many more, larger and darker nuclei (crowding, pleomorphism). Patients have 2-4 tiles; the finding is
per tile. Colour carries the signal (purple nuclei on pink), so a grey-only pipeline loses part of it. Written as RGB
PNG with ``labels.csv`` in the NIH layout and the ``phantoms.json`` origin marker; the same seed gives identical files.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .phantoms import staged_folder, write_origin_marker

STROMA = (0.93, 0.70, 0.80)
NUCLEUS = (0.36, 0.20, 0.55)
FINDING = "Tumor"


def render_tile(rng: np.random.Generator, size: int, tumor: bool) -> np.ndarray:
    """One [size, size, 3] float tile in [0, 1]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    tile = np.empty((size, size, 3), np.float32)
    tile[:] = STROMA
    tile *= 1.0 - 0.08 * np.sin(6.0 * xx + 4.0 * yy + rng.uniform(0, 6.3))[..., None]  # uneven staining
    count = int(rng.integers(28, 44) if tumor else rng.integers(8, 16))
    for _ in range(count):
        cy, cx = rng.random(2)
        radius = (rng.uniform(0.035, 0.06) if tumor else rng.uniform(0.018, 0.03)) * (1 + 0.3 * rng.random())
        darkness = rng.uniform(0.75, 0.95) if tumor else rng.uniform(0.9, 1.1)
        inside = (yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.8, 1.25)) ** 2 < radius**2
        tile[inside] = np.asarray(NUCLEUS, np.float32) * darkness
    tile += rng.normal(0.0, 0.015, tile.shape).astype(np.float32)
    return np.clip(tile, 0.0, 1.0)


def write_pathology_phantoms(
    out_dir: str | os.PathLike, patients: int = 60, seed: int = 0, image_size: int = 96, overwrite: bool = False
) -> Path:
    """Writes ``images/*.png`` (RGB), ``labels.csv`` and ``phantoms.json`` under ``out_dir`` (complete or absent:
    ``phantoms.staged_folder``)."""
    from PIL import Image

    with staged_folder(out_dir, overwrite) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for patient in range(1, patients + 1):
            rng = np.random.default_rng(np.random.SeedSequence([seed, patient, 1]))
            for index in range(int(rng.integers(2, 5))):
                tumor = bool(rng.random() < 0.4)
                name = f"{patient:08d}_{index:03d}.png"
                pixels = (render_tile(rng, image_size, tumor) * 255.0).round().astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(tmp / "images" / name, optimize=False)
                rows.append([name, FINDING if tumor else "No Finding", patient])
        with open(tmp / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["Image Index", "Finding Labels", "Patient ID"])
            writer.writerows(rows)
        write_origin_marker(
            tmp,
            description="synthetic H&E-like pathology tiles (hf-medvis demo-data --modality pathology), not patient "
            "images",
            generator="hf_medvis pathology phantoms v1",
            patients=patients,
            seed=seed,
            image_size=image_size,
        )
    return Path(out_dir)
