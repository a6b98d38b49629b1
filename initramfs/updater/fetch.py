"""Talking to the master over plain HTTP (http.client): documents, image streams, reports.

Every request has a connect and a read timeout; transient failures (refused, reset,
timeout, 5xx) are retried a bounded number of times with exponential backoff, then
become one UpdaterError. A 4xx is an answer, not a failure, and is never retried.
An image stream resumes after a dropped connection with `Range: bytes=N-`; a 206
must say it starts at N; a server that ignores the range (200) is read from 0 and
the part already delivered is skipped, so the consumer sees one continuous stream.

A master at its cap of image streams answers a stream 503 with Retry-After: that is an
answer, not a failure. The client waits that long plus up to JITTER of it (a rack refused
together comes back spread out), calling ``on_wait`` first so the watchdog knows the update
still moves, and asks again; the waits of one stream together are bounded by busy_limit,
past which the stream fails like any other (the updater falls back, the next boot retries).
"""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

from .errors import UpdaterError
from .formats import MAX_DOCUMENT

T = TypeVar("T")
CHUNK = 1 << 20
USER_AGENT = "rackboot-updater/1"
_TRANSIENT = (OSError, http.client.HTTPException)
# Seconds one stream may spend waiting on a busy master, all its waits together. Long enough
# for a big rack to pass a small cap (48 workers, 8 streams, a 2 GiB image at ~15 MB/s each:
# 6 rounds of ~2.5 min), short enough that a master stuck saying busy ends in a fallback boot
# within a quarter of an hour, not never.
BUSY_LIMIT = 900.0
MAX_RETRY_AFTER = 60  # a longer Retry-After is read as this: the client looks again within a minute
JITTER = 0.5  # each wait is Retry-After times 1 to 1 + JITTER
MAX_DIGITS = 18  # a byte count or a delay; a longer number is no answer (and int() refuses past 4300 digits)


class NotFound(UpdaterError):
    """The master has no such document (404)."""


class Unreachable(UpdaterError):
    """Every attempt failed to reach the master or to hear from it in time: refused, reset,
    timed out (not an answer, however wrong)."""


class NoRange(UpdaterError):
    """The master does not serve byte ranges of a file (block deltas need them)."""


class _Retry(Exception):
    """A transient failure worth another attempt (carries the one-line reason)."""


class _Busy(Exception):
    """The master is at its cap of streams: ask again after ``seconds``."""

    def __init__(self, seconds: int):
        super().__init__(f"busy, retry after {seconds} s")
        self.seconds = seconds


def wire_int(value: str | None) -> int | None:
    """A number read off the wire: ASCII digits alone, at most MAX_DIGITS; None for anything
    else. (str.isdigit takes '²', which int() refuses; int() takes '١٢', ' 7', '+7' and '7_0'.)"""
    if not value or len(value) > MAX_DIGITS or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def retry_after(value: str | None) -> int | None:
    """A Retry-After header's delay in whole seconds, 1 to MAX_RETRY_AFTER; None when it is
    missing or an HTTP date (a worker without a real-time clock cannot read one)."""
    seconds = wire_int((value or "").strip(" \t"))
    return None if seconds is None else min(max(seconds, 1), MAX_RETRY_AFTER)


def jittered(seconds: float, rng: random.Random) -> float:
    """``seconds`` stretched by a random 0 to JITTER of itself."""
    return seconds * (1 + rng.uniform(0, JITTER))


