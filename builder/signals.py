"""SIGTERM and SIGHUP end a rackboot command the way Ctrl-C does: as an exception in the
main thread, so every `finally` and context manager on the way out removes what the
command was writing (a publication's work directory, a build's stage, temporary
directories, a QEMU worker). Their default action ends the process on the spot and
leaves all of that behind."""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; callers that handle Ctrl-C handle this too."""


_terminating = threading.Event()


def _raise(signum: int, _frame: FrameType | None) -> None:
    if _terminating.is_set():
        return  # a second signal must not cut short the cleanup the first one started
    _terminating.set()
    raise Terminated(signal.Signals(signum).name)


def clean_up_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into Terminated; only the main thread can set handlers."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _raise)
