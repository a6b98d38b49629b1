"""Compressors: standard tools read our streams, and the bytes never vary."""

import gzip
import io
import lzma
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest
from rackboot import compress
from rackboot.errors import RackbootError

BLOCK = compress.GZIP_BLOCK


def sample(size: int = 5 * BLOCK + 1234) -> bytes:
    """Text-like and compressible, not a multiple of the block size, with a random stretch."""
    text = b"".join(f"line {i}: {i * 2654435761 % 1000003:x} rackboot\n".encode() for i in range(size // 20))
    return (text[: size // 2] + os.urandom(BLOCK // 3) + text)[:size]


def tool_decompress(method: str, data: bytes) -> bytes:
    cmd = {"gzip": ["gzip", "-dc"], "xz": ["xz", "-dc"], "zstd": ["zstd", "-dcq"]}[method]
    return subprocess.run(cmd, input=data, check=True, capture_output=True).stdout


@pytest.mark.parametrize("method", ["gzip", "xz", "zstd"])
@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 5 * BLOCK + 1234])
def test_round_trip_through_the_standard_tools(method, size):
    data = sample(size) if size > 1 else b"x" * size
    packed = compress.compress_bytes(method, data)
    assert tool_decompress(method, packed) == data


def test_none_is_the_identity():
    data = sample()
    assert compress.compress_bytes("none", data) == data


def test_python_decoders_agree():
    data = sample()
    assert gzip.decompress(compress.compress_bytes("gzip", data)) == data
    assert lzma.decompress(compress.compress_bytes("xz", data)) == data


def test_gzip_is_one_member_that_gzip_t_accepts():
    data = sample()
    packed = compress.compress_bytes("gzip", data)
    subprocess.run(["gzip", "-t"], input=packed, check=True)
    magic, method, flags, mtime = struct.unpack("<HBBI", packed[:8])
    assert (magic, method, flags, mtime) == (0x8B1F, 8, 0, 0)  # no name, no timestamp
    # Exactly one member: raw inflate of the body ends right before the trailer.
    d = zlib.decompressobj(-15)
    assert d.decompress(packed[10:]) == data and d.eof and len(d.unused_data) == 8
    crc, isize = struct.unpack("<II", d.unused_data)
    assert (crc, isize) == (zlib.crc32(data), len(data))


def test_gzip_compresses_about_as_well_as_gzip_6():
    stdlib = sorted(Path(os.__file__).parent.glob("*.py"))
    data = b"".join(p.read_bytes() for p in stdlib)[: 4 * 1024 * 1024]
    ours = len(compress.compress_bytes("gzip", data))
    reference = len(subprocess.run(["gzip", "-6", "-c"], input=data, check=True, capture_output=True).stdout)
    assert ours <= reference * 1.01  # blocks keep their 32 KiB history, so little is lost


@pytest.mark.parametrize("method", compress.METHODS)
def test_same_input_same_bytes(method):
    data = sample()
    assert compress.compress_bytes(method, data) == compress.compress_bytes(method, data)


@pytest.mark.parametrize("method", ["gzip", "zstd"])
def test_thread_count_does_not_change_the_bytes(method):
    data = sample(3 * 1024 * 1024)
    outputs = {compress.compress_bytes(method, data, threads=n) for n in (1, 2, 5)}
    assert len(outputs) == 1


@pytest.mark.parametrize("method", compress.METHODS)
def test_write_sizes_do_not_change_the_bytes(method):
    data = sample(2 * BLOCK + 77)
    pieces, at, sizes = [], 0, [1, 7, BLOCK - 8, 3, BLOCK * 2, 1000]
    while at < len(data):
        n = sizes[len(pieces) % len(sizes)]
        pieces.append(data[at : at + n])
        at += n
    assert compress.compress_bytes(method, data) == _compress_pieces(method, pieces)


def _compress_pieces(method, pieces):
    out = io.BytesIO()
    compress.compress_stream(method, iter(pieces), out)
    return out.getvalue()


def test_xz_uses_crc32_for_the_kernel(tmp_path):
    packed = compress.compress_bytes("xz", sample())
    # Stream header: magic, then two flag bytes whose low nibble names the check; 1 = CRC32.
    assert packed[:6] == b"\xfd7zXZ\x00" and packed[6:8] == b"\x00\x01"
    assert packed[-4:-2] == b"\x00\x01" and packed[-2:] == b"YZ"  # the footer repeats it
    (tmp_path / "a.xz").write_bytes(packed)
    report = subprocess.run(["xz", "--robot", "-lvv", tmp_path / "a.xz"], check=True, capture_output=True)
    checks = {line.split(b"\t")[8] for line in report.stdout.splitlines() if line.startswith(b"stream")}
    assert checks == {b"CRC32"}


def test_compress_stream_reads_file_objects(tmp_path):
    data = sample()
    out = io.BytesIO()
    compress.compress_stream("gzip", io.BytesIO(data), out, chunk_size=4096)
    assert out.getvalue() == compress.compress_bytes("gzip", data)


def test_write_compressed_feeds_the_producer_a_sink():
    out = io.BytesIO()
    compress.write_compressed("xz", lambda sink: [sink.write(b"ab") for _ in range(1000)], out)
    assert lzma.decompress(out.getvalue()) == b"ab" * 1000


@pytest.mark.parametrize("method", compress.METHODS)
def test_failing_producer_propagates_and_leaves_no_threads(method):
    before = threading.active_count()

    def produce(sink):
        sink.write(sample())
        raise RackbootError("producer broke")

    with pytest.raises(RackbootError, match="producer broke"):
        compress.write_compressed(method, produce, io.BytesIO())
    assert threading.active_count() == before


def test_unknown_method_and_bad_level_are_refused():
    with pytest.raises(RackbootError, match="lz4"):
        compress.compressor("lz4", io.BytesIO())
    with pytest.raises(RackbootError, match="level"):
        compress.compressor("gzip", io.BytesIO(), level=11)
