"""Storage access through fsspec (adlfs for ``az://`` / ``abfs://``): credentials, retries, atomic writes.

Credentials come from explicit ``storage_options`` (a dict or a JSON string) or, for Azure URLs, from the environment:
``AZURE_STORAGE_CONNECTION_STRING``; ``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_ACCOUNT_KEY`` or
``AZURE_STORAGE_SAS_TOKEN``; otherwise adlfs falls back to ``DefaultAzureCredential`` (azure-identity: managed identity,
workload identity, Azure CLI login). Secrets never appear in messages: use ``redact`` before printing options.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

AZURE_PROTOCOLS = ("az", "abfs", "abfss", "adl")
_SECRET_WORDS = ("key", "secret", "token", "password", "connection_string", "credential", "sas")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def parse_storage_options(value: dict | str | None) -> dict:
    """``--storage_options`` as given on a command line (JSON) or in code (dict)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        # Never echo the value: it may hold a key.
        raise ValueError(f"storage_options is not valid JSON ({err.msg} at position {err.pos})") from None
    if not isinstance(parsed, dict):
        raise ValueError("storage_options must be a JSON object")
    return parsed


def storage_options_for(url: str, storage_options: dict | str | None = None) -> dict:
    """Explicit options win; for Azure URLs without any, credentials come from the environment."""
    options = parse_storage_options(storage_options)
    if protocol_of(url) not in AZURE_PROTOCOLS or options:
        return options
    env = os.environ
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return {"connection_string": env["AZURE_STORAGE_CONNECTION_STRING"]}
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME")
    if account and env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        return {"account_name": account, "account_key": env["AZURE_STORAGE_ACCOUNT_KEY"]}
    if account and env.get("AZURE_STORAGE_SAS_TOKEN"):
        return {"account_name": account, "sas_token": env["AZURE_STORAGE_SAS_TOKEN"]}
    if account:
        # No secret: adlfs uses DefaultAzureCredential (needs azure-identity, the [azure] extra).
        return {"account_name": account, "anon": False}
    return {}


def redact(options: dict) -> dict:
    """A copy safe to log: secret-looking values replaced."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in options.items()}


def describe(url: str | os.PathLike) -> str:
    """A location safe to log or write: no query (SAS tokens live there), no ``user:secret@`` in the authority."""
    text = os.fspath(url).split("?", 1)[0]
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        text = f"{scheme}://{rest.split('@', 1)[1]}"
    return text


def filesystem(url: str, storage_options: dict | str | None = None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    return fs, path


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_transient(err: BaseException) -> bool:
    """Network hiccups, throttling and server errors are worth retrying; missing files and bad credentials are not."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

        if isinstance(err, (ClientAuthenticationError, ResourceNotFoundError)):
            return False
        if isinstance(err, HttpResponseError) and err.status_code is not None:
            return err.status_code in (408, 429) or err.status_code >= 500
    except ImportError:  # pragma: no cover - azure is a base dependency through adlfs
        pass
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or type(err).__name__ in (
        "ServiceRequestError",
        "ServiceResponseError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    )


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 8,
    base_delay: float = 0.5,
    max_delay: float = 10.0,
) -> T:
    """Calls ``fn``; transient storage errors are retried with exponential backoff and jitter (~40 s in all)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not is_transient(err):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            logger.warning("%s: %s (attempt %d/%d), retrying in %.1fs", what, type(err).__name__, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, storage_options: dict | str | None = None, retries: bool = True) -> bytes:
    """The whole object at ``url``; transient errors retried."""
    def read() -> bytes:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)

    return with_retries(read, f"reading {describe(url)}") if retries else read()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | str | None = None) -> None:
    """The object appears under ``url`` complete or not at all.

    Local files: a temp name in the same folder, then ``os.replace``. Blob stores: a single upload, which the service
    commits atomically (a blob becomes visible only when its block list is committed).
    """
    if protocol_of(url) == "file":
        path = url.removeprefix("file://")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return

    def upload() -> None:
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)

    with_retries(upload, f"writing {describe(url)}")


def exists(url: str, storage_options: dict | str | None = None) -> bool:
    def check() -> bool:
        fs, path = filesystem(url, storage_options)
        return fs.exists(path)

    return with_retries(check, f"checking {describe(url)}")


def make_dirs(url: str, storage_options: dict | str | None = None) -> None:
    if protocol_of(url) == "file":
        os.makedirs(url.removeprefix("file://"), exist_ok=True)
        return
    fs, path = filesystem(url, storage_options)
    if protocol_of(url) in AZURE_PROTOCOLS:
        container = path.split("/", 1)[0]
        if not fs.exists(container):
            with contextlib.suppress(FileExistsError):  # another worker made it first
                fs.mkdir(container)
    else:
        fs.makedirs(path, exist_ok=True)

