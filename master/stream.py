"""The image stream: the slot's bytes gzip-compressed, with the sizes and digests of
both sides that the manifest carries."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import BinaryIO, TypedDict

from rackboot.errors import RackbootError

STREAM_NAME = "rootfs.ext4.gz"
CHUNK = 1 << 20


class StreamDigests(TypedDict):
    """The manifest's fields that describe the slot's bytes and their stream."""

    size: int
    sha256: str
    crc32: str
    stream_size: int
    stream_sha256: str


def compress_stream(data: BinaryIO, size: int, out: Path) -> StreamDigests:
    """gzip `size` bytes of `data` into `out`; the manifest's sizes and digests of both sides."""
    raw_sha, crc, done = hashlib.sha256(), 0, 0
    with open(out, "wb") as f:
        hashing = _HashingWriter(f)
        # mtime=0 and no file name in the header: the stream depends only on the bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=6, mtime=0) as gz:
            while done < size:
                chunk = data.read(min(CHUNK, size - done))
                if not chunk:
                    raise RackbootError(f"{getattr(data, 'name', 'input')} ended after {done} of {size} bytes")
                raw_sha.update(chunk)
                crc = zlib.crc32(chunk, crc)
                gz.write(chunk)
                done += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {
        "size": size,
        "sha256": raw_sha.hexdigest(),
        "crc32": f"{crc:08x}",
        "stream_size": hashing.count,
        "stream_sha256": hashing.sha.hexdigest(),
    }


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.count += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()
