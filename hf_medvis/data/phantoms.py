"""Deterministic synthetic chest X-ray phantoms: the embedded default dataset of every recipe, notebook and test.

Each image is drawn from a simple attenuation model (body, lungs, diaphragm, heart, spine, ribs, clavicles) with
per-patient anatomy, per-image exposure and positioning, and three learnable findings:

- ``Cardiomegaly``: cardiothoracic ratio above ~0.55 (normal hearts are drawn at 0.38-0.47; v3: 0.51-0.64 against
  0.38-0.49); persistent per patient.
- ``Effusion``: fluid filling a lung base up to a meniscus, blunting the costophrenic angle; per image.
- ``Nodule``: a round, well-defined opacity inside a lung field, denser than the ribs crossing it; persistent per
  patient (about the same place on follow-ups).

The set is written as 8-bit PNG (display orientation), as 16-bit DICOM (mixed MONOCHROME1/MONOCHROME2, with
RescaleSlope/Intercept and WindowCenter/Width, so the whole display pipeline is exercised), and as ``labels.csv`` in the
NIH ChestX-ray14 layout. The same seed and ``version`` give byte-identical files.

Two versions (``PHANTOM_VERSIONS``). Version 2, the default of these functions, of ``ensure_phantom_dataset`` (the
recipes' embedded default) and of the tests: square images, clearly visible findings, exact labels; a tiny model
learns it to AUROC ~1. Version 3 (``hf-medvis demo-data`` and ``make demo``) adds what real sets have and what makes
a report or a comparison of methods show something -- still synthetic and deterministic:

- non-square images (W/H 0.8, 0.86, 1.0 or 1.22, as portrait and landscape detectors); ``image_size`` is the shorter
  side, and the anatomy is drawn in the centred square of that side, so resize-shorter-side + centre crop sees it
  whole; the extra length shows more neck and abdomen (or more of the arms' side);
- subtle findings: hearts from just above the normal range, small and faint nodules, shallow effusions;
- covariates: AP views (more common with age) are noisier (x2.2 quantum noise) with the heart magnified x1.12 (so a
  normal AP heart can look enlarged, as on real portable films); a ``Site`` column (A or B, per patient): site B's
  scanner renders brighter with less contrast and writes 16-bit DICOMs (site A: 14-bit, MONOCHROME1 CR: 12-bit);
- label noise as NLP-mined labels have: ``labels.csv`` drops each true finding with probability ``LABEL_MISS_RATE`` and
  adds each absent one with probability ``LABEL_ADD_RATE``; the drawn truth is in ``labels_truth.csv`` (same layout).

``phantom_mask`` labels the same geometry for segmentation (``MASK_CLASSES``: background, lung, heart, nodule);
``write_phantom_dataset(masks=True)`` writes the masks as ``masks/<stem>.png`` with ``masks/classes.json``.
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
# The classes of ``phantom_mask`` (and of ``demo-data --masks``), index = class value; 0 is the background.
MASK_CLASSES: tuple[str, ...] = ("background", "lung", "heart", "nodule")
MASKS_DIR = "masks"  # beside images/: one PNG of class indices per image, same stem
MASK_CLASSES_FILE = "classes.json"  # in the masks folder: the class names, index = position
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
PHANTOM_FORMAT_VERSION = 2  # the version of ensure_phantom_dataset, the tests and the functions' default
PHANTOM_VERSIONS: tuple[int, ...] = (2, 3)
DEMO_PHANTOM_VERSION = 3  # hf-medvis demo-data and make demo
SITE_COLUMN = "Site"  # v3: appended after the NIH columns of labels.csv
TRUTH_LABELS_FILE = "labels_truth.csv"  # v3: the findings as drawn, before label noise
# v3 label noise, per image and finding, independently: what labels.csv says against what was drawn.
LABEL_MISS_RATE = 0.06  # a drawn finding left out of labels.csv
LABEL_ADD_RATE = 0.02  # a finding that was not drawn, listed
# v3 covariate effects (render_phantom): AP magnifies the heart and is noisier; site B's scanner is brighter and flatter.
AP_HEART_MAGNIFICATION = 1.12
AP_NOISE_FACTOR = 2.2  # at 2.5 and 3.0 the demo's 2,400-step fine-tune no longer learned Nodule at all
SITE_B_CONTRAST, SITE_B_OFFSET = 0.85, 0.08
_V3_ASPECTS = (0.8, 0.86, 1.0, 1.22)  # width / height: 35x43 cm portrait, 14x17" portrait, square, 17x14" landscape
_V3_ASPECT_P = (0.35, 0.25, 0.25, 0.15)

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
    version: int = PHANTOM_FORMAT_VERSION
    site: str = ""  # v3: "A" or "B"
    listed_findings: tuple[str, ...] | None = None  # v3: what labels.csv lists (label noise); None: ``findings``

    @property
    def finding_labels(self) -> str:
        """The drawn findings (the truth), as ``Finding Labels`` writes them."""
        return "|".join(self.findings) if self.findings else NO_FINDING

    @property
    def listed_labels(self) -> str:
        """What ``labels.csv`` lists: the drawn findings after v3's label noise."""
        listed = self.findings if self.listed_findings is None else self.listed_findings
        return "|".join(listed) if listed else NO_FINDING


