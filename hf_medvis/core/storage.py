"""Storage access through fsspec (adlfs for ``az://`` / ``abfs://``): credentials, retries, atomic writes.

Credentials come from explicit ``storage_options`` (a dict or a JSON string) or, for Azure URLs, from the environment:
``AZURE_STORAGE_CONNECTION_STRING``; ``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_ACCOUNT_KEY`` or
``AZURE_STORAGE_SAS_TOKEN``; otherwise adlfs falls back to ``DefaultAzureCredential`` (azure-identity: managed identity,
workload identity, Azure CLI login). Secrets never appear in messages: use ``redact`` before printing options.

``with_retries`` is the one retry layer (the Azure SDK's own is switched off in ``filesystem``, its request log kept at
WARNING): transient errors are retried for ``retry_budget()`` seconds, then one line names the location and what to
check. Small metadata files (manifest, origin marker, card) are read once per process (``read_metadata``; a local
one again when it changed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from .errors import first_sentence

logger = logging.getLogger(__name__)
T = TypeVar("T")

AZURE_PROTOCOLS = ("az", "abfs", "abfss", "adl")
RETRY_SECONDS_ENV = "HF_MEDVIS_STORAGE_RETRY_SECONDS"
# A service restart or a short network outage (~30 s) is ridden out; storage that does not answer ends a run in ~1 min.
DEFAULT_RETRY_SECONDS = 60.0
# A TCP connection to a storage endpoint either opens within seconds or is dropped (firewall, missing private link).
CONNECT_TIMEOUT_SECONDS = 10

# The Azure SDK logs every HTTP request and response (headers and all) at INFO, and the recipes log INFO: an outage
# printed a page per attempt. Its warnings still show; a level set before this import (to debug the SDK) is kept.
_azure_logger = logging.getLogger("azure")
if _azure_logger.level == logging.NOTSET:
    _azure_logger.setLevel(logging.WARNING)
_SECRET_WORDS = ("key", "secret", "token", "password", "connection_string", "credential", "sas")


def has_glob(location: str) -> bool:
    """Whether a path or URL is a glob pattern (``*``, ``?``, ``[``) rather than one location."""
    return any(ch in location for ch in "*?[")


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
    if protocol_of(url) in AZURE_PROTOCOLS:
        # adlfs would otherwise turn a refused container lookup into a warning and carry on into a later failure.
        options.setdefault("assume_container_exists", False)
    if protocol_of(url) not in AZURE_PROTOCOLS or set(options) != {"assume_container_exists"}:
        return options
    env = os.environ
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return {**options, "connection_string": env["AZURE_STORAGE_CONNECTION_STRING"]}
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME")
    if account and env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        return {**options, "account_name": account, "account_key": env["AZURE_STORAGE_ACCOUNT_KEY"]}
    if account and env.get("AZURE_STORAGE_SAS_TOKEN"):
        return {**options, "account_name": account, "sas_token": env["AZURE_STORAGE_SAS_TOKEN"]}
    if account:
        # No secret: adlfs uses DefaultAzureCredential (needs azure-identity, the [azure] extra).
        return {**options, "account_name": account, "anon": False}
    return options


def is_secret_name(name: str) -> bool:
    """Whether an option or environment variable name looks like a credential's (its value is never logged)."""
    return any(word in name.lower() for word in _SECRET_WORDS)


def redact(options: dict) -> dict:
    """A copy safe to log: secret-looking values replaced."""
    return {k: ("***" if is_secret_name(k) else v) for k, v in options.items()}


def describe(url: str | os.PathLike) -> str:
    """A location safe to log or write: no query (SAS tokens live there), no ``user:secret@`` in the authority."""
    text = os.fspath(url).split("?", 1)[0]
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        text = f"{scheme}://{rest.split('@', 1)[1]}"
    return text


class StorageAccessError(ValueError):
    """A storage location that cannot be used as given: bad name, refused credentials. The message says which and how
    to fix it, in one line, without any secret."""


# Azure Blob container names: 3-63 lowercase letters, digits and hyphens; a letter or digit first and last; no "--".
_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


def check_container_name(url: str, path: str) -> None:
    container = path.split("/", 1)[0]
    if container and container != "$root" and not _CONTAINER_NAME.match(container):
        raise StorageAccessError(
            f"{describe(url)}: '{container}' is not a valid Azure container name (3-63 lowercase letters, digits and "
            "single hyphens, a letter or digit first and last)"
        )


def filesystem(url: str, storage_options: dict | str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    if protocol_of(url) in AZURE_PROTOCOLS:
        check_container_name(url, path)
        _leave_retries_to_us(fs)
    return fs, path


def _leave_retries_to_us(fs: fsspec.AbstractFileSystem) -> None:
    """adlfs gives its BlobServiceClient the SDK's default retries (3, after 15, 18 and 24 s: a minute per call inside
    each of our attempts) and passes no retry settings through. Here they are switched off and a connection attempt
    is bounded, once per filesystem (fsspec reuses instances), on the policy and transport its clients share."""
    client = getattr(fs, "service_client", None)
    if client is None or getattr(fs, "_medvis_retries_bounded", False):
        return  # not Blob storage (adl:// is Data Lake Gen1), or done already
    config = getattr(client, "_config", None)
    policy = getattr(config, "retry_policy", None)
    connection = getattr(getattr(config, "transport", None), "connection_config", None)
    counters = ("total_retries", "connect_retries", "read_retries", "status_retries")
    if connection is None or not all(hasattr(policy, name) for name in counters):
        logger.warning(
            "cannot switch off the Azure SDK's own retries (this azure-storage-blob builds its client differently): "
            "storage that does not answer takes several minutes to report"
        )
    else:
        for name in counters:
            setattr(policy, name, 0)
        connection.timeout = CONNECT_TIMEOUT_SECONDS
    fs._medvis_retries_bounded = True


def explain_storage_error(err: BaseException, url: str | None = None) -> str | None:
    """One line for a storage failure a user can fix (credentials, names, reachability); None for anything else. The
    Azure SDK's own message (a page of HTTP headers and XML) is reduced to its error code."""
    # Imported here, not at the top: the Azure SDK (a dependency, through adlfs) costs start-up time to every command.
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    while err.__cause__ is not None and not isinstance(err, (HttpResponseError, ServiceRequestError)):
        err = err.__cause__  # adlfs wraps some SDK errors (ValueError ... from HttpResponseError)
    where = f"{describe(url)}: " if url else ""
    if type(err).__name__ == "AzureSigningError":
        return (
            f"{where}cannot sign requests: the storage account key is not valid base64 (cut short when copied?) "
            f"({_first_sentence(err)})"
        )
    if isinstance(err, ClientAuthenticationError) or (isinstance(err, HttpResponseError) and err.status_code == 403):
        code = getattr(err, "error_code", None) or getattr(err, "status_code", None) or type(err).__name__
        return (
            f"{where}access denied by Azure Storage ({_code_name(code)}): check the account key, SAS token or the "
            "identity's role (Storage Blob Data Reader / Contributor); credentials are not shown"
        )
    if isinstance(err, HttpResponseError) and err.status_code == 400:
        return f"{where}Azure Storage refused the request ({_code_name(err.error_code)}): {_first_sentence(err)}"
    if isinstance(err, HttpResponseError) and err.status_code is not None and is_transient(err):
        code = _code_name(err.error_code or err.reason or err.status_code)
        return f"{where}the storage service kept answering {err.status_code} ({code}): it is busy or failing; try later"
    if isinstance(err, (ServiceRequestError, ServiceResponseError)):
        return (
            f"{where}no answer from the storage service ({_first_sentence(err)}): check the endpoint (account name, "
            "BlobEndpoint of the connection string), firewall and private-link rules, and that Azurite is running if "
            "you use it"
        )
    return None


def _code_name(code: object) -> str:
    return str(getattr(code, "value", code))


def _first_sentence(err: BaseException) -> str:
    return first_sentence(err).split(" RequestId:", 1)[0]  # Azure appends the request's ids to the first sentence


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_transient(err: BaseException) -> bool:
    """Network hiccups, throttling and server errors are worth retrying; missing files and bad credentials are not."""
    err = _unwrap_adlfs(err)
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageAccessError)):
        return False
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError  # start-up

    if isinstance(err, (ClientAuthenticationError, ResourceNotFoundError)):
        return False
    if isinstance(err, HttpResponseError) and err.status_code is not None:
        return err.status_code in (408, 429) or err.status_code >= 500
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or type(err).__name__ in (
        "ServiceRequestError",
        "ServiceResponseError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    )


def retry_budget() -> float:
    """Seconds ``with_retries`` keeps retrying one storage call: ``HF_MEDVIS_STORAGE_RETRY_SECONDS``, else 60."""
    value = os.environ.get(RETRY_SECONDS_ENV, "").strip() or str(DEFAULT_RETRY_SECONDS)
    with contextlib.suppress(ValueError):
        if float(value) >= 0:  # not negative, not NaN
            return float(value)
    raise ValueError(f"{RETRY_SECONDS_ENV}={value!r}: give the seconds to retry storage calls (e.g. 60)")


def with_retries(
    fn: Callable[[], T],
    what: str,
    budget: float | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
) -> T:
    """Calls ``fn``; transient storage errors (network, throttling, server errors) are retried with exponential
    backoff and jitter for ``budget`` seconds (``retry_budget()`` when None). When that time is up, or the error is not
    transient but explained (credentials, names): ``StorageAccessError``, one line starting with ``what`` (say
    "reading az://container/path"). Other errors (a missing file) are raised as they are."""
    budget = retry_budget() if budget is None else budget
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as err:
            elapsed = time.monotonic() - started
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            transient = is_transient(err)
            if transient and elapsed + delay <= budget:
                # One line per call that has to wait, so a stalled run says why; the attempts after it at DEBUG.
                log = logger.warning if attempt == 1 else logger.debug
                log("%s: %s; retrying for up to %.0f s", what, _error_summary(err), budget)
                time.sleep(delay)
                continue
            message = explain_storage_error(err)
            if transient:
                message = f"{message or _error_summary(err)} (gave up after {attempt} attempt(s) in {elapsed:.0f} s)"
            if message is not None:
                raise StorageAccessError(f"{what}: {message}") from None
            raise
        if attempt > 1:
            logger.info("%s: answered after %d attempts (%.0f s)", what, attempt, time.monotonic() - started)
        return result


def _unwrap_adlfs(err: BaseException) -> BaseException:
    """The error adlfs wrapped (a ValueError or RuntimeError raised from the SDK's error, e.g. "Failed to fetch
    container properties"): the cause says what happened, the wrapper repeats it in a longer sentence."""
    while isinstance(err, (ValueError, RuntimeError)) and not isinstance(err, StorageAccessError) and err.__cause__:
        err = err.__cause__
    return err


def _error_summary(err: BaseException) -> str:
    err = _unwrap_adlfs(err)
    return f"{type(err).__name__}: {_first_sentence(err)}"


def read_bytes(url: str, storage_options: dict | str | None = None, retries: bool = True) -> bytes:
    """The whole object at ``url``; transient errors of remote storage retried (``with_retries``)."""

    def read() -> bytes:
        fs, path = filesystem(url, storage_options)
        return fs.cat_file(path)

    # A local file system has no network hiccups to wait out: its errors are reported at once.
    return with_retries(read, f"reading {describe(url)}") if retries and protocol_of(url) != "file" else read()


# (URL, storage options) -> (version, bytes) of a small metadata file: version is None on remote storage (bytes None
# where it was absent), a local file's identity and change times (``_local_version``).
_metadata_reads: dict[tuple[str, str], tuple[tuple[int, ...] | None, bytes | None]] = {}


def read_metadata(url: str, storage_options: dict | str | None = None) -> bytes:
    """A small metadata file (manifest.json, the phantoms.json origin marker, a dataset card), read once per process
    however many steps of a run ask for it. Remote: found or absent (FileNotFoundError), until this process writes that
    URL (``write_bytes_atomic``) or calls ``forget_cached_reads``. Local: read again whenever the file changed (another
    inode, size or change time: a re-prepare, another process's write); a missing file is never remembered."""
    options = storage_options_for(url, storage_options)
    key = (_cache_url(url), json.dumps(options, sort_keys=True, default=repr))
    version = None
    if protocol_of(url) == "file":
        try:
            version = _local_version(filesystem(url, options)[1])
        except OSError:
            _metadata_reads.pop(key, None)
            raise
    cached = _metadata_reads.get(key)
    if cached is None or cached[0] != version:
        try:
            cached = (version, read_bytes(url, options))
        except FileNotFoundError:
            if version is not None:  # removed between stat and read
                raise
            cached = (None, None)
        _metadata_reads[key] = cached
    if cached[1] is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", describe(url))
    return cached[1]


def _local_version(path: str) -> tuple[int, ...]:
    """What changes when a local file is replaced (our atomic writes rename a new inode over it) or rewritten in place
    (size, modification and change times, in ns)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def forget_cached_reads(url: str | None = None) -> None:
    """Drops what ``read_metadata`` remembers of ``url`` (every URL when None): after this process changed or removed
    the file by other means than ``write_bytes_atomic``."""
    if url is None:
        _metadata_reads.clear()
        return
    target = _cache_url(url)
    for key in [key for key in _metadata_reads if key[0] == target]:
        del _metadata_reads[key]


def _cache_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("az", "abfs", "abfss"):  # one adlfs filesystem, three names
        scheme = "az"
    return f"{scheme.lower()}{sep}{rest.rstrip('/')}" if sep else url


@contextlib.contextmanager
def open_local_atomic(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """A local file written through a temp name in the same folder, then ``os.replace``: it appears complete or not
    at all. For files written in parts (a large CSV) rather than from one buffer."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    forget_cached_reads(path)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | str | None = None) -> None:
    """The object appears under ``url`` complete or not at all.

    Local files: a temp name in the same folder, then ``os.replace``. Blob stores: a single upload, which the service
    commits atomically (a blob becomes visible only when its block list is committed).
    """
    if protocol_of(url) == "file":
        with open_local_atomic(url.removeprefix("file://")) as handle:
            handle.write(data)
        forget_cached_reads(url)
        return

    def upload() -> None:
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)

    with_retries(upload, f"writing {describe(url)}")
    forget_cached_reads(url)  # this process reads back what it wrote


