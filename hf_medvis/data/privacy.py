"""Salted hashes: the only form in which patient ids and source paths leave the operator's machine (shards,
manifests, quarantine reports), and the one patient hash every input is grouped by."""

from __future__ import annotations

import hashlib
import os

from ..core.storage import has_glob

SALT_ENV = "HF_MEDVIS_SALT"


def salted_hash(value: str, salt: str, kind: str) -> str:
    """Truncated SHA-256 keyed by the salt; ``kind`` separates namespaces (a patient id never collides with a path).
    File names that are not valid UTF-8 (kept by Python as surrogate escapes) hash by their bytes."""
    return hashlib.sha256(f"{kind}\x00{salt}\x00{value}".encode("utf-8", "surrogateescape")).hexdigest()[:20]


def patient_group(patient_id: str, salt: str = "") -> str:
    """A patient's group: the one hash of a patient id, for shards (``salt``: the operator's secret) and for the
    in-process grouping of raw folders, ``datasets`` inputs and mixes (no salt: those groups never leave the process,
    and a fixed hash keeps a hash holdout the same across runs and machines)."""
    return salted_hash(patient_id, salt, "patient")


def in_holdout(group: str, holdout_percentage: float) -> bool:
    """Deterministic patient-level holdout on a group hash: the same patient always lands on the same side."""
    return int(group[:8], 16) % 10000 < holdout_percentage * 100


def resolve_salt(salt: str | None) -> str:
    """The salt given, else $HF_MEDVIS_SALT; ValueError when neither is set."""
    salt = salt if salt is not None else os.environ.get(SALT_ENV)
    if not salt:
        raise ValueError(
            f"no salt for patient-id hashing: pass --salt or set {SALT_ENV} (keep it secret and the same for every "
            "prepare of one dataset, so a patient gets the same group across runs)"
        )
    return salt


def salt_check(salt: str) -> str:
    """A fingerprint of the salt, stored in the manifest, so a later run can tell it was given another salt."""
    return hashlib.sha256(f"hf_medvis-salt-check\x00{salt}".encode()).hexdigest()[:16]


def relative_path(path: str, root: str) -> str:
    """``path`` relative to the source root ``root``: the form a source path is hashed in."""
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def source_root(src: str) -> str:
    """The folder source paths are made relative to: ``src`` itself, or the part of a glob before its first ``*``."""
    return src.split("*", 1)[0].rsplit("/", 1)[0] if has_glob(src) else src
