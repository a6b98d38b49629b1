"""The board's hardware watchdog, fed only while the update makes progress.

Opening /dev/watchdog arms it. A thread feeds it every third of its timeout for as long
as the update has shown progress (a chunk streamed, written or read back; a hook
started) within ``stall`` seconds. An updater stuck on a dying card or a wedged read
makes no progress, the feeding stops and the board resets; the next boot starts again
from the committed slot state. A clean exit disarms it with the magic close ('V'); a
crashed updater leaves it armed, which resets the board too.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator

DEVICE = "/dev/watchdog"
TIMEOUT = 15  # seconds the hardware waits for a feed; the driver may round it
WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
WDIOC_GETTIMEOUT = 0x80045707  # _IOR('W', 7, int)


class Watchdog:
    def __init__(
        self,
        path: str = DEVICE,
        *,
        stall: float,
        timeout: int = TIMEOUT,
        now: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = lambda m: None,
    ):
        self.path = path
        self.stall = stall
        self.timeout = timeout
        self.now = now
        self.log = log
        self.fd: int | None = None
        self.deadline = 0.0
        self.starved = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> bool:
        return self.fd is not None

    def start(self) -> Watchdog:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # hooks must not inherit it
        except OSError as e:
            self.log(f"watchdog: {self.path}: {e.strerror}; updating without one")
            return self
        self.timeout = _set_timeout(self.fd, self.timeout)
        self.progress()
        self._thread = threading.Thread(target=self._feed, args=(self.fd,), name="watchdog", daemon=True)
        self._thread.start()
        self.log(
            f"watchdog: {self.path} armed ({self.timeout} s); fed while the update moves (stall limit {self.stall:g} s)"
        )
        return self

    def progress(self, allow: float | None = None) -> None:
        """The update moved; the next sign of life is due within ``allow`` (default: stall) s."""
        self.deadline = self.now() + (self.stall if allow is None else allow)

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks``, each counted as progress."""
        for chunk in chunks:
            self.progress()
            yield chunk

    def _feed(self, fd: int) -> None:
        while not self._stop.wait(max(self.timeout / 3, 0.2)):
            if self.now() < self.deadline:
                os.write(fd, b"\0")
            elif not self.starved:
                self.starved = True
                self.log(
                    f"watchdog: no progress for {self.stall:g} s; no longer feeding it, "
                    f"the board resets within {self.timeout} s"
                )

    def stop(self) -> None:
        """Stop feeding and disarm: the updater is done, /init takes over."""
        if self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:  # always, once armed
            self._thread.join()
        try:
            os.write(self.fd, b"V")  # magic close: the driver stops the timer on close
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _set_timeout(fd: int, seconds: int) -> int:
    """Ask the driver for ``seconds``; the timeout it runs with (``seconds`` if it cannot say)."""
    for request, value in ((WDIOC_SETTIMEOUT, seconds), (WDIOC_GETTIMEOUT, 0)):
        try:
            return struct.unpack("i", fcntl.ioctl(fd, request, struct.pack("i", value)))[0]
        except OSError:
            continue
    return seconds


class NoWatchdog(Watchdog):
    """The board has none, or the card's config turned it off: progress goes nowhere."""

    def __init__(self):
        super().__init__("", stall=0)

    def start(self) -> Watchdog:
        return self
