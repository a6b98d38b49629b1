"""The node's own Ed25519 key: made on its first boot, kept on the card outside the slots,
it signs every report the node sends, so that the master can tell the node's reports from
anyone else's once it has pinned the key (adoption).

Where: two copies of one record in the card's reserved first 4 MiB, at 3 MiB + 256 KiB and
3 MiB + 320 KiB (64 KiB each), which no partition, slot install or repartition touches and
where the updater finds it before any filesystem is mounted (the data partition is not
always formatted). Record: framed as record.py describes, magic "RKBN"; its JSON body holds
format, seq, node, public and private (the raw 32-byte key halves in base64).

A new key is written to copy 1, fsynced, then to copy 2, fsynced, and only then used: a
power cut leaves no key (copy 1 torn, copy 2 as it was), which is made again on the next
boot and was never reported, or the whole key in copy 1. Since copy 2 is only ever written
after copy 1 was whole, copy 1 unreadable while copy 2 is not blank is damage, not a cut:
it is repaired from copy 2 when it can be, and reported. The key is the node's, not the
card's: a card that boots in another board (another node id) makes a key of its own.

The crypto is openssl's, run as a process, as for the master's signatures (signature.py):
``genpkey -algorithm ed25519`` makes the key, ``pkeyutl -sign -rawin`` signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import formats, record
from .disk import Disk
from .errors import UpdaterError
from .formats import _NODE_RE, FORMAT, _Fields

MAGIC = b"RKBN"
COPIES = ((3 << 20) + (256 << 10), (3 << 20) + (320 << 10))
RESERVED = 64 << 10
KEY_BYTES = 32
SIGNATURE_BYTES = 64
OPENSSL = "openssl"
OPENSSL_TIMEOUT = 30  # seconds; genpkey may wait for the kernel's entropy early in a boot
# DER prefixes of an Ed25519 key (RFC 8410): PKCS#8 private key and SubjectPublicKeyInfo,
# each followed by the raw 32 bytes
PRIVATE_DER = bytes.fromhex("302e020100300506032b657004220420")
PUBLIC_DER = bytes.fromhex("302a300506032b6570032100")


def where(copy: int) -> str:
    """A copy's place, as notes/formats.md names it: '3 MiB + 256 KiB'."""
    return record.place(COPIES[copy])


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_from_b64(value: str, what: str) -> bytes:
    """Base64 of exactly 32 raw bytes, in its one canonical spelling; else UpdaterError."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES or b64(raw) != value:
        raise UpdaterError(f"{what}: {value[:60]!r} is not the base64 of a {KEY_BYTES}-byte Ed25519 key")
    return raw


def fingerprint(public: bytes) -> str:
    """What a person compares: 'SHA256:' and the unpadded base64 of the raw key's sha256."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class NodeKey:
    """One node's key pair, as the card keeps it."""

    node: str
    public: bytes
    private: bytes = field(repr=False)
    seq: int = 1  # which key this card made for a node: 1, then one more each time it makes another
    format: int = FORMAT

    @classmethod
    def from_dict(cls, obj: Any) -> NodeKey:
        f = _Fields("node key", obj)
        return cls(
            format=f.format(),
            seq=f.integer("seq", minimum=1),
            node=f.text("node", _NODE_RE, what="a node id"),
            public=key_from_b64(f.text("public"), "node key: public"),
            private=key_from_b64(f.text("private"), "node key: private"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "seq": self.seq,
            "node": self.node,
            "public": b64(self.public),
            "private": b64(self.private),
        }

    @property
    def public_b64(self) -> str:
        return b64(self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, data: bytes, openssl: str = OPENSSL) -> bytes:
        """The 64-byte Ed25519 signature over ``data``; UpdaterError when openssl cannot."""
        with tempfile.TemporaryDirectory(prefix="rackboot-nodekey-") as tmp:  # mode 0700
            key, doc = os.path.join(tmp, "key.der"), os.path.join(tmp, "doc")
            _write(key, PRIVATE_DER + self.private)
            _write(doc, data)
            signature = _openssl(
                [openssl, "pkeyutl", "-sign", "-keyform", "DER", "-inkey", key, "-rawin", "-in", doc], "sign"
            )
        if len(signature) != SIGNATURE_BYTES:
            raise UpdaterError(f"node key: openssl made a signature of {len(signature)} bytes, not {SIGNATURE_BYTES}")
        return signature


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _openssl(argv: list[str], what: str, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=OPENSSL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UpdaterError(f"node key: cannot run {argv[0]} to {what}: {e}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UpdaterError(f"node key: {argv[0]} {argv[1]} failed: {said[0][:200] if said else 'no message'}")
    return done.stdout


def generate(node: str, seq: int = 1, openssl: str = OPENSSL) -> NodeKey:
    """A new key pair for ``node``, made by ``openssl genpkey`` (its public half by ``pkey``)."""
    private = _openssl([openssl, "genpkey", "-algorithm", "ed25519", "-outform", "DER"], "make a key")
    if len(private) != len(PRIVATE_DER) + KEY_BYTES or not private.startswith(PRIVATE_DER):
        raise UpdaterError(f"node key: openssl genpkey gave {len(private)} bytes that are not an Ed25519 key")
    public = _openssl(
        [openssl, "pkey", "-inform", "DER", "-pubout", "-outform", "DER"], "derive the public key", private
    )
    if len(public) != len(PUBLIC_DER) + KEY_BYTES or not public.startswith(PUBLIC_DER):
        raise UpdaterError(f"node key: openssl pkey gave {len(public)} bytes that are not an Ed25519 public key")
    return NodeKey(node=node, public=public[len(PUBLIC_DER) :], private=private[len(PRIVATE_DER) :], seq=seq)


# --- the record on the card ---------------------------------------------------------------


def encode(key: NodeKey) -> bytes:
    body = formats.dump(key)
    if decode_body(body, key.seq) != key:  # never store what the reader would throw away
        raise UpdaterError(f"node key: record for {key.node} does not read back as itself")
    return record.frame(MAGIC, key.seq, body, RESERVED, what="node key")


def decode_body(body: bytes, seq: int) -> NodeKey | None:
    try:
        key = NodeKey.from_dict(formats.load_json("node key", body))
    except UpdaterError:
        return None
    return key if key.seq == seq else None


def decode(raw: bytes) -> NodeKey | None:
    """A copy's key, or None when it is torn, blank or otherwise invalid."""
    whole = record.unframe(MAGIC, raw, RESERVED)
    return decode_body(whole[1], whole[0]) if whole else None


def is_blank(raw: bytes) -> bool:
    return not raw.strip(b"\0")


@dataclass(frozen=True)
class Found:
    """What the two copies hold: the key (None: none usable), the copies to rewrite from it,
    a problem worth reporting (damage, or a record of a newer format, left alone)."""

    key: NodeKey | None
    repair: tuple[int, ...] = ()
    problem: str | None = None
    newer: bool = False


def examine(raws: tuple[bytes, bytes]) -> Found:
    """The key the card holds, from both copies' bytes (pure)."""
    newer = record.newer(MAGIC, raws, COPIES, RESERVED)
    if newer is not None:
        return Found(None, problem=f"{newer}; it is left as it is and reports go unsigned", newer=True)
    keys = [decode(raw) for raw in raws]
    key = record.newest(keys)
    repair = tuple(i for i, k in enumerate(keys) if key is not None and k != key)
    # copy 2 is written only after copy 1 was whole: copy 1 unreadable beside a written copy 2
    # is damage; copy 1 torn beside a blank copy 2 is a first write that a power cut stopped
    problem = None
    if keys[0] is None and not is_blank(raws[1]):
        if key is not None:
            problem = f"the copy at {where(0)} is damaged, the one at {where(1)} whole"
        else:
            problem = "both copies are damaged: the key is lost"
    return Found(key, repair, problem)


def read_copies(disk: Disk) -> tuple[bytes, bytes]:
    first, second = (disk.read(offset, RESERVED) for offset in COPIES)
    return first, second


def read(disk: Disk, node: str) -> NodeKey | None:
    """The card's key for ``node``, read only (never written): None when it has none."""
    key = examine(read_copies(disk)).key
    return key if key is not None and key.node == node else None


def store(disk: Disk, key: NodeKey, copies: tuple[int, ...] = (0, 1)) -> None:
    """Write ``key`` into the given copies in order, each synced before the next is touched."""
    raw = encode(key)
    for copy in copies:
        disk.write(COPIES[copy], raw)
        disk.fsync()


def ensure(
    disk: Disk, node: str, *, log: Callable[[str], None], openssl: str = OPENSSL
) -> tuple[NodeKey | None, str | None]:
    """The node's key, made and stored first when the card has none for ``node``; and what
    is wrong with the card's record, to report (None: nothing). A key is returned only once
    it is on the card whole. UpdaterError when no key can be had (openssl, the disk)."""
    found = examine(read_copies(disk))
    if found.newer:
        return None, found.problem
    key = found.key
    if key is not None and key.node == node:
        if found.repair:
            log(f"node key: rewriting the copy at {', '.join(where(c) for c in found.repair)} from the whole one")
            store(disk, key, found.repair)
        return key, found.problem
    seq = key.seq + 1 if key is not None else 1
    log(
        f"node key: making a key for {node}: "
        + (f"the card's key is {key.node}'s (this card moved)" if key is not None else "none on the card")
    )
    made = generate(node, seq, openssl)
    store(disk, made)
    log(f"node key: ed25519 {made.fingerprint} kept on the card")
    problem = found.problem and (
        f"{found.problem}; a new key {made.fingerprint} was made: re-adopt the node (rackboot adopt --replace {node})"
    )
    return made, problem
