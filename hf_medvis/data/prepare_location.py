"""The destination of ``prepare``: one dataset per location, complete or visibly incomplete, never mixed.

- Whose dataset: the manifest (and, after an interrupted run, each shard record) carries ``source_id``, a salted hash
  of the source location (nothing of the path can be read from it). A location holding another source's dataset, or
  one prepared with another salt, or shards of unknown origin, is refused unless ``overwrite`` (which removes them).
- While a run changes shards, the location has no manifest, card or quarantine report: they are withdrawn before the
  first shard is rewritten or removed, so neither our reader nor ``datasets.load_dataset(<folder>)`` ever trusts a
  half-changed set. They are written again, last, when every shard is complete.
- Before the manifest is written, every file under ``shards/`` that this run did not produce (a shard of an earlier run
  with more chunks, a shard that now has no rows) is removed: the Parquet files on disk are the manifest's.
- A run holds the location's writer lock (``location_lock``), so every temp file of ``write_bytes_atomic`` found
  there is a dead run's: removed.
- A write that fails for lack of space, a read-only filesystem, a quota or missing permission becomes one line naming
  the location and what it needs (``DestinationWriteError``); what was written until then is complete files only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator

from ..core import storage
from ..core.local_disk import format_size, free_bytes
from . import shard_format
from .location_lock import LocationLock
from .privacy import salted_hash

# Written by prepare at the root of a location, beside shards/ (the manifest last).
ROOT_FILES = (shard_format.MANIFEST_NAME, shard_format.CARD_NAME, shard_format.QUARANTINE_NAME)
TEMP_MARK = ".tmp-"  # storage.write_bytes_atomic's temp names: .NAME.tmp-PID-RANDOM


class DestinationWriteError(storage.StorageAccessError):
    """The destination cannot take a write (full, read-only, quota, permission); one line, no traceback."""


class LocationInUseError(storage.StorageAccessError):
    """The destination holds another dataset; one line saying how to replace it."""


def source_id(src: str, salt: str) -> str:
    """The identity of a source location, salted: the same SRC (however spelled: relative, trailing slash) and salt
    give the same id; the id reveals nothing of the path."""
    if storage.protocol_of(src) == "file":
        location = os.path.abspath(src.removeprefix("file://"))
    else:
        location = storage.describe(src)
    return salted_hash(location.rstrip("/") or "/", salt, "source-location")


class PreparedLocation:
    """One run's view of its destination (held under the location's writer lock)."""

    def __init__(self, dst: str, options: dict, lock: LocationLock | None = None) -> None:
        self.dst = dst
        self.options = options
        self.lock = lock
        self.local = storage.protocol_of(dst) == "file"
        self.withdrawn = False
        self.bytes_written = 0
        self.shards_written = 0

    # -- failures of the destination -> one line ------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, what: str, size: int | None = None) -> Iterator[None]:
        """Turns a write failure of the destination into a ``DestinationWriteError`` naming the location and the need."""
        try:
            yield
        except OSError as err:
            message = self._explain(err, what, size)
            if message is None:
                raise
            raise DestinationWriteError(message) from None

    def _explain(self, err: OSError, what: str, size: int | None) -> str | None:
        where = storage.describe(self.dst)
        done = (
            f"; this run completed {self.shards_written} shard(s) ({format_size(self.bytes_written)}), kept for the re-run"
            if self.shards_written
            else ""
        )
        if err.errno == errno.ENOSPC:
            free = free_bytes(self.dst.removeprefix("file://")) if self.local else None
            need = f"{format_size(size)}" if size is not None else "a few kB"
            have = f", {format_size(free)} free" if free is not None else ""
            return (
                f"no space left on the device of {where}: {what} needs {need}{have}{done}; free space (or choose "
                "another destination) and re-run the same command"
            )
        if err.errno == errno.EDQUOT:
            return f"disk quota exceeded in {where} ({what}){done}: raise the quota or free space, then re-run"
        if err.errno == errno.EROFS:
            return f"{where} is on a read-only filesystem ({what}): choose a writable destination"
        if err.errno in (errno.EACCES, errno.EPERM):
            return f"no permission to write in {where} ({what}): choose a destination you may write to"
        return None

    # -- reading and changing what is there -----------------------------------------------------------------------
    def _url(self, name: str) -> str:
        return storage.join(self.dst, name)

    def _read_json(self, name: str) -> dict | None:
        """A small JSON file of the location, read past any cache (another process may have just changed it)."""
        try:
            data = storage.read_bytes(self._url(name), self.options)  # not read_metadata: that one caches
        except FileNotFoundError:
            return None
        try:  # parsed apart from the read: a StorageAccessError is a ValueError too, and no damaged file
            return json.loads(data)
        except ValueError:
            return {}  # damaged: nobody's

    def shard_files(self) -> list[str]:
        """Names of the files directly under ``shards/`` (temp files included)."""
        url = self._url(shard_format.SHARD_DIR)
        if self.local:
            try:
                return sorted(os.listdir(url.removeprefix("file://")))
            except (FileNotFoundError, NotADirectoryError):
                return []

        def listing() -> list[str]:
            fs, path = storage.filesystem(url, self.options)
            fs.invalidate_cache(path)
            try:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
            except FileNotFoundError:
                return []

        return storage.with_retries(listing, f"listing {storage.describe(url)}")

    def remove(self, names: Iterable[str]) -> None:
        """Removes files (or folders) of the location; absent ones are fine."""
        for name in names:
            url = self._url(name)
            with self.writing(f"removing {name}"):
                if self.local:
                    path = url.removeprefix("file://")
                    with contextlib.suppress(FileNotFoundError):
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path)
                        else:
                            os.unlink(path)
                else:

                    def delete(url: str = url) -> None:
                        fs, path = storage.filesystem(url, self.options)
                        with contextlib.suppress(FileNotFoundError):
                            fs.rm(path, recursive=True)

                    storage.with_retries(delete, f"removing {storage.describe(url)}")
            storage.forget_cached_reads(url)  # a manifest or card this process read before is gone now

    def claim(self, source: str, salt_check: str, overwrite: bool) -> None:
        """Makes the location this source's: refuses another dataset (unless ``overwrite``: removes it) and removes
        a dead run's temp files."""
        manifest = self._read_json(shard_format.MANIFEST_NAME)
        files = self.shard_files()
        temps = [name for name in files if TEMP_MARK in name]
        shards = [name for name in files if name not in temps]
        if manifest is None and not shards:
            self._remove_dead_temps(temps)
            return
        if manifest is not None:
            owner, owner_salt = manifest.get("source_id"), manifest.get("salt_check")
        else:  # an interrupted run: its shard records say whose it was
            record = next(
                (self._read_json(f"{shard_format.SHARD_DIR}/{n}") for n in shards if n.endswith(".json")), None
            )
            owner, owner_salt = (record or {}).get("source_id"), (record or {}).get("salt_check")
        if owner == source:
            self._remove_dead_temps(temps)
            return
        if owner is None:
            whose = "shards of unknown origin (an earlier hf-medvis or another tool: their source is not recorded)"
        elif owner_salt not in (None, salt_check):
            whose = "a dataset prepared with another salt"
        else:
            whose = "a dataset prepared from another source"
        if not overwrite:
            raise LocationInUseError(
                f"{storage.describe(self.dst)} holds {whose}: choose another destination, or pass --overwrite to "
                "replace it"
            )
        self.withdraw()
        self.remove([shard_format.SHARD_DIR])
        self._remove_dead_temps([])

    def _remove_dead_temps(self, temps: list[str]) -> None:
        dead = [f"{shard_format.SHARD_DIR}/{name}" for name in temps]
        if self.local:
            root = self.dst.removeprefix("file://")
            with contextlib.suppress(FileNotFoundError):
                dead += [name for name in os.listdir(root) if TEMP_MARK in name and name.startswith(".")]
        self.remove(dead)

    def withdraw(self) -> None:
        """Removes the manifest (the commit point, first), the card and the quarantine report, once per run: from now
        on the location reads as incomplete until ``commit``."""
        if not self.withdrawn:
            self.remove(ROOT_FILES)
            self.withdrawn = True

    def write_shard_file(self, name: str, data: bytes) -> None:
        """A shard or its record, complete or not at all; the first one withdraws the manifest."""
        if self.lock is not None:
            self.lock.check()
        self.withdraw()
        with self.writing(f"writing {name}", len(data)):
            storage.write_bytes_atomic(self._url(name), data, self.options)
        if name.endswith(".parquet"):
            self.shards_written += 1
            self.bytes_written += len(data)

    def remove_strays(self, keep: set[str]) -> None:
        """Removes every file under ``shards/`` not in ``keep`` (names relative to the location)."""
        strays = [f"{shard_format.SHARD_DIR}/{n}" for n in self.shard_files()]
        strays = [name for name in strays if name not in keep]
        if strays:
            self.withdraw()
            self.remove(strays)

    def commit(self, card: bytes, quarantine: bytes, manifest: bytes) -> None:
        """The card, the quarantine report, then the manifest: the location is complete once the manifest is there."""
        if self.lock is not None:
            self.lock.check()
        for name, data in (
            (shard_format.CARD_NAME, card),
            (shard_format.QUARANTINE_NAME, quarantine),
            (shard_format.MANIFEST_NAME, manifest),
        ):
            with self.writing(f"writing {name}", len(data)):
                storage.write_bytes_atomic(self._url(name), data, self.options)
