"""Best-effort reports to the master: a report that cannot be sent never fails an update.

With the node's key (nodekey.py), a report carries the key's public half (``pubkey``) and
goes with ``X-Rackboot-Signature``: the base64 of the key's Ed25519 signature over the
exact body, which names the node. A master that pinned the key takes nothing else for the
node; an older master ignores the header and the field.
"""

from __future__ import annotations

import base64
import time
from dataclasses import replace

from . import formats
from .errors import UpdaterError
from .fetch import MasterClient
from .formats import MAX_REPORT_OUTPUT, HookName, Phase, Report, SourceUse, escape_controls
from .nodekey import NodeKey
from .sources import Sources

SIGNATURE_HEADER = "X-Rackboot-Signature"


def signed(report: Report, key: NodeKey | None) -> tuple[bytes, dict[str, str]]:
    """The body to POST and its headers: with ``key``, the body names the key and the header
    carries its signature; without one (or when openssl cannot sign), the plain report."""
    if key is None or key.node != report.node:
        return formats.dump(report), {}
    body = formats.dump(replace(report, pubkey=key.public_b64))
    try:
        signature = key.sign(body)
    except UpdaterError:  # unsigned, as an older updater's: a master that pinned the key refuses it
        return formats.dump(report), {}
    return body, {SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii")}


def send(
    master: MasterClient | Sources | None,
    report: Report,
    *,
    timeout: float | None = None,
    key: NodeKey | None = None,
) -> bool:
    """POST /report once with a short timeout (the master's report_timeout), signed with
    ``key`` when there is one; True on 2xx. Several sources: to the first that can be reached."""
    if master is None:
        return False
    try:
        body, headers = signed(report, key)
        return 200 <= master.post("/report", body, timeout=timeout, headers=headers) < 300
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
    sources: tuple[SourceUse, ...] | None = None,
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
        sources=None if sources is None else tuple(replace(s, failed=_line(s.failed)) for s in sources),
    )


def _tail(output: str) -> str:
    """A hook's output as a report carries it: its tail, control characters but tabs and newlines written out."""
    return escape_controls(output[-MAX_REPORT_OUTPUT:], lines=True)[-MAX_REPORT_OUTPUT:]


def _line(text: str | None) -> str | None:
    """One line of at most 1000 characters, control characters written out (the master
    refuses a report with any: a hook's or a master's text may hold ESC or CR)."""
    return None if text is None else escape_controls(" ".join(text.split()))[:1000]
