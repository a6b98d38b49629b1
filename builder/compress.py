"""Deterministic compressors for boot artefacts: none, gzip, xz, zstd.

Every method is a streaming sink (``write`` then ``close``) so archives never sit in
memory whole, and every method gives the same bytes for the same input:

- gzip: parallel deflate in fixed 128 KiB blocks, pigz-style. Each block is raw
  deflate primed with the previous 32 KiB of input and ended on a byte boundary with
  a sync flush, so the blocks concatenate into one ordinary gzip member. The block
  size is fixed, so the output does not depend on the thread count or on timing.
  Header: mtime 0, no file name.
- xz: CRC32 integrity check, because the kernel's initramfs xz decoder rejects CRC64.
- zstd: the Debian ``zstd`` command (Python 3.11 has no zstd module), reading a pipe
  so the frame never records a content size that could differ between callers; its
  multi-threaded mode is documented to give the same output for any worker count.
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import struct
import subprocess
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, BinaryIO, Protocol

from .errors import RackbootError

METHODS = ("none", "gzip", "xz", "zstd")
DEFAULT_LEVELS = {"gzip": 6, "xz": 6, "zstd": 3}
GZIP_BLOCK = 128 * 1024
_WINDOW = 32 * 1024  # deflate's history: the dictionary each block starts from
_GZIP_OS_UNIX = 3


class Compressor(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


# --- gzip ----------------------------------------------------------------------------


def _gzip_header(level: int) -> bytes:
    xfl = 2 if level == 9 else 4 if level == 1 else 0  # as gzip(1) marks best / fastest
    return struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, xfl, _GZIP_OS_UNIX)


def _deflate_block(block: bytes, history: bytes, level: int) -> bytes:
    """Raw deflate of one block, primed with ``history``, ending on a byte boundary."""
    if history:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, history)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """One gzip member, deflated in fixed-size blocks on a thread pool (zlib drops the GIL)."""

    def __init__(self, out: BinaryIO, level: int = 6, threads: int | None = None, block_size: int = GZIP_BLOCK):
        if not 1 <= level <= 9:
            raise RackbootError(f"gzip level {level} is outside 1..9")
        self._out, self._level, self._block = out, level, block_size
        self._threads = max(1, threads if threads is not None else (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        self._pending: deque[Future[bytes]] = deque()
        self._buf = bytearray()
        self._history = b""
        self._crc = 0
        self._size = 0
        self._closed = False
        out.write(_gzip_header(level))

    def write(self, data: bytes) -> int:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buf += data
        if len(self._buf) >= self._block:
            view = memoryview(self._buf)
            whole = len(self._buf) - len(self._buf) % self._block
            for at in range(0, whole, self._block):
                self._submit(bytes(view[at : at + self._block]))
            view.release()
            del self._buf[:whole]
        return len(data)

    def _submit(self, block: bytes) -> None:
        history, self._history = self._history, block[-_WINDOW:]
        if self._pool is None:
            self._out.write(_deflate_block(block, history, self._level))
            return
        self._pending.append(self._pool.submit(_deflate_block, block, history, self._level))
        while len(self._pending) > 2 * self._threads:  # bounded: memory stays a few blocks
            self._out.write(self._pending.popleft().result())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._buf:
                self._submit(bytes(self._buf))
                self._buf.clear()
            while self._pending:
                self._out.write(self._pending.popleft().result())
            # An empty final block ends the deflate stream; then CRC32 and size mod 2**32.
            self._out.write(zlib.compressobj(self._level, zlib.DEFLATED, -15).flush())
            self._out.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self.abort()

    def abort(self) -> None:
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# --- xz, zstd, none ------------------------------------------------------------------


class _Xz:
    def __init__(self, out: BinaryIO, level: int):
        self._out = out
        self._c: lzma.LZMACompressor | None = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=level)

    def write(self, data: bytes) -> int:
        if self._c is None:
            raise RackbootError("xz: write after the stream was closed")
        self._out.write(self._c.compress(data))
        return len(data)

    def close(self) -> None:
        if self._c is not None:
            self._out.write(self._c.flush())
            self._c = None

    def abort(self) -> None:
        self._c = None


class _Zstd:
    def __init__(self, out: BinaryIO, level: int, threads: int | None):
        exe = shutil.which("zstd")
        if exe is None:
            raise RackbootError("zstd compression needs the zstd command (apt-get install zstd)")
        workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
        self._proc = subprocess.Popen(
            [exe, "-q", "-c", f"-{level}", f"-T{workers}", "--no-progress"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        # Both are pipes, as asked for above; Popen types them Optional for the other cases.
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._copy_out, args=(out,), daemon=True)
        self._reader.start()

    def _copy_out(self, out: BinaryIO) -> None:
        try:
            while chunk := self._stdout.read(1 << 20):
                out.write(chunk)
        except BaseException as e:  # surfaced by write() or close()
            self._error = e
            self._proc.kill()  # else zstd blocks on a full pipe and so would write()

    def write(self, data: bytes) -> int:
        try:
            self._stdin.write(data)
        except BrokenPipeError:
            self.abort()
            if self._error is not None:
                raise self._error from None
            raise RackbootError("zstd exited while compressing") from None
        return len(data)

    def close(self) -> None:
        if self._stdin.closed:
            return
        self._stdin.close()
        self._reader.join()
        status = self._proc.wait()
        if self._error is not None:
            raise self._error
        if status != 0:
            raise RackbootError(f"zstd failed with exit status {status}")

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        if not self._stdin.closed:
            try:
                self._stdin.close()
            except BrokenPipeError:
                pass
        self._reader.join()
        self._proc.wait()


class _Plain:
    def __init__(self, out: BinaryIO):
        self.write = out.write

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


# --- the public face -----------------------------------------------------------------


def compressor(method: str, out: BinaryIO, *, level: int | None = None, threads: int | None = None) -> Compressor:
    """A sink that compresses what is written to it into ``out``; ``close()`` finishes the stream.

    ``level`` defaults to gzip 6, xz 6, zstd 3. ``threads`` (gzip, zstd) defaults to
    the CPU count and never changes the output bytes.
    """
    if method not in METHODS:
        raise RackbootError(f"unknown compression {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return _Plain(out)
    level = DEFAULT_LEVELS[method] if level is None else level
    if method == "gzip":
        return ParallelGzip(out, level, threads)
    if method == "xz":
        return _Xz(out, level)
    return _Zstd(out, level, threads)


def write_compressed(
    method: str,
    produce: Callable[[Compressor], None],
    out: BinaryIO,
    *,
    level: int | None = None,
    threads: int | None = None,
) -> None:
    """Run ``produce(sink)`` and compress everything it writes into ``out``."""
    sink = compressor(method, out, level=level, threads=threads)
    try:
        produce(sink)
    except BaseException:
        sink.abort()  # stop worker threads and processes; the caller discards ``out``
        raise
    sink.close()


Source = BinaryIO | Iterable[bytes]


def compress_stream(
    method: str,
    src: Source,
    out: BinaryIO,
    *,
    chunk_size: int = 1 << 20,
    level: int | None = None,
    threads: int | None = None,
) -> None:
    """Compress a readable file object or an iterable of byte strings into ``out``."""

    def produce(sink: Compressor) -> None:
        if hasattr(src, "read"):
            while chunk := src.read(chunk_size):
                sink.write(chunk)
        else:
            for chunk in src:
                sink.write(chunk)

    write_compressed(method, produce, out, level=level, threads=threads)


def compress_bytes(method: str, data: bytes, *, level: int | None = None, threads: int | None = None) -> bytes:
    """Convenience for small inputs and tests."""
    out = io.BytesIO()
    compress_stream(method, [data], out, level=level, threads=threads)
    return out.getvalue()
