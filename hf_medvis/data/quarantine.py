"""The quarantine report of a prepared location: reading it, and finding each quarantined input again in the
operator's copy of SRC (the report holds salted hashes, never file names)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from ..core import storage
from . import shard_format
from .folder import iter_image_files
from .privacy import relative_path, resolve_salt, salt_check, salted_hash, source_root


def read_quarantine(dst: str, storage_options: dict | str | None = None) -> list[dict]:
    data = storage.read_bytes(storage.join(dst, shard_format.QUARANTINE_NAME), storage_options)
    return [json.loads(line) for line in io.StringIO(data.decode()) if line.strip()]


def locate_quarantined(
    src: str,
    dst: str,
    *,
    salt: str | None = None,
    storage_options: dict | str | None = None,
    dst_storage_options: dict | str | None = None,
) -> Iterator[tuple[str, str]]:
    """(source path, reason) of each quarantined input of the prepared location ``dst``, found by walking ``src`` again
    and hashing each path with the salt: DST holds no file names, the operator's copy of SRC does. Also yields each
    file skipped as not an image."""
    salt = resolve_salt(salt)
    dst_options = dst_storage_options if dst_storage_options is not None else storage_options
    manifest = json.loads(storage.read_metadata(storage.join(dst, shard_format.MANIFEST_NAME), dst_options))
    if manifest.get("salt_check") not in (None, salt_check(salt)):
        raise ValueError(f"this salt is not the one {storage.describe(dst)} was prepared with")
    wanted = {e["source_hash"]: e["reason"] for e in read_quarantine(dst, dst_options) if "source_hash" in e}
    in_options = storage.storage_options_for(src, storage_options)
    root = source_root(src)
    skipped: list[tuple[str, str]] = []
    for source in iter_image_files(src, in_options, on_skip=lambda path, reason: skipped.append((path, reason))):
        reason = wanted.get(salted_hash(relative_path(source, root), salt, "source"))
        if reason is not None:
            yield source, reason
        yield from skipped
        skipped.clear()
    yield from skipped
