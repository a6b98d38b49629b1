"""Node keys on the master: which reports a node really sent.

Each worker signs its reports with a key of its own (the updater's nodekey.py): the report
names the key's public half (``pubkey``) and ``X-Rackboot-Signature`` carries the base64 of
its Ed25519 signature over the exact body, which names the node. Adoption pins a node's key
in the inventory (``[master] adopt = "auto"``: the first key it presents, trust on first
use; ``"manual"``: the one `rackboot adopt` showed the fingerprint of); from then on a
report of that node counts only when it verifies against that key. ``judge`` decides, pure
but for the ``verify`` it is given.

Verification runs in the master's own process (pyca/cryptography's Ed25519, OpenSSL's
code under it): a fraction of a millisecond a report, where starting Debian's openssl for each
took milliseconds of a core and capped a report storm at some 160 reports/s on two cores.
The updater, stdlib-only, still signs with openssl; Ed25519 is one algorithm whichever
code runs it, and tests/unit/test_nodekey.py checks both ways agree. ``Verifier(openssl=
PATH)`` checks with that binary as a process instead, at most ``MAX_PROCESSES`` at once
(the others queue ``BUSY_WAIT`` s at most, then 503). Signatures that verified are
remembered (``CACHE`` of them), so a replay costs no check.
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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rackboot.initramfs.updater import nodekey
from rackboot.initramfs.updater.formats import Report
from rackboot.initramfs.updater.report import SIGNATURE_HEADER

__all__ = ["SIGNATURE_HEADER", "Auth", "Busy", "Unavailable", "Verifier", "fingerprint", "judge", "parse_signature"]

MAX_PROCESSES = max(2, os.cpu_count() or 1)  # openssl processes at once, with Verifier(openssl=PATH)
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


def verify_in_process(public: bytes, body: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of the raw key ``public`` over ``body``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, body)
    except (InvalidSignature, ValueError):  # ValueError: bytes that are no key (no key signed anything)
        return False
    return True


class Verifier:
    """Checks Ed25519 signatures, remembering the good ones: in this process, or with
    ``openssl`` (a path) as a process, ``processes`` at a time."""

    def __init__(self, openssl: str | None = None, processes: int = MAX_PROCESSES, busy_wait: float = BUSY_WAIT):
        self.openssl = openssl
        self.slots = threading.BoundedSemaphore(processes)
        self.busy_wait = busy_wait
        self.lock = threading.Lock()
        self.good: OrderedDict[bytes, None] = OrderedDict()
        self.runs = 0  # signatures checked (not remembered), and the most openssl processes at once
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
        if self.openssl is None:
            with self.lock:
                self.runs += 1
            ok = verify_in_process(raw, body, signature)
        else:
            ok = self._in_a_slot(raw, body, signature, self.openssl)
        if ok:
            with self.lock:
                self.good[memo] = None
                while len(self.good) > CACHE:
                    self.good.popitem(last=False)
        return ok

    def _in_a_slot(self, raw: bytes, body: bytes, signature: bytes, openssl: str) -> bool:
        if not self.slots.acquire(timeout=self.busy_wait):
            raise Busy(f"busy: reports wait for their signatures to be checked; retry in {self.busy_wait:g} s")
        try:
            return self._openssl(openssl, raw, body, signature)
        finally:
            self.slots.release()

    def _openssl(self, openssl: str, public: bytes, body: bytes, signature: bytes) -> bool:
        with tempfile.TemporaryDirectory(prefix="rackboot-report-") as tmp:
            paths = [os.path.join(tmp, name) for name in ("key.der", "body", "sig")]
            for path, data in zip(paths, (nodekey.PUBLIC_DER + public, body, signature), strict=True):
                with open(path, "wb") as f:
                    f.write(data)
            key, doc, sig = paths
            argv = [openssl, "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", key]
            with self.lock:
                self.runs += 1
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                done = subprocess.run(
                    [*argv, "-rawin", "-in", doc, "-sigfile", sig], capture_output=True, timeout=OPENSSL_TIMEOUT
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Unavailable(f"cannot run {openssl} to check a report's signature: {e}") from None
            finally:
                with self.lock:
                    self.running -= 1
        if done.returncode != 0 and b"Signature Verification Failure" not in done.stdout:  # not an answer
            said = (done.stdout + done.stderr).decode("utf-8", "replace").strip().splitlines()
            raise Unavailable(f"{openssl} pkeyutl -verify: {said[0][:200] if said else 'no message'}")
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
