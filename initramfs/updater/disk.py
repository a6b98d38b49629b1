"""The card as a flat array of bytes: a whole-disk block device or, in tests, a file.

Everything goes through the whole disk at byte offsets (never /dev/vda2), so the
same code works for a regular file; after a new partition table is written the kernel
is asked to re-read it (BLKRRPART) when the path is a real block device.
"""

from __future__ import annotations

import errno
import os
import re
import stat

from .errors import DiskError, NoCard, UpdaterError

BLKRRPART = 0x125F  # _IO(0x12, 95)
# open()'s answers that mean the card is not there (a reader with no medium says ENOMEDIUM),
# as opposed to a card that is there and fails (EIO, EBUSY: worth another try)
NO_CARD_ERRNOS = (errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.ENOMEDIUM)


class Disk:
    def __init__(self, path: str, *, writable: bool = True):
        self.path = path
        try:
            self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in NO_CARD_ERRNOS:
                raise NoCard(f"no card: {path}: {e.strerror}") from None
            raise UpdaterError(f"disk {path}: cannot open: {e.strerror}") from None
        self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        # SEEK_END gives the size of block devices and files alike.
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        chunks = []
        while length > 0:
            try:
                chunk = os.pread(self.fd, length, offset)
            except OSError as e:
                raise DiskError(f"disk {self.path}: read at {offset}: {e.strerror}") from None
            if not chunk:
                raise DiskError(f"disk {self.path}: short read at {offset}")
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        self._check(offset, len(view))
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                raise DiskError(f"disk {self.path}: write at {offset}: {e.strerror}") from None
            view = view[n:]
            offset += n

    def drop_cache(self, offset: int, length: int) -> None:
        """Forget cached pages of a synced range, so the next read comes from the medium."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass  # best effort: the read-back then checks the cache, which still catches bad writes

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DiskError(f"disk {self.path}: fsync: {e.strerror}") from None

    def datasync(self) -> None:
        """fdatasync: the data written so far is on the medium (a slot's bytes, not the file's times)."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DiskError(f"disk {self.path}: fdatasync: {e.strerror}") from None

    def reread_partitions(self) -> None:
        """Make the kernel see a new partition table (block devices only)."""
        if not self.is_block:
            return
        import fcntl  # built into python3.11-minimal; only needed on real devices

        try:
            fcntl.ioctl(self.fd, BLKRRPART)
        except OSError as e:
            raise DiskError(f"disk {self.path}: kernel did not re-read the partition table: {e.strerror}") from None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"disk {self.path}: {length} bytes at {offset} are outside its {self.size} bytes")


def partition_device(disk_path: str, number: int) -> str:
    """The kernel's node for partition `number`: /dev/vda -> /dev/vda3, mmcblk0 -> mmcblk0p3."""
    sep = "p" if re.search(r"\d$", disk_path) else ""
    return f"{disk_path}{sep}{number}"
