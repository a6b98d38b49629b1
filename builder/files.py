"""Files the host side writes: hashed, written durably, replaced atomically, locked.

Every atomic replacement goes through a ``.<name>.tmp-<pid>`` temporary in the target's
directory, so one pattern (TMP_RE) finds what a killed run left, and ``sweep`` removes
it under the owner's lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import RackbootError

TMP_RE = re.compile(r"\..+\.tmp-\d+")  # atomic_write's temporaries
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync a file no reader sees yet (inside a work directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], object], shown: Path | None = None) -> None:
    """Run ``write(tmp)``, fsync, rename tmp over ``path`` and fsync the directory: readers
    see the old file or the new one, never a torn one. On failure tmp is removed; errors
    name ``shown`` (default ``path``)."""
    shown = shown or path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RackbootError(f"no space left on device while writing {shown}") from None
        raise RackbootError(f"cannot write {shown}: {exc.strerror or exc}") from None
    except BaseException:
        remove(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove(path: Path) -> None:
    """A file, link or directory tree, if it is there."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def lock_dir(path: Path) -> int:
    """An exclusive flock on the directory itself (no lock file among what the master
    serves or the build outputs); closing the returned descriptor releases it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep(directory: Path, leftovers: re.Pattern[str]) -> None:
    """Remove the entries of ``directory`` whose names a killed run leaves behind. Only
    under the directory owner's lock, so no running writer owns them."""
    for p in directory.iterdir():
        if leftovers.fullmatch(p.name):
            remove(p)
