"""Node keys on the master: which reports a node really sent.

Each worker signs its reports with a key of its own (the updater's nodekey.py): the report
names the key's public half (``pubkey``) and ``X-Rackboot-Signature`` carries the base64 of
its Ed25519 signature over the exact body, which names the node. Adoption pins a node's key
in the inventory (``[master] adopt = "auto"``: the first key it presents, trust on first
use; ``"manual"``: the one `rackboot adopt` showed the fingerprint of); from then on a
report of that node counts only when it verifies against that key. ``judge`` decides, pure
but for the ``verify`` it is given.

Verification is Debian's openssl, run as a process (as master/signing.py signs): a few
milliseconds each. A report storm must not fork a process per report at once, so at most
``MAX_PROCESSES`` run together and the others queue (``BUSY_WAIT`` s at most, then 503);
signatures that verified are remembered (``CACHE`` of them), so a replay costs no process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import subprocess
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rackboot.initramfs.updater import nodekey
from rackboot.initramfs.updater.formats import Report
from rackboot.initramfs.updater.report import SIGNATURE_HEADER

__all__ = ["SIGNATURE_HEADER", "Auth", "Busy", "Unavailable", "Verifier", "fingerprint", "judge", "parse_signature"]

MAX_PROCESSES = max(2, os.cpu_count() or 1)
BUSY_WAIT = 20.0  # seconds a report waits for an openssl slot before the master answers 503
CACHE = 4096  # verified signatures remembered
OPENSSL_TIMEOUT = 30


class Busy(Exception):
    """Every openssl slot stayed taken for BUSY_WAIT seconds: come back later (503)."""


class Unavailable(Exception):
    """openssl cannot run on the master: no signature can be checked (503, one line)."""


def fingerprint(pubkey: str | None) -> str:
    """'ed25519 SHA256:...' of a base64 key as reports carry it; '-' for none."""
    if not pubkey:
        return "-"
    try:
        return "ed25519 " + nodekey.fingerprint(base64.b64decode(pubkey, validate=True))
    except (binascii.Error, ValueError):
        return "(not a key)"


def parse_signature(header: str | None) -> bytes | None:
    """X-Rackboot-Signature -> the 64 signature bytes, None when absent; ValueError naming
    the header when it is anything else."""
    if header is None:
        return None
    try:
        raw = base64.b64decode(header.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raw = b""
    if len(raw) != nodekey.SIGNATURE_BYTES:
        raise ValueError(f"report: {SIGNATURE_HEADER}: not the base64 of a {nodekey.SIGNATURE_BYTES}-byte signature")
    return raw


class Verifier:
    """Checks Ed25519 signatures with openssl, ``processes`` at a time, remembering the good ones."""

    def __init__(self, openssl: str = "openssl", processes: int = MAX_PROCESSES, busy_wait: float = BUSY_WAIT):
        self.openssl = openssl
        self.slots = threading.BoundedSemaphore(processes)
        self.busy_wait = busy_wait
        self.lock = threading.Lock()
        self.good: OrderedDict[bytes, None] = OrderedDict()
        self.runs = 0  # openssl processes started, and the most at once (for tests and the benchmark)
        self.running = 0
        self.peak = 0

    def __call__(self, pubkey: str, body: bytes, signature: bytes) -> bool:
        """True when ``signature`` is ``pubkey``'s over ``body``; Busy, Unavailable."""
        memo = hashlib.sha256(b"\0".join((pubkey.encode(), signature, body))).digest()
        with self.lock:
            if memo in self.good:
                self.good.move_to_end(memo)
                return True
        raw = nodekey.key_from_b64(pubkey, "pubkey")  # reports are parsed first: it is one
        if not self.slots.acquire(timeout=self.busy_wait):
            raise Busy(f"busy: reports wait for their signatures to be checked; retry in {self.busy_wait:g} s")
        try:
            ok = self._openssl(raw, body, signature)
        finally:
            self.slots.release()
        if ok:
            with self.lock:
                self.good[memo] = None
                while len(self.good) > CACHE:
                    self.good.popitem(last=False)
        return ok

    def _openssl(self, public: bytes, body: bytes, signature: bytes) -> bool:
        with tempfile.TemporaryDirectory(prefix="rackboot-report-") as tmp:
            paths = [os.path.join(tmp, name) for name in ("key.der", "body", "sig")]
            for path, data in zip(paths, (nodekey.PUBLIC_DER + public, body, signature), strict=True):
                with open(path, "wb") as f:
                    f.write(data)
            key, doc, sig = paths
            argv = [self.openssl, "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", key]
            with self.lock:
                self.runs += 1
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                done = subprocess.run(
                    [*argv, "-rawin", "-in", doc, "-sigfile", sig], capture_output=True, timeout=OPENSSL_TIMEOUT
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Unavailable(f"cannot run {self.openssl} to check a report's signature: {e}") from None
            finally:
                with self.lock:
                    self.running -= 1
        if done.returncode != 0 and b"Signature Verification Failure" not in done.stdout:  # not an answer
            said = (done.stdout + done.stderr).decode("utf-8", "replace").strip().splitlines()
            raise Unavailable(f"{self.openssl} pkeyutl -verify: {said[0][:200] if said else 'no message'}")
        return done.returncode == 0


Verify = Callable[[str, bytes, bytes], bool]


@dataclass(frozen=True)
class Auth:
    """What a report's key and signature make of it."""

    signed: bool = False  # verified against the node's pinned key (or the key pinned with it)
    refused: str | None = None  # why it is kept in the history only, never counted
    pin: str | None = None  # a key to pin now (trust on first use)
    candidate: str | None = None  # a key the node presented and proved, not pinned: for `rackboot adopt`


def judge(
    report: Report, body: bytes, signature: bytes | None, pinned: str | None, *, may_pin: bool, verify: Verify
) -> Auth:
    """A report's standing. ``pinned``: the node's pinned key; ``may_pin``: a key it presents
    may be pinned now (automatic adoption), else it is kept as a candidate. A key the report
    presents counts only when the report is signed by it (it holds the private half)."""
    node, presented = report.node, report.pubkey
    if pinned is not None:
        if signature is None:
            return Auth(refused=f"unsigned report for {node}, whose key {fingerprint(pinned)} is pinned")
        if verify(pinned, body, signature):
            return Auth(signed=True)
        if presented is not None and presented != pinned and verify(presented, body, signature):
            return Auth(
                refused=f"key mismatch: {node} presents {fingerprint(presented)}, its pinned key is "
                f"{fingerprint(pinned)}; re-adopt with rackboot adopt --replace {node}",
                candidate=presented,
            )
        return Auth(refused=f"signature does not verify with {node}'s pinned key {fingerprint(pinned)}")
    if presented is None:
        if signature is not None:
            return Auth(refused=f"signed report for {node} without the key to check it (pubkey)")
        return Auth()  # an older updater's: taken while the node has no key pinned
    if signature is None:
        return Auth(refused=f"report for {node} presents {fingerprint(presented)} but is not signed")
    if not verify(presented, body, signature):
        return Auth(refused=f"signature does not verify with the key {fingerprint(presented)} the report presents")
    if may_pin:
        return Auth(signed=True, pin=presented)
    return Auth(candidate=presented)