class MasterClient:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        retries: int = 3,
        backoff: float = 0.5,
        report_timeout: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        busy_limit: float = BUSY_LIMIT,
        rng: random.Random | None = None,
    ):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UpdaterError(f"master: {url!r} is not an http://host[:port] URL")
        try:
            self.port = parts.port or 80
        except ValueError:
            raise UpdaterError(f"master: {url!r} has a bad port") from None
        self.url = url
        self.host = parts.hostname
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self.report_timeout = report_timeout
        self.sleep = sleep
        self.busy_limit = busy_limit
        self.rng = rng or random.Random()
        self.stream_bytes = 0  # image bytes received, resumed and restarted parts included
        self.range_requests = 0
        self.busy_waits = 0  # times a busy master told a stream to come back
        self.busy_seconds = 0.0  # seconds spent waiting for it

    # --- plumbing ---------------------------------------------------------------------

    def _open(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict | None = None,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(timeout or self.read_timeout)
            conn.request(method, self.prefix + path, body=body, headers={"User-Agent": USER_AGENT, **(headers or {})})
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _attempts(self, what: str, attempt: Callable[[], T]) -> T:
        """Run `attempt` until it succeeds, retrying _Retry and transient errors with backoff."""
        delay = self.backoff
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Retry as e:
                reason, error = str(e), UpdaterError
            except _TRANSIENT as e:
                reason, error = describe(e), Unreachable
            if n < self.retries:
                self.sleep(delay)
                delay *= 2
        raise error(f"master {self.url}: {what}: {reason} (after {self.retries + 1} attempts)")

    # --- documents --------------------------------------------------------------------

    def get(self, path: str, *, headers: dict | None = None) -> bytes:
        """The body of a small document; 404 and other 4xx fail at once."""

        def attempt() -> bytes:
            conn, resp = self._open("GET", path, headers=headers)
            try:
                _check_status(self.url, path, resp, (200,))
                body = resp.read(MAX_DOCUMENT + 1)
                if len(body) > MAX_DOCUMENT:
                    raise UpdaterError(f"master: GET {path}: document larger than {MAX_DOCUMENT} bytes")
                length = _content_length(resp)
                if length is not None and length != len(body):
                    raise _Retry(f"short body ({len(body)} of {length} bytes)")
                return body
            finally:
                conn.close()

        return self._attempts(f"GET {path}", attempt)

    def get_doc(self, path: str, parse: Callable[[bytes], T], *, headers: dict | None = None) -> T:
        return parse(self.get(path, headers=headers))

    def verified(self, what: str, take: Callable[[MasterClient], T]) -> T:
        """``take(self)``: one source has nothing to fall back on (sources.py's has)."""
        return take(self)

    # --- image streams ----------------------------------------------------------------

    def stream(
        self, path: str, size: int, *, chunk: int = CHUNK, on_wait: Callable[[float], None] | None = None
    ) -> Iterator[bytes]:
        """The `size` bytes of `path` in order, resuming after drops; more is an error.
        ``on_wait(seconds)`` hears of each wait a busy master asks for, before it starts."""
        offset = 0
        failures = 0
        delay = self.backoff
        waited = 0.0
        while offset < size:
            before = offset
            try:
                for piece in self._stream_once(path, offset, size, chunk):
                    offset += len(piece)
                    yield piece
                if offset < size:
                    raise _Retry(f"connection closed at byte {offset} of {size}")
            except _Busy as e:
                waited = self._wait_busy(path, e.seconds, waited, on_wait)
            except (_Retry, *_TRANSIENT) as e:
                reason = str(e) if isinstance(e, _Retry) else describe(e)
                if offset > before:  # the budget is for attempts in a row that get nowhere
                    failures, delay = 0, self.backoff
                failures += 1
                if failures > self.retries:
                    error = UpdaterError if isinstance(e, _Retry) else Unreachable
                    raise error(f"master {self.url}: GET {path}: {reason} (after {failures} attempts)") from None
                self.sleep(delay)
                delay *= 2

    def _stream_once(self, path: str, offset: int, size: int, chunk: int) -> Iterator[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if offset:
            self.range_requests += 1
        conn, resp = self._open("GET", path, headers=headers)
        try:
            if resp.status == 503 and (seconds := retry_after(resp.getheader("Retry-After"))) is not None:
                raise _Busy(seconds)
            _check_status(self.url, path, resp, (200, 206))
            skip = 0
            if resp.status == 206:
                first, _, length = _content_range(resp.getheader("Content-Range", ""))
                if first != offset:
                    raise _Retry(f"206 starts at byte {first}, asked for {offset}")
            else:
                skip = offset  # the server ignored Range: read from 0, drop what we have
                length = _content_length(resp)
            if length is not None and length != size:
                raise UpdaterError(f"master: GET {path}: {length} bytes on the master, the manifest says {size}")
            while True:
                piece = resp.read(chunk)
                if not piece:
                    return
                self.stream_bytes += len(piece)
                if skip:
                    drop = min(skip, len(piece))
                    skip -= drop
                    piece = piece[drop:]
                    if not piece:
                        continue
                if offset + len(piece) > size:
                    raise UpdaterError(
                        f"master: GET {path}: stream is longer than the manifest's {size} bytes (oversized)"
                    )
                offset += len(piece)
                yield piece
        finally:
            conn.close()

    def get_range(self, path: str, start: int, end: int, *, on_wait: Callable[[float], None] | None = None) -> bytes:
        """Bytes ``start``..``end`` (exclusive) of ``path`` by one Range request, retried like a
        document; a server that answers anything but that 206 raises NoRange (no partial reads).
        A busy master's 503 is waited out as for a stream (``on_wait`` hears of each wait)."""

        def attempt() -> bytes:
            conn, resp = self._open("GET", path, headers={"Range": f"bytes={start}-{end - 1}"})
            try:
                self._check_partial(path, resp, "a Range request")
                first, _, _ = _content_range(resp.getheader("Content-Range", ""))
                if first != start:
                    raise _Retry(f"206 starts at byte {first}, asked for {start}")
                body = resp.read(end - start + 1)
                self.stream_bytes += len(body)
                if len(body) != end - start:
                    raise _Retry(f"{len(body)} bytes for a range of {end - start}")
                return body
            finally:
                conn.close()

        return self._patiently(path, f"GET {path} bytes {start}-{end - 1}", attempt, on_wait)

    def get_ranges(
        self, path: str, spans: list[tuple[int, int]], *, on_wait: Callable[[float], None] | None = None
    ) -> list[bytes]:
        """Bytes ``start``..``end`` (exclusive) of ``path`` for each of ``spans`` (ascending, apart)
        by one multi-range request: a 206 multipart/byteranges answer, or one part that covers
        them all (a server may merge ranges). Anything else raises NoRange (its body unread),
        so a server without multi-range support is asked one range at a time instead."""
        if len(spans) == 1:
            return [self.get_range(path, *spans[0], on_wait=on_wait)]
        header = "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in spans)
        # the parts' own headers cost ~100 bytes each; a server that sends much more is not answering this
        most = spans[-1][1] - spans[0][0] + 256 * len(spans) + 4096

        def attempt() -> list[bytes]:
            conn, resp = self._open("GET", path, headers={"Range": header})
            try:
                self._check_partial(path, resp, "a multi-range request")
                length = _header_int(resp, "Content-Length")
                if length is None or length > most:
                    shown = str(resp.getheader("Content-Length"))[:20]
                    raise NoRange(f"master {self.url}: GET {path}: a multi-range answer of {shown} bytes")
                body = resp.read(length)
                self.stream_bytes += len(body)
                if len(body) != length:
                    raise _Retry(f"{len(body)} of {length} bytes")
                ctype = resp.getheader("Content-Type", "")
                if ctype.startswith("multipart/byteranges"):
                    parts = _byteranges(body)
                else:
                    parts = [(_content_range(resp.getheader("Content-Range", ""))[0], body)]
                return [_cut(parts, start, end) for start, end in spans]
            finally:
                conn.close()

        return self._patiently(path, f"GET {path} {len(spans)} ranges from byte {spans[0][0]}", attempt, on_wait)

    def _check_partial(self, path: str, resp: http.client.HTTPResponse, asked: str) -> None:
        """A 206, or: _Busy for a busy master's 503, NoRange for any other answer to what was ``asked``."""
        if resp.status == 503 and (seconds := retry_after(resp.getheader("Retry-After"))) is not None:
            raise _Busy(seconds)
        _check_status(self.url, path, resp, (200, 206))
        if resp.status != 206:
            raise NoRange(f"master {self.url}: GET {path}: answered {resp.status} to {asked}")

    def _patiently(self, path: str, what: str, attempt: Callable[[], T], on_wait: Callable[[float], None] | None) -> T:
        """``_attempts``, with a busy master's Retry-After waited out (``on_wait`` hears of each wait)."""
        waited = 0.0
        while True:
            try:
                return self._attempts(what, attempt)
            except _Busy as e:
                waited = self._wait_busy(path, e.seconds, waited, on_wait)

    def _wait_busy(self, path: str, seconds: float, waited: float, on_wait: Callable[[float], None] | None) -> float:
        """Wait out a busy master's Retry-After ``seconds`` plus jitter; the seconds waited for
        ``path`` so far, or UpdaterError once that passes busy_limit."""
        wait = jittered(seconds, self.rng)
        if waited + wait > self.busy_limit:
            raise UpdaterError(
                f"master {self.url}: GET {path}: busy for {waited:.0f} s of waiting, "
                f"more than the {self.busy_limit:g} s a transfer waits"
            ) from None
        if on_wait:
            on_wait(wait)
        self.sleep(wait)
        self.busy_waits += 1
        self.busy_seconds += wait
        return waited + wait

    # --- reports ----------------------------------------------------------------------

    def post(
        self, path: str, body: bytes, *, timeout: float | None = None, headers: dict[str, str] | None = None
    ) -> int:
        """One attempt, short timeout; returns the HTTP status (raises on transport errors)."""
        conn, resp = self._open(
            "POST",
            path,
            body=body,
            timeout=timeout or self.report_timeout,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            resp.read(MAX_DOCUMENT)
            return resp.status
        finally:
            conn.close()


def _check_status(url: str, path: str, resp: http.client.HTTPResponse, ok: tuple[int, ...]) -> None:
    if resp.status in ok:
        return
    if resp.status >= 500:
        raise _Retry(f"HTTP {resp.status} {resp.reason}")
    if resp.status == 404:
        raise NotFound(f"master {url}: GET {path}: 404 not found")
    raise UpdaterError(f"master {url}: GET {path}: HTTP {resp.status} {resp.reason}")


def _byteranges(body: bytes) -> list[tuple[int, bytes]]:
    """A multipart/byteranges body -> [(first byte, its bytes)]. Each part's length comes from
    its Content-Range, never from searching for the boundary, which the data may contain."""
    parts, at = [], 0
    while True:
        head_end = body.find(b"\r\n\r\n", at)
        if head_end < 0:
            break
        head = body[at:head_end].decode("latin-1")
        span = next(
            (line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("content-range:")),
            None,
        )
        if span is None:
            raise _Retry("a multipart part without Content-Range")
        first, last, _ = _content_range(span)
        start = head_end + 4
        parts.append((first, body[start : start + last - first + 1]))
        at = start + last - first + 1
    return parts


def _cut(parts: list[tuple[int, bytes]], start: int, end: int) -> bytes:
    """Bytes start..end (exclusive) from the part that holds them all."""
    for first, data in parts:
        if first <= start and end <= first + len(data):
            return data[start - first : end - first]
    raise _Retry(f"no part of the answer holds bytes {start}-{end - 1}")


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    """The answer's Content-Length; None when it has none, a transient failure when it is not a number."""
    value = resp.getheader("Content-Length")
    length = _header_int(resp, "Content-Length")
    if value is not None and length is None:
        raise _Retry(f"a bad Content-Length {value[:20]!r}")
    return length


def _header_int(resp: http.client.HTTPResponse, name: str) -> int | None:
    """Header ``name`` as a number (spaces or tabs around it are allowed); None when missing or not one."""
    return wire_int((resp.getheader(name) or "").strip(" \t"))


def _content_range(value: str) -> tuple[int, int, int | None]:
    """'bytes N-M/T' -> (N, M, T or None for '*'); anything else is a transient failure."""
    unit, _, spec = value.partition(" ")
    span, _, size = spec.partition("/")
    start, _, end = span.partition("-")
    first, last, total = wire_int(start), wire_int(end), wire_int(size)
    if unit != "bytes" or first is None or last is None or last < first or (total is None and size != "*"):
        raise _Retry(f"206 with a bad Content-Range {value[:60]!r}")
    return first, last, total


def describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection dropped after {len(e.partial)} bytes"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return f"{type(e).__name__}: {e}"[:120]
