"""Write an image stream into a slot: fetch, inflate, hash and write, overlapped.

Three stages joined by bounded queues, like `curl | gzip -d | dd`: a reader thread
pulls the compressed stream (and hashes it), the calling thread inflates, a writer
thread hashes the plain bytes and pwrites them at the slot's offset, fdatasyncing
every `sync_every` bytes so the final sync never stalls. Memory stays bounded by the
queue depths times the chunk size. Nothing here touches the slot state: the caller
commits only after `verify` accepts what was written.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .disk import Disk
from .errors import UpdaterError
from .formats import Manifest

CHUNK = 1 << 20  # inflate output per step
DEPTH = 4  # chunks in flight per queue: 2 x 4 x 1 MiB at most (more buys no speed)
SYNC_EVERY = 32 << 20
_DONE = object()


@dataclass(frozen=True)
class Written:
    size: int  # uncompressed bytes written
    sha256: str
    crc32: str
    stream_size: int
    stream_sha256: str


def verify(written: Written, manifest: Manifest) -> None:
    """The bytes written are the manifest's image, or UpdaterError naming what differs."""
    checks = (
        ("size", written.size, manifest.size),
        ("sha256", written.sha256, manifest.sha256),
        ("crc32", written.crc32, manifest.crc32),
        ("stream_sha256", written.stream_sha256, manifest.stream_sha256),
    )
    for name, got, want in checks:
        if got != want:
            raise UpdaterError(
                f"verify {manifest.image} v{manifest.version}: {name} is {got}, the manifest says {want}"
            )


def write_stream(
    chunks: Iterable[bytes],
    disk: Disk,
    offset: int,
    capacity: int,
    manifest: Manifest,
    *,
    sync_every: int = SYNC_EVERY,
    chunk: int = CHUNK,
) -> Written:
    """Inflate `chunks` (the compressed stream) into disk[offset:offset+capacity]."""
    limit = min(manifest.size, capacity)
    what = f"image {manifest.image} v{manifest.version}"
    total = 0
    inflate = _Inflater(manifest.compression)
    sink = _Sink(disk, offset, sync_every)
    source = _Hashed(chunks)
    reader = _Reader(source)
    writer = _Writer(sink.write)
    try:
        for data in reader.items():
            for out in inflate.feed(data, chunk):
                total += len(out)
                if total > limit:
                    raise UpdaterError(
                        f"{what}: stream inflates to more than {limit} bytes "
                        f"({_why_limit(manifest, capacity)}): oversized"
                    )
                writer.put(out)
        if not inflate.finished() or total < manifest.size:
            raise UpdaterError(
                f"{what}: stream ended after {total} of {manifest.size} bytes ({manifest.compression}): truncated"
            )
    finally:
        reader.stop()
        writer.close()  # joins; re-raises a write error unless another error is on its way
    sink.finish()
    return Written(total, sink.sha256.hexdigest(), f"{sink.crc32:08x}", source.size, source.sha256.hexdigest())


def read_back(
    disk: Disk, offset: int, size: int, *, chunk: int = CHUNK, progress: Callable[[], None] = lambda: None
) -> tuple[str, str]:
    """sha256 and CRC32 of the slot's first ``size`` bytes as the medium now returns them
    (cards that ack writes they lost are why: bmaptool issue 56); ``progress`` hears of
    each chunk."""
    disk.drop_cache(offset, size)
    # a reader thread keeps the medium busy while this one hashes
    reader = _Reader(disk.read(offset + at, min(chunk, size - at)) for at in range(0, size, chunk))
    sha256, crc32 = hashlib.sha256(), 0
    try:
        for data in reader.items():
            progress()
            sha256.update(data)
            crc32 = zlib.crc32(data, crc32)
    finally:
        reader.stop()
    return sha256.hexdigest(), f"{crc32:08x}"


def _why_limit(manifest: Manifest, capacity: int) -> str:
    return "the manifest's size" if manifest.size <= capacity else f"the slot's {capacity} bytes"


class _Hashed:
    """The compressed stream, hashed as it passes (in the reader thread that iterates it)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks = chunks
        self.sha256 = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for data in self.chunks:
            self.sha256.update(data)
            self.size += len(data)
            yield data


class _Inflater:
    """gzip (possibly several members, as pigz writes) or plain bytes, in bounded steps."""

    def __init__(self, compression: str):
        self.plain = compression == "none"
        self.z = None if self.plain else zlib.decompressobj(31)
        self.ended = self.plain

    def feed(self, data: bytes, chunk: int) -> Iterator[bytes]:
        if self.z is None:  # plain
            yield data
            return
        while data:
            if self.z.eof:
                if data[:2] != b"\x1f\x8b":
                    raise UpdaterError(f"image stream: {len(data)} bytes of garbage after the gzip data")
                self.z = zlib.decompressobj(31)
            try:
                out = self.z.decompress(data, chunk)
                while out:
                    yield out
                    out = self.z.decompress(self.z.unconsumed_tail, chunk) if self.z.unconsumed_tail else b""
            except zlib.error as e:
                raise UpdaterError(f"image stream: not valid gzip: {e}") from None
            data = self.z.unused_data if self.z.eof else b""

    def finished(self) -> bool:
        return self.z is None or self.z.eof


class _Sink:
    """The writer stage's work: hash the plain bytes and pwrite them in order."""

    def __init__(self, disk: Disk, offset: int, sync_every: int):
        self.disk = disk
        self.offset = offset
        self.sync_every = sync_every
        self.unsynced = 0
        self.sha256 = hashlib.sha256()
        self.crc32 = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.disk.write(self.offset, data)
        self.offset += len(data)
        self.unsynced += len(data)
        if self.unsynced >= self.sync_every:
            self._sync()

    def finish(self) -> None:
        self._sync()

    def _sync(self) -> None:
        self.disk.datasync()
        self.unsynced = 0


class _Reader:
    """A thread that drains `chunks` into a bounded queue; its errors re-raise in items()."""

    def __init__(self, chunks: Iterable[bytes]):
        self.q: queue.Queue = queue.Queue(DEPTH)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(chunks,), daemon=True)
        self.thread.start()

    def _run(self, chunks: Iterable[bytes]) -> None:
        try:
            for data in chunks:
                if not self._put(data):
                    return  # stopped: leaving the loop closes the stream's connection
        except BaseException as e:
            self.error = e
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        while not self.stopping.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def items(self) -> Iterator[bytes]:
        while (item := self.q.get()) is not _DONE:
            yield item
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Give up: the thread ends at its next put (or when its read times out)."""
        self.stopping.set()


class _Writer:
    """A thread that applies `write` to each queued chunk in order; errors re-raise in put/close."""

    def __init__(self, write: Callable[[bytes], None]):
        self.q: queue.Queue = queue.Queue(DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(write,), daemon=True)
        self.thread.start()

    def _run(self, write: Callable[[bytes], None]) -> None:
        while (item := self.q.get()) is not _DONE:
            if self.error is None:  # after a failure, keep draining so put() never blocks
                try:
                    write(item)
                except BaseException as e:
                    self.error = e

    def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        """No more chunks: wait for the last write and re-raise a failure."""
        self.q.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