def _patient_rng(seed: int, patient_id: int, version: int = PHANTOM_FORMAT_VERSION) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, patient_id, version]))


def _check_version(version: int) -> None:
    if version not in PHANTOM_VERSIONS:
        raise ValueError(f"phantom version must be one of {', '.join(map(str, PHANTOM_VERSIONS))}, got {version}")


def plan_phantoms(patients: int = 200, seed: int = 0, version: int = PHANTOM_FORMAT_VERSION) -> list[PhantomImage]:
    """Draws patients, follow-ups and findings without rendering any pixels (``version``: see the module docstring)."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    _check_version(version)
    if version == 3:
        return _plan_v3(patients, seed)
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


def _plan_v3(patients: int, seed: int) -> list[PhantomImage]:
    """Version 3: v2's anatomy and findings made subtler, plus view and site covariates, non-square sizes and label
    noise (module docstring). Its own random streams (the version is part of each patient's seed)."""
    images: list[PhantomImage] = []
    for patient_id in range(1, patients + 1):
        rng = _patient_rng(seed, patient_id, 3)
        n_images = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
        age = int(rng.integers(18, 91))
        gender = str(rng.choice(["M", "F"]))
        site = "B" if rng.random() < 0.4 else "A"
        cardiomegaly = bool(rng.random() < 0.28)
        nodule = bool(rng.random() < 0.25)
        patient_anatomy = {
            "body_scale": float(rng.uniform(0.92, 1.08)),
            "lung_scale": float(rng.uniform(0.92, 1.06)),
            # Enlarged hearts start just above the normal range (v2: a gap from 0.47 to 0.58).
            "ctr": float(rng.uniform(0.51, 0.64) if cardiomegaly else rng.uniform(0.38, 0.49)),
            "nodule_side": int(rng.integers(0, 2)),
            "nodule_u": float(rng.uniform(-0.35, 0.35)),
            "nodule_v": float(rng.uniform(-0.5, 0.3)),
            "nodule_radius": float(rng.uniform(0.035, 0.065)),  # v2: 0.055-0.075
            "nodule_contrast": float(rng.uniform(0.12, 0.3)),  # v2: 0.32
            "monochrome1": bool(rng.random() < 0.3),  # a CR reader that delivers MONOCHROME1
        }
        effusion_rate = 0.45 if cardiomegaly else 0.2
        ap_rate = 0.12 if age < 50 else 0.3 if age < 70 else 0.5  # portable films: the older, sicker patients
        for follow_up in range(n_images):
            effusion = bool(rng.random() < effusion_rate)
            truth = (cardiomegaly, effusion, nodule)
            findings = tuple(name for name, present in zip(FINDINGS, truth, strict=True) if present)
            view = "AP" if rng.random() < ap_rate else "PA"
            anatomy = dict(patient_anatomy)
            anatomy.update(
                shift_x=float(rng.uniform(-0.025, 0.025)),
                shift_y=float(rng.uniform(-0.02, 0.02)),
                gain=float(rng.uniform(0.85, 1.12)),
                gamma=float(rng.uniform(0.85, 1.2)),
                noise=float(rng.uniform(0.01, 0.025)) * (AP_NOISE_FACTOR if view == "AP" else 1.0),
                heart_magnification=AP_HEART_MAGNIFICATION if view == "AP" else 1.0,
                site_contrast=SITE_B_CONTRAST if site == "B" else 1.0,
                site_offset=SITE_B_OFFSET if site == "B" else 0.0,
                aspect=float(rng.choice(_V3_ASPECTS, p=_V3_ASPECT_P)),
                effusion_sides=int(rng.integers(1, 4)),  # bit 0: image-left lung, bit 1: image-right lung
                effusion_height=float(rng.uniform(0.12, 0.42)),  # v2: 0.28-0.45
                nodule_jitter_u=float(rng.uniform(-0.06, 0.06)),
                nodule_jitter_v=float(rng.uniform(-0.06, 0.06)),
                image_seed=int(rng.integers(0, 2**31 - 1)),
            )
            # Label noise: every finding decided independently, drawn for every finding so the stream is fixed.
            flips = rng.random(len(FINDINGS))
            listed = tuple(
                name
                for name, present, u in zip(FINDINGS, truth, flips, strict=True)
                if (present and u >= LABEL_MISS_RATE) or (not present and u < LABEL_ADD_RATE)
            )
            images.append(
                PhantomImage(
                    image_index=f"{patient_id:08d}_{follow_up:03d}.png",
                    patient_id=patient_id,
                    follow_up=follow_up,
                    age=min(age + follow_up, 95),
                    gender=gender,
                    view_position=view,
                    findings=findings,
                    anatomy=anatomy,
                    seed=seed,
                    version=3,
                    site=site,
                    listed_findings=listed,
                )
            )
    return images


def phantom_shape(image: PhantomImage, size: int) -> tuple[int, int]:
    """(height, width) of ``image`` rendered at ``size``: square for v2; for v3 ``size`` is the shorter side and the
    other follows the image's aspect ratio (width / height)."""
    aspect = image.anatomy.get("aspect", 1.0)
    if aspect < 1.0:
        return int(round(size / aspect)), size
    return size, int(round(size * aspect))


@dataclass(frozen=True)
class _Geometry:
    """The anatomy of one phantom at one pixel size, computed once for both the image and its mask."""

    x: (
        np.ndarray
    )  # [1, width] pixel-centre coordinates, in units of the shorter side, shifted by the positioning offset
    y: np.ndarray  # [height, 1]; the anatomy lies in [0, 1] x [0, 1], the centred square of the shorter side
    body: np.ndarray  # bool [height, width]
    lung_masks: list  # per lung: (side, centre x, bool mask, normalised lateral coordinate u)
    lungs: np.ndarray  # bool [height, width]: both lung fields
    lung_cy: float
    lung_ry: float
    heart: np.ndarray  # bool [height, width], the heart ellipse (not clipped by the body)
    nodule_distance: np.ndarray | None  # distance of each pixel centre to the nodule's centre; None without a nodule


def _geometry(image: PhantomImage, size: int) -> _Geometry:
    """Body, lung fields, heart and nodule of ``image`` on its ``phantom_shape(image, size)`` grid: the one place their
    shapes are defined (``render_phantom`` draws them, ``phantom_mask`` labels them)."""
    a = image.anatomy
    height, width = phantom_shape(image, size)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y_coords = coords if height == size else (np.arange(height, dtype=np.float32) + 0.5 - (height - size) / 2) / size
    x_coords = coords if width == size else (np.arange(width, dtype=np.float32) + 0.5 - (width - size) / 2) / size
    y = y_coords[:, None] - a["shift_y"]
    x = x_coords[None, :] - a["shift_x"]
    body_rx, body_ry = 0.44 * a["body_scale"], 0.56
    body = ((x - 0.5) / body_rx) ** 2 + ((y - 0.56) / body_ry) ** 2 < 1.0

    # Lungs: ellipses clipped by a domed diaphragm, which leaves sharp costophrenic angles laterally.
    lung_rx, lung_ry = 0.155 * a["lung_scale"], 0.30 * a["lung_scale"]
    lung_cy = 0.45
    lungs = np.zeros((height, width), dtype=bool)
    lung_masks = []
    for side, cx in enumerate((0.5 - 0.19 * a["body_scale"], 0.5 + 0.19 * a["body_scale"])):
        u = (x - cx) / lung_rx
        ellipse = u**2 + ((y - lung_cy) / lung_ry) ** 2 < 1.0
        diaphragm = lung_cy + 0.62 * lung_ry + 0.45 * lung_ry * np.clip(u, -1, 1) ** 2
        mask = ellipse & (y < diaphragm)
        lung_masks.append((side, cx, mask, u))
        lungs |= mask

    # Heart: overlaps the medial lungs, centred towards the patient's left (image right on a PA view).
    thorax_width = 2 * (0.19 * a["body_scale"] + lung_rx)
    heart_rx = a["ctr"] * thorax_width / 2 * a.get("heart_magnification", 1.0)  # v3: AP projection magnifies it
    heart_ry = 0.13 + 0.25 * heart_rx
    heart_cx, heart_cy = 0.53, lung_cy + 0.55 * lung_ry
    heart = ((x - heart_cx) / heart_rx) ** 2 + ((y - heart_cy) / heart_ry) ** 2 < 1.0

    # Nodule: a round opacity inside a lung field, about the same place on a patient's follow-ups.
    nodule_distance = None
    if "Nodule" in image.findings:
        _, cx, _, _ = lung_masks[a["nodule_side"]]
        ny = lung_cy + (a["nodule_v"] + a["nodule_jitter_v"]) * lung_ry
        nx = cx + (a["nodule_u"] + a["nodule_jitter_u"]) * lung_rx
        nodule_distance = np.sqrt((x - nx) ** 2 + (y - ny) ** 2)
    return _Geometry(x, y, body, lung_masks, lungs, lung_cy, lung_ry, heart, nodule_distance)


def phantom_mask(image: PhantomImage, size: int) -> np.ndarray:
    """The segmentation mask of ``image`` rendered at ``size``: uint8 [height, width] (``phantom_shape``) indices
    into ``MASK_CLASSES``.

    Lung fields are the anatomical ones (effusion fluid inside them stays "lung"); the heart, drawn over the medial
    lungs, overrides lung; the nodule overrides both: its disc is the pixels whose centre lies inside the nodule's
    radius (where ``render_phantom``'s soft edge is above half its strength), within the body."""
    geometry = _geometry(image, size)
    mask = np.zeros(geometry.lungs.shape, dtype=np.uint8)
    mask[geometry.lungs] = MASK_CLASSES.index("lung")
    mask[geometry.heart & geometry.body] = MASK_CLASSES.index("heart")
    if geometry.nodule_distance is not None:
        disc = (geometry.nodule_distance < image.anatomy["nodule_radius"]) & geometry.body
        mask[disc] = MASK_CLASSES.index("nodule")
    return mask


def render_phantom(image: PhantomImage, size: int = 256) -> np.ndarray:
    """Renders one phantom as a float32 display image in [0, 1] (higher = brighter, as MONOCHROME2), of
    ``phantom_shape(image, size)``: square for v2, ``size`` the shorter side for v3."""
    a = image.anatomy
    rng = np.random.default_rng(a["image_seed"])
    geometry = _geometry(image, size)
    x, y, body, lung_cy, lung_ry = geometry.x, geometry.y, geometry.body, geometry.lung_cy, geometry.lung_ry

    img = np.full(geometry.lungs.shape, 0.03, dtype=np.float32)
    img = np.where(body, 0.42, img)
    img = np.where(geometry.lungs, 0.14, img)
    img = np.where(geometry.heart & body, 0.47, img)

    # Effusion: fluid rises from the lung base to a meniscus that climbs laterally.
    if "Effusion" in image.findings:
        lung_bottom = lung_cy + lung_ry
        for side, cx, mask, u in geometry.lung_masks:
            if not (a["effusion_sides"] >> side) & 1:
                continue
            lateral = np.clip(-u if cx < 0.5 else u, 0, 1)
            level = lung_bottom - a["effusion_height"] * lung_ry * 2 * (0.55 + 0.45 * lateral)
            img = np.where(mask & (y > level), 0.45, img)

    # Nodule: a well-defined round opacity inside a lung field (a disc with a one-pixel soft edge). Radiologically a
    # nodule is denser than the rib shadows it overlaps; at 64 px it must stand out from rib crossings and vertebrae.
    if geometry.nodule_distance is not None:
        edge = np.clip((a["nodule_radius"] - geometry.nodule_distance) * size + 0.5, 0.0, 1.0)
        img = img + a.get("nodule_contrast", 0.32) * edge * body

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

    # Exposure and quantum noise; v3's site B scanner renders brighter with less contrast.
    img = np.clip(img, 0, None) * a["gain"]
    if "site_contrast" in a:
        img = img * a["site_contrast"] + a["site_offset"]
    img = np.clip(img, 0, 1) ** a["gamma"]
    img = img + rng.normal(0.0, a["noise"], size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_uint8(display: np.ndarray) -> np.ndarray:
    return np.round(display * 255.0).astype(np.uint8)


def _dicom_dataset(image: PhantomImage, display: np.ndarray, spacing: str) -> pydicom.Dataset:
    """Encodes a display image as a 16-bit DICOM whose modality + VOI LUTs map back to the same display image.

    v2: odd patients MONOCHROME1 (CR, 12 bits stored), even ones MONOCHROME2 (DX, 14 bits). v3: a share of patients
    MONOCHROME1 (CR, 12 bits), the others DX with 14 bits (site A) or the full 16 (site B)."""
    if image.version == 2:
        monochrome1 = image.patient_id % 2 == 1  # CR-style readers often deliver MONOCHROME1
    else:
        monochrome1 = bool(image.anatomy["monochrome1"])
    modality = "CR" if monochrome1 else "DX"
    bits_stored = 12 if monochrome1 else 16 if image.site == "B" else 14
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
    ds.PixelSpacing = [spacing] * 2
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
    masks: bool = False,
    version: int = PHANTOM_FORMAT_VERSION,
) -> Path:
    """Writes ``images/*.png``, ``dicom/*.dcm`` and ``labels.csv`` under ``out_dir``; with ``masks`` also
    ``masks/<stem>.png`` (``phantom_mask``: uint8 class indices, the image's size) and ``masks/classes.json``.
    ``version`` 3 (module docstring): ``image_size`` is each image's shorter side, ``labels.csv`` has a ``Site`` column
    after the NIH ones and noisy findings, ``labels_truth.csv`` the drawn ones.

    The set is built in a temporary sibling folder and renamed into place, so ``out_dir`` is either complete or absent.
    An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    from PIL import Image

    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    _check_version(version)
    spacing = f"{0.143 * 1024 / image_size:.4f}"  # mm: the anatomy spans the shorter side at every size
    with staged_folder(out_dir, overwrite) as tmp:
        plan = plan_phantoms(patients, seed, version)
        if png:
            (tmp / "images").mkdir()
        if dicom:
            (tmp / "dicom").mkdir()
        rows, truth_rows = [], []
        for image in plan:
            display = render_phantom(image, image_size)
            stem = image.image_index[: -len(".png")]
            if png:
                buf = io.BytesIO()
                Image.fromarray(to_uint8(display), mode="L").save(buf, format="PNG", optimize=False)
                (tmp / "images" / image.image_index).write_bytes(buf.getvalue())
            if dicom:
                _dicom_dataset(image, display, spacing).save_as(tmp / "dicom" / f"{stem}.dcm", enforce_file_format=True)
            height, width = display.shape
            row = [image.image_index, image.listed_labels, image.follow_up, image.patient_id, image.age, image.gender]
            row += [image.view_position, width, height, spacing, spacing] + ([image.site] if version >= 3 else [])
            rows.append(row)
            truth_rows.append([image.image_index, image.finding_labels, *row[2:]])
        if masks:
            write_phantom_masks(tmp / MASKS_DIR, plan, image_size)
        generator = f"hf_medvis phantoms v{version}"
        write_origin_marker(tmp, generator=generator, patients=patients, seed=seed, image_size=image_size)
        columns = NIH_COLUMNS + ((SITE_COLUMN,) if version >= 3 else ())
        tables = {"labels.csv": rows} | ({TRUTH_LABELS_FILE: truth_rows} if version >= 3 else {})
        for name, table in tables.items():
            with open(tmp / name, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(columns)
                writer.writerows(table)
    return Path(out_dir)


def write_phantom_masks(masks_dir: Path, plan: list[PhantomImage], image_size: int) -> None:
    """``masks_dir/<stem>.png`` (8-bit class indices into ``MASK_CLASSES``) for every image of ``plan``, and
    ``masks_dir/classes.json`` (the class names, index = position): the layout ``--masks_dir`` reads."""
    from PIL import Image

    masks_dir.mkdir()
    for image in plan:
        buf = io.BytesIO()
        Image.fromarray(phantom_mask(image, image_size), mode="L").save(buf, format="PNG", optimize=False)
        (masks_dir / image.image_index).write_bytes(buf.getvalue())
    (masks_dir / MASK_CLASSES_FILE).write_text(json.dumps(list(MASK_CLASSES)) + "\n")


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


def ensure_phantom_dataset(patients: int = 200, seed: int = 0, image_size: int = 256, masks: bool = False) -> Path:
    """Returns the cached default phantom set, generating it on first use (safe when several ranks race). ``masks``:
    the set also has ``masks/`` (the segmentation recipe's default), added to a cached set that lacks it."""
    out = default_phantom_dir(patients, seed, image_size)
    if (out / "labels.csv").exists():
        if not (out / ORIGIN_MARKER).exists():  # a set cached before the marker existed
            write_origin_marker(out, patients=patients, seed=seed, image_size=image_size)
    else:
        try:
            write_phantom_dataset(out, patients=patients, seed=seed, image_size=image_size, masks=masks)
        except FileExistsError:
            pass  # another process finished first; the rename is atomic, so what is there is complete
        except OSError:
            if not (out / "labels.csv").exists():
                raise
    if masks and not (out / MASKS_DIR / MASK_CLASSES_FILE).exists():
        _add_phantom_masks(out, patients, seed, image_size)
    return out


def _add_phantom_masks(root: Path, patients: int, seed: int, image_size: int) -> None:
    """Adds ``masks/`` to a cached set: written in a temporary sibling and renamed into place, so it is complete or
    absent; a rank that loses the race to rename keeps the winner's (identical) masks."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{MASKS_DIR}.tmp-", dir=root))
    try:
        write_phantom_masks(tmp / MASKS_DIR, plan_phantoms(patients, seed), image_size)
        os.replace(tmp / MASKS_DIR, root / MASKS_DIR)
    except OSError:
        if not (root / MASKS_DIR / MASK_CLASSES_FILE).exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
