"""install: inflate + hash + write into a slot, with bounds and verification."""

from __future__ import annotations

import gzip
import hashlib
import random
import time
import zlib

import pytest
from rackboot.initramfs.updater import install
from rackboot.initramfs.updater.disk import Disk
from rackboot.initramfs.updater.errors import UpdaterError
from rackboot.initramfs.updater.formats import Manifest

MIB = 1 << 20
OFFSET = 3 * MIB
CAPACITY = 8 * MIB


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "card"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    with Disk(str(path)) as d:
        yield d


def image(size=5 * MIB + 123) -> bytes:
    head = random.Random(size).randbytes(size // 2)
    return head + bytes(size - len(head))


def manifest_for(data: bytes, stream: bytes, compression="gzip", **override) -> Manifest:
    fields = dict(
        image="example",
        version=1,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        crc32=f"{zlib.crc32(data):08x}",
        stream="s",
        stream_size=len(stream),
        stream_sha256=hashlib.sha256(stream).hexdigest(),
        compression=compression,
    )
    fields.update(override)
    return Manifest(**fields)


def chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_writes_inflated_bytes_at_the_offset_and_hashes_them(disk):
    data = image()
    stream = gzip.compress(data, mtime=0)
    m = manifest_for(data, stream)
    disk.write(OFFSET - 4, b"KEEP")
    written = install.write_stream(chunks(stream), disk, OFFSET, CAPACITY, m, sync_every=MIB)
    install.verify(written, m)
    assert written == install.Written(len(data), m.sha256, m.crc32, len(stream), m.stream_sha256)
    assert disk.read(OFFSET, len(data)) == data
    assert disk.read(OFFSET - 4, 4) == b"KEEP" and disk.read(OFFSET + len(data), 16) == bytes(16)


def test_multi_member_gzip_like_pigz(disk):
    data = image()
    stream = gzip.compress(data[:MIB], mtime=0) + gzip.compress(data[MIB:], mtime=0)
    m = manifest_for(data, stream)
    install.verify(install.write_stream(chunks(stream, 4096), disk, OFFSET, CAPACITY, m), m)
    assert disk.read(OFFSET, len(data)) == data


def test_uncompressed_stream(disk):
    data = image(MIB)
    m = manifest_for(data, data, compression="none")
    install.verify(install.write_stream(chunks(data), disk, OFFSET, CAPACITY, m), m)
    assert disk.read(OFFSET, len(data)) == data


def test_inflating_more_than_the_manifest_says_is_oversized(disk):
    data = image()
    stream = gzip.compress(data + bytes(100), mtime=0)
    with pytest.raises(UpdaterError, match=r"inflates to more than \d+ bytes \(the manifest's size\): oversized"):
        install.write_stream(chunks(stream), disk, OFFSET, CAPACITY, manifest_for(data, stream))


def test_inflating_past_the_slot_is_oversized_and_never_writes_past_it(disk):
    bomb = gzip.compress(bytes(12 * MIB), mtime=0)  # a tiny stream that inflates past the slot
    m = manifest_for(bytes(12 * MIB), bomb)
    disk.write(OFFSET + CAPACITY, b"NEXT")
    with pytest.raises(UpdaterError, match=r"the slot's 8388608 bytes\): oversized"):
        install.write_stream(chunks(bomb), disk, OFFSET, CAPACITY, m)
    assert disk.read(OFFSET + CAPACITY, 4) == b"NEXT"


def test_short_gzip_is_truncated(disk):
    data = image()
    stream = gzip.compress(data, mtime=0)[:-1000]
    with pytest.raises(UpdaterError, match="truncated"):
        install.write_stream(chunks(stream), disk, OFFSET, CAPACITY, manifest_for(data, stream))


def test_short_plain_stream_is_truncated(disk):
    data = image(MIB)
    with pytest.raises(UpdaterError, match=f"after {MIB - 10} of {MIB} bytes.*truncated"):
        install.write_stream(chunks(data[:-10]), disk, OFFSET, CAPACITY, manifest_for(data, data, compression="none"))


def test_garbage_is_not_gzip(disk):
    data = image(MIB)
    with pytest.raises(UpdaterError, match="not valid gzip"):
        install.write_stream(chunks(data), disk, OFFSET, CAPACITY, manifest_for(data, data))
    stream = gzip.compress(data, mtime=0) + b"trailing junk"
    with pytest.raises(UpdaterError, match="garbage after the gzip data"):
        install.write_stream(chunks(stream), disk, OFFSET, CAPACITY, manifest_for(data, stream))


@pytest.mark.parametrize("field", ["sha256", "crc32", "stream_sha256"])
def test_verify_rejects_each_mismatch(disk, field):
    data = image(MIB)
    stream = gzip.compress(data, mtime=0)
    wrong = {"sha256": "0" * 64, "crc32": "00000000", "stream_sha256": "0" * 64}[field]
    m = manifest_for(data, stream, **{field: wrong})
    written = install.write_stream(chunks(stream), disk, OFFSET, CAPACITY, m)
    with pytest.raises(UpdaterError, match=f"verify example v1: {field} is [0-9a-f]+, the manifest says {wrong}"):
        install.verify(written, m)


def test_errors_from_the_stream_reach_the_caller(disk):
    data = image(MIB)
    stream = gzip.compress(data, mtime=0)

    def failing():
        yield stream[:1000]
        raise UpdaterError("master: connection lost")

    with pytest.raises(UpdaterError, match="connection lost"):
        install.write_stream(failing(), disk, OFFSET, CAPACITY, manifest_for(data, stream))


def test_write_errors_reach_the_caller(tmp_path):
    path = tmp_path / "small"
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
    data = image(2 * MIB)
    stream = gzip.compress(data, mtime=0)
    with Disk(str(path)) as small, pytest.raises(UpdaterError, match="outside its"):
        install.write_stream(chunks(stream), small, 3 * MIB, CAPACITY, manifest_for(data, stream))


def test_a_failed_install_stops_the_reader_thread(disk):
    data = image()
    stream = gzip.compress(data, mtime=0)
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield b"\0" * 4096  # not gzip: fails at once

    with pytest.raises(UpdaterError):
        install.write_stream(endless(), disk, OFFSET, CAPACITY, manifest_for(data, stream))
    time.sleep(0.5)
    before = len(pulled)
    time.sleep(0.3)
    assert len(pulled) == before <= 2 * install.DEPTH + 4
