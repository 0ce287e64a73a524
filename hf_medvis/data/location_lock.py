"""One writer at a time per storage location: a lock object inside the location, on a local disk or on Azure Blob storage.

Two runs writing into the same place at once (two ``hf-medvis prepare`` with different ``--size``) interleave their files
into a set that matches neither; the second writer is refused in one line naming the first.

- Local folders: ``flock`` on ``<location>/.hf-medvis-writer.lock``. The kernel releases it when its holder exits, however
  it exits (a SIGKILL, an OOM kill), so a killed run never blocks the next one.
- Azure Blob (``az://``, ``abfs://``): a blob lease on the same name (``LEASE_SECONDS``, renewed by a daemon thread every
  third of that). A killed holder stops renewing: its lease expires and the next run takes the lock over.
- Other fsspec stores have no atomic create-if-absent we can rely on: no lock (logged at INFO).

The lock object holds the run id, host, pid, purpose and start time of its holder, for the refusal message. It is removed
when the holder releases it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from ..core import storage

logger = logging.getLogger(__name__)

LOCK_NAME = ".hf-medvis-writer.lock"
LEASE_SECONDS = 60  # Azure allows 15-60 s (or infinite, which a killed holder would keep forever)


class LocationBusyError(storage.StorageAccessError):
    """Another writer holds the location; the message names it and says what to do (one line)."""


class LocationLockLostError(storage.StorageAccessError):
    """The lease could not be renewed in time: another writer may have taken the location over."""


class LocationLock:
    """A held lock: ``check()`` before each write raises when it was lost (Azure lease not renewed in time)."""

    def __init__(self, url: str, info: dict) -> None:
        self.url = url
        self.info = info
        self.lost: str | None = None

    def check(self) -> None:
        if self.lost:
            raise LocationLockLostError(
                f"{storage.describe(self.url)}: lost the writer lock ({self.lost}); another run may be writing there: "
                "re-run when it has finished"
            )


def _holder_info(purpose: str) -> dict:
    return {
        "run_id": uuid.uuid4().hex[:12],
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _describe_holder(data: bytes) -> str:
    try:
        info = json.loads(data)
        return f"{info['purpose']} run {info['run_id']} on host {info['host']} (pid {info['pid']}, since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another writer (it has not recorded who it is yet)"


@contextlib.contextmanager
def location_lock(
    url: str, storage_options: dict | str | None = None, purpose: str = "hf-medvis"
) -> Iterator[LocationLock]:
    """Holds the writer lock of the location ``url`` (a folder or fsspec URL that exists) for the ``with`` block.

    Raises ``LocationBusyError`` (one line) when another writer holds it; errors of the storage itself (a read-only
    filesystem, a refused credential) propagate as they are."""
    info = _holder_info(purpose)
    protocol = storage.protocol_of(url)
    if protocol == "file":
        with _local_lock(url.removeprefix("file://"), info) as lock:
            yield lock
    elif protocol in storage.AZURE_PROTOCOLS:
        with _blob_lease(url, storage.storage_options_for(url, storage_options), info) as lock:
            yield lock
    else:
        logger.info("%s: no writer lock on %s:// storage; run one writer at a time", storage.describe(url), protocol)
        yield LocationLock(url, info)


@contextlib.contextmanager
def _local_lock(folder: str, info: dict) -> Iterator[LocationLock]:
    path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_fd(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LocationBusyError(
                    f"{storage.describe(folder)} is being written by {_describe_holder(holder)}: wait for it to finish, "
                    "or choose another destination"
                ) from None
            if err.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):  # some FUSE mounts
                logger.warning("%s: this filesystem has no file locks; run one writer at a time", folder)
                try:
                    yield LocationLock(folder, info)
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                return
            raise
        # Its previous holder may have removed the file between our open and our flock: then we hold a lock on a file
        # nobody else will open; start again on the file now at that path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield LocationLock(folder, info)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the flock


def _read_fd(fd: int) -> bytes:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096)
    except OSError:
        return b""


@contextlib.contextmanager
def _blob_lease(url: str, options: dict, info: dict) -> Iterator[LocationLock]:
    # The Azure SDK comes with adlfs, which only Azure users install.
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
    from azure.storage.blob.aio import BlobLeaseClient
    from fsspec.asyn import sync

    fs, path = storage.filesystem(storage.join(url, LOCK_NAME), options)
    container, blob = path.split("/", 1)
    # Our own lease id, proposed: acquiring again with the id of the active lease succeeds, so a retried acquire whose
    # first attempt got the lease (and lost the answer) does not find itself "held by another writer".
    proposed = str(uuid.uuid4())

    async def acquire() -> str:
        async with fs.service_client.get_blob_client(container, blob) as client:
            try:
                await client.upload_blob(b"", overwrite=False)  # a lease needs a blob; an existing one is kept
            except HttpResponseError as err:  # there already (409), or there and leased (412 on some services)
                if err.status_code not in (409, 412):
                    raise
            lease = BlobLeaseClient(client, lease_id=proposed)
            try:
                await lease.acquire(lease_duration=LEASE_SECONDS)
            except HttpResponseError as err:
                if err.status_code != 409:
                    raise
                holder = await (await client.download_blob()).readall()
                raise LocationBusyError(
                    f"{storage.describe(url)} is being written by {_describe_holder(holder)}: wait for it to finish, "
                    f"or choose another destination (the lock of a killed run expires within {LEASE_SECONDS} s)"
                ) from None
            await client.upload_blob(json.dumps(info).encode(), overwrite=True, lease=lease.id)
            return lease.id

    async def renew(lease_id: str) -> None:
        async with fs.service_client.get_blob_client(container, blob) as client:
            await BlobLeaseClient(client, lease_id=lease_id).renew()

    async def release(lease_id: str) -> None:
        async with fs.service_client.get_blob_client(container, blob) as client:
            with contextlib.suppress(ResourceNotFoundError):
                await client.delete_blob(lease=lease_id)

    lease_id = storage.with_retries(lambda: sync(fs.loop, acquire), f"locking {storage.describe(url)}")
    lock = LocationLock(url, info)
    stop = threading.Event()

    def keep_renewing() -> None:
        renewed = time.monotonic()
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                sync(fs.loop, renew, lease_id)
                renewed = time.monotonic()
            except Exception as err:  # a network hiccup: the next tick tries again, until the lease has run out
                taken = isinstance(err, HttpResponseError) and err.status_code == 409
                if taken or time.monotonic() - renewed >= LEASE_SECONDS:
                    lock.lost = f"lease renewal failed: {type(err).__name__}"
                    return
                logger.warning(
                    "%s: renewing the writer lock failed (%s); retrying", storage.describe(url), type(err).__name__
                )

    renewer = threading.Thread(target=keep_renewing, name="location-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        try:
            storage.with_retries(lambda: sync(fs.loop, release, lease_id), f"unlocking {storage.describe(url)}")
        except Exception as err:  # the lease runs out by itself within LEASE_SECONDS
            logger.warning("%s: could not remove the writer lock (%s)", storage.describe(url), type(err).__name__)
