"""Where a training set came from, as far as its files say: synthetic phantoms (``phantoms.json``, written by
``hf-medvis demo-data``) or prepared shards that recorded their source. Model and dataset cards state it, so a
model trained on phantoms is never presented as trained on patient images."""

from __future__ import annotations

import json
import os

from ..core import storage
from . import shard_format
from .phantoms import ORIGIN_MARKER


def data_origin(location: str | None, storage_options: dict | str | None = None) -> dict | None:
    """The origin record of ``location`` (an image folder, a phantom set's root or one of its sub-folders, or a
    prepared-shard location); None when nothing is recorded (user data)."""
    if not location:
        return None
    base = location.split("*", 1)[0].rstrip("/")
    if base.endswith(shard_format.MANIFEST_NAME):
        base = base[: -len(shard_format.MANIFEST_NAME)].rstrip("/")
    if "://" in base:
        parent = base.rsplit("/", 1)[0] if base.count("/") > 2 else None  # not above the container
    else:
        parent = os.path.dirname(os.path.abspath(base))
    options = storage.storage_options_for(base, storage_options)
    for folder in (base, parent):
        if not folder:
            continue
        for name, read in ((ORIGIN_MARKER, lambda d: d), (shard_format.MANIFEST_NAME, lambda d: d.get("source"))):
            try:
                found = read(json.loads(storage.read_metadata(storage.join(folder, name), options)))
            except storage.StorageAccessError:
                if folder == base:  # storage that does not answer or refuses us: the data cannot be read either
                    raise
                continue  # the parent may be out of the credentials' reach; the data itself is not
            except Exception:  # noqa: BLE001 -- best effort: an unreadable record means "origin not recorded"
                continue
            if found:
                return found
    return None


def describe_origin(origin: dict | None) -> str:
    """One phrase for a card: what the images are."""
    if origin and origin.get("synthetic"):
        return origin.get("description") or "synthetic images"
    return "user-provided images"
