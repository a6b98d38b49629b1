"""Best-effort reports to the master: a report that cannot be sent never fails an update."""

from __future__ import annotations

import time

from . import formats
from .fetch import MasterClient
from .formats import MAX_REPORT_OUTPUT, HookName, Phase, Report


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
        error=None if error is None else " ".join(error.split())[:1000],
        slot=slot,
        version=version,
        time=round(time.time(), 3),
        output=None if output is None else output[-MAX_REPORT_OUTPUT:],
        hostname=hostname,
        hook=hook,
        card_bytes=card_bytes,
        delta=None if delta is None else " ".join(delta.split())[:1000],
    )
