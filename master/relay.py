"""A rack master's reports: taken from its workers, kept in a spool on disk, forwarded to
the region in the order they came.

A report is checked where it enters (as the region checks it: its size, its JSON, its node
id, the form of its signature header) and written to ``spool/<n>.report`` (the signature
header's value on the first line, the worker's address on the second, then the body exactly
as it came, since the node's signature is over those bytes) before the worker is answered. A forwarder thread posts
the spool to the region's POST /report, oldest first, with the same body and signature
header, X-Rackboot-Rack naming this rack and X-Rackboot-Worker the worker's address on
the rack's network (the region shows it as the node's IP); the region checks the node's signature as
for any report. A report the region answers with 2xx or 4xx (taken, a replay, refused:
its answer is final, and the region keeps refused ones in its history) leaves the spool;
an unreachable region or a 5xx stops the round, and the next round (every RETRY seconds,
or at the next report) starts again with the same report. The spool holds at most
MAX_SPOOL reports: past that a worker is answered 503 and keeps its report for its next boot.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .nodekeys import SIGNATURE_HEADER

RACK_HEADER = "X-Rackboot-Rack"
WORKER_HEADER = "X-Rackboot-Worker"
MAX_SPOOL = 1000  # reports kept while the region is away (each at most serve.MAX_REPORT bytes)
RETRY = 5.0  # seconds between rounds while reports wait
TIMEOUT = 15.0  # seconds one forward may take
_SPOOLED_RE = re.compile(r"([0-9]{12})\.report")


class Relay:
    def __init__(
        self,
        spool: Path,
        upstream: str,
        rack: str,
        *,
        log: Callable[[str], None] = lambda _line: None,
        limit: int = MAX_SPOOL,
        retry: float = RETRY,
    ):
        self.spool = Path(spool)
        split = urlsplit(upstream)
        self.host, self.port = split.hostname or "", split.port or 80
        self.rack = rack
        self.log = log
        self.limit = limit
        self.retry = retry
        self._lock = threading.Lock()  # one writer of the spool's numbers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._away = False  # the region did not answer the last round: said once until it does
        self.spool.mkdir(parents=True, exist_ok=True)
        for leftover in self.spool.glob(".*.tmp-*"):  # a write a crash cut short: never answered 204
            leftover.unlink()
        waiting = self.waiting()
        self._count = len(waiting)  # kept here, not listed per report: a storm's spool holds thousands
        self._next = int(waiting[-1].name[:12]) + 1 if waiting else 1

    def waiting(self) -> list[Path]:
        return sorted(p for p in self.spool.iterdir() if _SPOOLED_RE.fullmatch(p.name))

    def take(self, body: bytes, signature: str | None, worker: str = "") -> bool:
        """Spool one checked report (``signature``: the header's value as it came, ``worker``:
        the worker's address); False when full."""
        with self._lock:
            if self._count >= self.limit:
                return False
            n, self._next = self._next, self._next + 1
            # renamed into place whole, not fsynced: like the region's inventory (SQLite WAL,
            # synchronous=NORMAL), a power cut may lose the last reports, a crash none
            path = self.spool / f"{n:012d}.report"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes((signature or "").encode() + b"\n" + worker.encode() + b"\n" + body)
            os.replace(tmp, path)
            self._count += 1
        self._wake.set()
        return True

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self._run, name="rackboot-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.flush()
            self._wake.wait(self.retry if self._count else None)

    def flush(self) -> int:
        """Forward what waits, oldest first, until done or the region does not take it; returns
        how many left the spool."""
        sent = 0
        with self._lock:  # counted afresh each round: a file gone by other hands is not waited for
            waiting = self.waiting()
            self._count = len(waiting)
        for path in waiting:
            if self._stop.is_set():
                break
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            signature, _, rest = raw.partition(b"\n")
            worker, _, body = rest.partition(b"\n")
            status, answer = self._post(body, signature.decode("ascii", "replace"), worker.decode("ascii", "replace"))
            if status is None or status >= 500:
                if not self._away:
                    self._away = True
                    self.log(
                        f"relay: region {self.host}:{self.port} did not take reports ({answer}); "
                        f"{self._count} kept in {self.spool}, forwarded when it answers"
                    )
                break
            if self._away:
                self._away = False
                self.log(f"relay: region {self.host}:{self.port} answers again; forwarding the spool")
            if status >= 400:
                self.log(f"relay: region refused a spooled report ({path.name}): {status} {answer}")
            os.unlink(path)
            with self._lock:
                self._count -= 1
            sent += 1
        return sent

    def _post(self, body: bytes, signature: str, worker: str) -> tuple[int | None, str]:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), RACK_HEADER: self.rack}
        if signature:
            headers[SIGNATURE_HEADER] = signature
        if worker:
            headers[WORKER_HEADER] = worker
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request("POST", "/report", body=body, headers=headers)
            response = conn.getresponse()
            text = response.read(500).decode("utf-8", "replace").strip()
            return response.status, text
        except (OSError, http.client.HTTPException) as e:
            return None, f"{type(e).__name__}: {e}"
        finally:
            conn.close()
