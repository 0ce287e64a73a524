"""Local filesystem facts for error lines: free space, the mount holding a path, and whether a failed write means a
full, over-quota or read-only filesystem (checked against the filesystem itself, not only the error text). Shared by
``prepare`` (data) and the training output folder (training)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

# -- a full or read-only filesystem -----------------------------------------------------------------
# torch.save reports a failed write without the OS error ("basic_ios::clear", "PytorchStreamWriter failed writing
# file", "unexpected pos" from inline_container.cc); safetensors and the Rust writers put it in their message text.
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "PytorchStreamWriter failed writing", "inline_container.cc")
_ERRNO_TEXTS = {
    errno.ENOSPC: ("No space left on device", "os error 28"),
    errno.EDQUOT: ("Disk quota exceeded", "os error 122"),
    errno.EROFS: ("Read-only file system", "os error 30"),
}
_NEARLY_FULL = 1 << 20  # bytes: less free space than this is a full filesystem whatever the write needed


def _chain(err: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def _existing(path: str | os.PathLike) -> Path:
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(path: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def mount_of(path: str | os.PathLike) -> str:
    """The mount point holding ``path`` and its filesystem type: the longest mount point above it in /proc/mounts (a
    bind mount shares its device with its source, so ``os.path.ismount`` misses it); else the nearest mount point."""
    folder = _existing(path)
    with contextlib.suppress(OSError):
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        found = [(Path(fields[1].encode().decode("unicode_escape")), fields[2]) for fields in mounts if len(fields) > 2]
        above = [(mount, kind) for mount, kind in found if folder == mount or mount in folder.parents]
        if above:
            deepest = max(len(mount.parts) for mount, _ in above)
            mount, kind = [entry for entry in above if len(entry[0].parts) == deepest][-1]  # the last mounted is on top
            return f"{mount} ({kind})"
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return str(folder)


def _named_kind(err: BaseException) -> str | None:
    """The kind an OS error code (or a writer's message quoting one) gives, anywhere in the exception's chain."""
    kinds = {errno.ENOSPC: "full", errno.EDQUOT: "quota", errno.EROFS: "read-only"}
    for link in _chain(err):
        if getattr(link, "errno", None) in kinds:
            return kinds[link.errno]
        for code, phrases in _ERRNO_TEXTS.items():
            if any(phrase in str(link) for phrase in phrases):
                return kinds[code]
    return None


def write_failure_kind(err: BaseException, path: str | os.PathLike, need: int | None = None) -> str | None:
    """``"full"``, ``"quota"`` or ``"read-only"`` when ``err`` is a write that failed for that reason and ``path``'s
    filesystem is in that state (less free space than ``need`` bytes, or 1 MiB; mounted read-only): a full /dev/shm
    in a DataLoader worker is not a full output folder. None for any other error, which keeps its traceback."""
    named = _named_kind(err)
    if named is None and not any(m in str(link) for link in _chain(err) for m in _TORCH_WRITE_FAILURES):
        return None
    if named == "quota":  # a quota leaves the filesystem's free space as it was: nothing to confirm it by
        return named
    if named in (None, "read-only"):
        with contextlib.suppress(OSError):
            if os.statvfs(_existing(path)).f_flag & os.ST_RDONLY:
                return "read-only"
    if named in (None, "full"):
        free = free_bytes(path)
        if free is not None and free < max(need or 0, _NEARLY_FULL):
            return "full"
    return None


def format_size(n: int) -> str:
    """Bytes as a person reads them in an error line: kB below 0.1 MB."""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
