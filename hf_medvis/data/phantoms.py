"""Deterministic synthetic chest X-ray phantoms: the embedded default dataset of every recipe, notebook and test.

Each image is drawn from a simple attenuation model (body, lungs, diaphragm, heart, spine, ribs, clavicles) with
per-patient anatomy, per-image exposure and positioning, and three learnable findings:

- ``Cardiomegaly``: cardiothoracic ratio above ~0.55 (normal hearts are drawn at 0.38-0.47); persistent per patient.
- ``Effusion``: fluid filling a lung base up to a meniscus, blunting the costophrenic angle; per image.
- ``Nodule``: a round, well-defined opacity inside a lung field, denser than the ribs crossing it; persistent per
  patient (about the same place on follow-ups).

The set is written as 8-bit PNG (display orientation), as 16-bit DICOM (mixed MONOCHROME1/MONOCHROME2, with
RescaleSlope/Intercept and WindowCenter/Width, so the whole display pipeline is exercised), and as ``labels.csv`` in the
NIH ChestX-ray14 layout. The same seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ORIGIN_MARKER = "phantoms.json"
FINDINGS: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Nodule")
NO_FINDING = "No Finding"
NIH_COLUMNS: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
PHANTOM_FORMAT_VERSION = 2

# Digital X-Ray Image Storage - For Presentation, and Computed Radiography Image Storage.
_SOP_CLASS = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}


@dataclass(frozen=True)
class PhantomImage:
    """Everything needed to render and describe one phantom image."""

    image_index: str
    patient_id: int
    follow_up: int
    age: int
    gender: str
    view_position: str
    findings: tuple[str, ...]
    anatomy: dict = field(repr=False, compare=False, hash=False)
    seed: int = 0

    @property
    def finding_labels(self) -> str:
        return "|".join(self.findings) if self.findings else NO_FINDING


def _patient_rng(seed: int, patient_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, patient_id, PHANTOM_FORMAT_VERSION]))


def plan_phantoms(patients: int = 200, seed: int = 0) -> list[PhantomImage]:
    """Draws patients, follow-ups and findings without rendering any pixels."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    images: list[PhantomImage] = []
    for patient_id in range(1, patients + 1):
        rng = _patient_rng(seed, patient_id)
        n_images = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
        age = int(rng.integers(18, 91))
        gender = str(rng.choice(["M", "F"]))
        cardiomegaly = bool(rng.random() < 0.28)
        nodule = bool(rng.random() < 0.25)
        patient_anatomy = {
            "body_scale": float(rng.uniform(0.92, 1.08)),
            "lung_scale": float(rng.uniform(0.92, 1.06)),
            "ctr": float(rng.uniform(0.58, 0.68) if cardiomegaly else rng.uniform(0.38, 0.47)),
            "nodule_side": int(rng.integers(0, 2)),
            "nodule_u": float(rng.uniform(-0.35, 0.35)),
            "nodule_v": float(rng.uniform(-0.5, 0.3)),
            "nodule_radius": float(rng.uniform(0.055, 0.075)),
        }
        effusion_rate = 0.45 if cardiomegaly else 0.2
        for follow_up in range(n_images):
            effusion = bool(rng.random() < effusion_rate)
            findings = tuple(
                name for name, present in zip(FINDINGS, (cardiomegaly, effusion, nodule), strict=True) if present
            )
            anatomy = dict(patient_anatomy)
            anatomy.update(
                shift_x=float(rng.uniform(-0.025, 0.025)),
                shift_y=float(rng.uniform(-0.02, 0.02)),
                gain=float(rng.uniform(0.85, 1.12)),
                gamma=float(rng.uniform(0.85, 1.2)),
                noise=float(rng.uniform(0.01, 0.025)),
                effusion_sides=int(rng.integers(1, 4)),  # bit 0: image-left lung, bit 1: image-right lung
                effusion_height=float(rng.uniform(0.28, 0.45)),
                nodule_jitter_u=float(rng.uniform(-0.06, 0.06)),
                nodule_jitter_v=float(rng.uniform(-0.06, 0.06)),
                image_seed=int(rng.integers(0, 2**31 - 1)),
            )
            images.append(
                PhantomImage(
                    image_index=f"{patient_id:08d}_{follow_up:03d}.png",
                    patient_id=patient_id,
                    follow_up=follow_up,
                    age=min(age + follow_up, 95),
                    gender=gender,
                    view_position="AP" if (follow_up > 0 and rng.random() < 0.3) else "PA",
                    findings=findings,
                    anatomy=anatomy,
                    seed=seed,
                )
            )
    return images


