"""Best-effort reports to the master: a report that cannot be sent never fails an update."""

from __future__ import annotations

import time

from . import formats
from .fetch import MasterClient
from .formats import MAX_REPORT_OUTPUT, HookName, Phase, Report, escape_controls


def send(master: MasterClient | None, report: Report, *, timeout: float | None = None) -> bool:
    """POST /report once with a short timeout (the master's report_timeout); True on 2xx."""
    if master is None:
        return False
    try:
        return 200 <= master.post("/report", formats.dump(report), timeout=timeout) < 300
    except Exception:  # best effort by design: the update goes on whatever went wrong here
        return False


def make(
    node: str,
    phase: Phase,
    *,
    bytes: int = 0,
    seconds: float = 0.0,
    error: str | None = None,
    slot: str | None = None,
    version: int | None = None,
    output: str | None = None,
    hostname: str | None = None,
    hook: HookName | None = None,
    card_bytes: int | None = None,
    delta: str | None = None,
) -> Report:
    return Report(
        node=node,
        phase=phase,
        bytes=bytes,
        seconds=round(seconds, 3),
        error=_line(error),
        slot=slot,
        version=version,
        time=round(time.time(), 3),
        output=None if output is None else _tail(output),
        hostname=hostname,
        hook=hook,
        card_bytes=card_bytes,
        delta=_line(delta),
    )


def _tail(output: str) -> str:
    """A hook's output as a report carries it: its tail, control characters but tabs and newlines written out."""
    return escape_controls(output[-MAX_REPORT_OUTPUT:], lines=True)[-MAX_REPORT_OUTPUT:]


def _line(text: str | None) -> str | None:
    """One line of at most 1000 characters, control characters written out (the master
    refuses a report with any: a hook's or a master's text may hold ESC or CR)."""
    return None if text is None else escape_controls(" ".join(text.split()))[:1000]