def write_text_atomic(url: str | os.PathLike, text: str, storage_options: dict | str | None = None) -> None:
    """``write_bytes_atomic`` of UTF-8 text."""
    write_bytes_atomic(os.fspath(url), text.encode("utf-8"), storage_options)


def write_json_atomic(url: str | os.PathLike, data: object, storage_options: dict | str | None = None) -> None:
    """``data`` as indented JSON, written whole or not at all."""
    write_text_atomic(url, json.dumps(data, indent=2) + "\n", storage_options)


def exists(url: str, storage_options: dict | str | None = None) -> bool:
    def check() -> bool:
        fs, path = filesystem(url, storage_options)
        return fs.exists(path)

    return with_retries(check, f"checking {describe(url)}") if protocol_of(url) != "file" else check()


def make_dirs(url: str, storage_options: dict | str | None = None) -> None:
    if protocol_of(url) == "file":
        os.makedirs(url.removeprefix("file://"), exist_ok=True)
        return
    fs, path = filesystem(url, storage_options)

    def make() -> None:
        if protocol_of(url) in AZURE_PROTOCOLS:
            container = path.split("/", 1)[0]
            if not fs.exists(container):
                with contextlib.suppress(FileExistsError):  # another worker made it first
                    fs.mkdir(container)
        else:
            fs.makedirs(path, exist_ok=True)

    with_retries(make, f"creating {describe(url)}")