def render_phantom(image: PhantomImage, size: int = 256) -> np.ndarray:
    """Renders one phantom as a float32 display image in [0, 1] (higher = brighter, as MONOCHROME2)."""
    a = image.anatomy
    rng = np.random.default_rng(a["image_seed"])
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y = coords[:, None] - a["shift_y"]
    x = coords[None, :] - a["shift_x"]

    img = np.full((size, size), 0.03, dtype=np.float32)
    body_rx, body_ry = 0.44 * a["body_scale"], 0.56
    body = ((x - 0.5) / body_rx) ** 2 + ((y - 0.56) / body_ry) ** 2 < 1.0
    img = np.where(body, 0.42, img)

    # Lungs: ellipses clipped by a domed diaphragm, which leaves sharp costophrenic angles laterally.
    lung_rx, lung_ry = 0.155 * a["lung_scale"], 0.30 * a["lung_scale"]
    lung_cy = 0.45
    lungs = np.zeros((size, size), dtype=bool)
    lung_masks = []
    for side, cx in enumerate((0.5 - 0.19 * a["body_scale"], 0.5 + 0.19 * a["body_scale"])):
        u = (x - cx) / lung_rx
        ellipse = u**2 + ((y - lung_cy) / lung_ry) ** 2 < 1.0
        diaphragm = lung_cy + 0.62 * lung_ry + 0.45 * lung_ry * np.clip(u, -1, 1) ** 2
        mask = ellipse & (y < diaphragm)
        lung_masks.append((side, cx, mask, u))
        lungs |= mask
    img = np.where(lungs, 0.14, img)

    # Heart: overlaps the medial lungs, centred towards the patient's left (image right on a PA view).
    thorax_width = 2 * (0.19 * a["body_scale"] + lung_rx)
    heart_rx = a["ctr"] * thorax_width / 2
    heart_ry = 0.13 + 0.25 * heart_rx
    heart_cx, heart_cy = 0.53, lung_cy + 0.55 * lung_ry
    heart = ((x - heart_cx) / heart_rx) ** 2 + ((y - heart_cy) / heart_ry) ** 2 < 1.0
    img = np.where(heart & body, 0.47, img)

    # Effusion: fluid rises from the lung base to a meniscus that climbs laterally.
    if "Effusion" in image.findings:
        lung_bottom = lung_cy + lung_ry
        for side, cx, mask, u in lung_masks:
            if not (a["effusion_sides"] >> side) & 1:
                continue
            lateral = np.clip(-u if cx < 0.5 else u, 0, 1)
            level = lung_bottom - a["effusion_height"] * lung_ry * 2 * (0.55 + 0.45 * lateral)
            img = np.where(mask & (y > level), 0.45, img)

    # Nodule: a well-defined round opacity inside a lung field (a disc with a one-pixel soft edge). Radiologically a
    # nodule is denser than the rib shadows it overlaps; at 64 px it must stand out from rib crossings and vertebrae.
    if "Nodule" in image.findings:
        side, cx, mask, _ = lung_masks[a["nodule_side"]]
        ny = lung_cy + (a["nodule_v"] + a["nodule_jitter_v"]) * lung_ry
        nx = cx + (a["nodule_u"] + a["nodule_jitter_u"]) * lung_rx
        distance = np.sqrt((x - nx) ** 2 + (y - ny) ** 2)
        edge = np.clip((a["nodule_radius"] - distance) * size + 0.5, 0.0, 1.0)
        img = img + 0.32 * edge * body

    # Bones add on top of soft tissue: spine, posterior ribs, clavicles.
    spine = np.exp(-(((x - 0.5) / 0.035) ** 4)) * body
    vertebrae = 0.85 + 0.15 * np.cos(2 * np.pi * y / 0.055)
    img = img + 0.22 * spine * vertebrae
    u = np.abs(x - 0.5) / (0.42 * a["body_scale"])
    rib_extent = (u > 0.04) & (u < 0.98) & body
    for k in range(10):
        centre = 0.13 + 0.058 * k + 0.14 * u - 0.08 * u**2
        img = img + 0.11 * np.exp(-(((y - centre) / 0.012) ** 2)) * rib_extent
    clavicle = 0.105 + 0.05 * (u - 0.45) ** 2
    img = img + 0.16 * np.exp(-(((y - clavicle) / 0.012) ** 2)) * ((u > 0.08) & (u < 0.75)) * body

    # Exposure and quantum noise.
    img = np.clip(img, 0, None) * a["gain"]
    img = np.clip(img, 0, 1) ** a["gamma"]
    img = img + rng.normal(0.0, a["noise"], size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_uint8(display: np.ndarray) -> np.ndarray:
    return np.round(display * 255.0).astype(np.uint8)


def _dicom_dataset(image: PhantomImage, display: np.ndarray) -> pydicom.Dataset:
    """Encodes a display image as a 16-bit DICOM whose modality + VOI LUTs map back to the same display image."""
    monochrome1 = image.patient_id % 2 == 1  # CR-style readers often deliver MONOCHROME1
    modality = "CR" if monochrome1 else "DX"
    bits_stored = 12 if monochrome1 else 14
    slope, intercept = (1.0, -1024.0) if image.follow_up % 2 == 0 else (0.5, 0.0)
    stored_max = 2**bits_stored - 1
    # The window spans 10%..90% of the stored range, expressed in output (post modality LUT) units.
    width = 0.8 * stored_max * slope
    low = 0.1 * stored_max * slope + intercept
    center = low + width / 2
    value = display if not monochrome1 else 1.0 - display
    stored = np.round((low + value * width - intercept) / slope)
    stored = np.clip(stored, 0, stored_max).astype(np.uint16)

    key = f"{image.seed}/{image.image_index}"
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[key, "sop"])
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = generate_uid(entropy_srcs=["hf_medvis-phantom"])

    ds = pydicom.Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = image.view_position
    # Synthetic identifiers and dates: present so that de-identification downstream is testable.
    ds.PatientName = f"Phantom^Patient{image.patient_id:05d}"
    ds.PatientID = f"PH{image.patient_id:06d}"
    ds.PatientBirthDate = f"{2026 - image.age:04d}0101"
    ds.PatientSex = image.gender
    ds.PatientAge = f"{image.age:03d}Y"
    ds.StudyDate = f"2020{(image.follow_up % 12) + 1:02d}15"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{image.patient_id:06d}{image.follow_up:03d}"
    ds.InstitutionName = "Phantom General Hospital"
    ds.ReferringPhysicianName = "Phantom^Referrer"
    ds.StudyID = str(image.follow_up + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = display.shape
    ds.PixelSpacing = [f"{0.143 * 1024 / display.shape[0]:.4f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.PixelData = stored.tobytes()
    return ds


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    patients: int = 200,
    seed: int = 0,
    image_size: int = 256,
    dicom: bool = True,
    png: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes ``images/*.png``, ``dicom/*.dcm`` and ``labels.csv`` under ``out_dir``.

    The set is built in a temporary sibling folder and renamed into place, so ``out_dir`` is either complete or absent.
    An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    from PIL import Image

    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    with staged_folder(out_dir, overwrite) as tmp:
        plan = plan_phantoms(patients, seed)
        if png:
            (tmp / "images").mkdir()
        if dicom:
            (tmp / "dicom").mkdir()
        rows = []
        for image in plan:
            display = render_phantom(image, image_size)
            stem = image.image_index[: -len(".png")]
            if png:
                buf = io.BytesIO()
                Image.fromarray(to_uint8(display), mode="L").save(buf, format="PNG", optimize=False)
                (tmp / "images" / image.image_index).write_bytes(buf.getvalue())
            if dicom:
                _dicom_dataset(image, display).save_as(tmp / "dicom" / f"{stem}.dcm", enforce_file_format=True)
            spacing = f"{0.143 * 1024 / image_size:.4f}"
            rows.append(
                [
                    image.image_index,
                    image.finding_labels,
                    image.follow_up,
                    image.patient_id,
                    image.age,
                    image.gender,
                    image.view_position,
                    image_size,
                    image_size,
                    spacing,
                    spacing,
                ]
            )
        write_origin_marker(tmp, patients=patients, seed=seed, image_size=image_size)
        with open(tmp / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(NIH_COLUMNS)
            writer.writerows(rows)
    return Path(out_dir)


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write a demo set into, renamed into place when the block ends (removed if
    it raises): ``out_dir`` is either complete or absent. An existing non-empty ``out_dir`` is an error unless
    ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"demo-data output folder is not empty: {out} (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic; fails if another writer already put a complete set there
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_origin_marker(
    root: Path,
    description: str = "synthetic chest X-ray phantoms (hf-medvis demo-data), not patient images",
    generator: str = f"hf_medvis phantoms v{PHANTOM_FORMAT_VERSION}",
    **settings: int,
) -> None:
    """``phantoms.json``: tells ``prepare``, the recipes and their cards that the images under ``root`` are synthetic."""
    marker = {"synthetic": True, "generator": generator, "description": description, **settings}
    tmp = root / f".{ORIGIN_MARKER}.{os.getpid()}.tmp"  # ranks may race to write it
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / ORIGIN_MARKER)


def default_phantom_dir(patients: int = 200, seed: int = 0, image_size: int = 256) -> Path:
    """Where the embedded default dataset is cached (``HF_MEDVIS_CACHE``, else ``~/.cache/hf_medvis``)."""
    root = Path(os.environ.get("HF_MEDVIS_CACHE", Path.home() / ".cache" / "hf_medvis"))
    return root / f"phantoms-v{PHANTOM_FORMAT_VERSION}-p{patients}-s{seed}-{image_size}px"


def ensure_phantom_dataset(patients: int = 200, seed: int = 0, image_size: int = 256) -> Path:
    """Returns the cached default phantom set, generating it on first use (safe when several ranks race)."""
    out = default_phantom_dir(patients, seed, image_size)
    if (out / "labels.csv").exists():
        if not (out / ORIGIN_MARKER).exists():  # a set cached before the marker existed
            write_origin_marker(out, patients=patients, seed=seed, image_size=image_size)
        return out
    try:
        write_phantom_dataset(out, patients=patients, seed=seed, image_size=image_size)
    except FileExistsError:
        pass  # another process finished first; the rename is atomic, so what is there is complete
    except OSError:
        if not (out / "labels.csv").exists():
            raise
    return out
